import sys

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from cec.evaluation.baselines import tfidf_logreg
from cec.errors import CECError, DataError
from cec.evaluation.metrics import evaluate, label_matrix, micro_f1

CODES = ["R50.9", "R05", "I10", "Z00"]
KEYWORDS = {"R50.9": "fever", "R05": "cough", "I10": "hypertension"}  # Z00 never occurs in train


def corpus(n, seed):
    """Invented notes: each code's keyword appears in the text when the note has the code, plus noise words."""
    rng = np.random.default_rng(seed)
    noise = [f"word{i}" for i in range(30)]
    notes = []
    for i in range(n):
        labels = [c for c in KEYWORDS if rng.random() < 0.4]
        words = list(rng.choice(noise, size=12)) + [KEYWORDS[c] for c in labels]
        rng.shuffle(words)
        notes.append({"id": f"{seed}-{i}", "text": " ".join(words), "labels": labels})
    return notes


@pytest.fixture(scope="module")
def splits():
    return corpus(60, 0), corpus(30, 1), corpus(30, 2)


def test_learns_keywords(splits):
    train, dev, test = splits
    result = tfidf_logreg(train, dev, test, CODES, Cs=(0.01, 1.0, 10.0), ngram_range=(1, 1), min_df=1)
    assert result.dev_scores.shape == (30, 4) and result.test_scores.shape == (30, 4)
    assert set(result.search) == {0.01, 1.0, 10.0}
    assert result.C == max(result.search, key=lambda c: (result.search[c], -c))
    assert result.dev_micro_f1 == result.search[result.C]
    y_test = label_matrix([n["labels"] for n in test], CODES)
    metrics = evaluate(y_test, result.test_scores, result.threshold)
    assert metrics["micro_f1"] > 0.9 and metrics["micro_auc"] > 0.95
    assert np.all(result.test_scores[:, 3] == 0.0)  # a code never seen in train


def test_matches_sklearn_one_vs_rest(splits):
    train, dev, test = splits
    result = tfidf_logreg(train, dev, test, CODES[:3], Cs=(1.0,), ngram_range=(1, 2), min_df=1)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, max_features=50_000, sublinear_tf=True)
    x_train = vectorizer.fit_transform([n["text"] for n in train])
    y_train = label_matrix([n["labels"] for n in train], CODES[:3])
    ovr = OneVsRestClassifier(LogisticRegression(C=1.0, solver="liblinear", random_state=0)).fit(x_train, y_train)
    expected = ovr.predict_proba(vectorizer.transform([n["text"] for n in test]))
    np.testing.assert_allclose(result.test_scores, expected, atol=1e-10)
    y_dev = label_matrix([n["labels"] for n in dev], CODES[:3])
    assert result.dev_micro_f1 == pytest.approx(micro_f1(y_dev, result.dev_scores >= result.threshold))


def test_no_test_split(splits):
    train, dev, _ = splits
    result = tfidf_logreg(train, dev, [], CODES, Cs=(1.0,), min_df=1)
    assert result.test_scores.shape == (0, 4)


def test_bad_inputs(splits):
    train, dev, test = splits
    with pytest.raises(DataError, match="train and dev"):
        tfidf_logreg(train, [], test, CODES)
    with pytest.raises(DataError, match="not in the code set"):
        tfidf_logreg(train, dev, test, CODES[:2])
    with pytest.raises(DataError, match="TF-IDF on the train notes"):
        tfidf_logreg([{"id": "a", "text": "a b", "labels": []}], dev, test, CODES, min_df=5)


def test_missing_sklearn_is_a_clear_error(splits, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(CECError, match="needs scikit-learn: pip install scikit-learn"):
        tfidf_logreg(*splits, CODES)
