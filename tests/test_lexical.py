"""The lexical prior (cec.coding.lexical): its TF-IDF equals scikit-learn's TfidfVectorizer, its regression
scikit-learn's LogisticRegression, its file round-trips and refuses what does not fit."""
import json

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from cec.coding import lexical
from cec.coding.lexical import LexicalPrior
from cec.errors import DataError

CODES = ["R50.9", "R05", "I10"]
KEYWORDS = {"R50.9": "fever", "R05": "cough", "I10": "high blood pressure"}


def corpus(n, seed=0):
    """Invented notes: a code's words appear when the note has the code, among noise words (some repeated, some
    with digits, accents and punctuation, as in real notes)."""
    rng = np.random.default_rng(seed)
    noise = [f"word{i}" for i in range(40)] + ["Ñandú", "a", "x-ray", "T2", "mg/dl", "12,5"]
    texts, y = [], np.zeros((n, len(CODES)))
    for i in range(n):
        words = list(rng.choice(noise, size=20))
        for j, c in enumerate(CODES):
            if rng.random() < 0.35:
                y[i, j] = 1
                words.append(KEYWORDS[c])
        rng.shuffle(words)
        texts.append(" ".join(words) + ("." if i % 2 else "!"))
    return texts, y


def test_tfidf_equals_scikit_learn():
    texts, _ = corpus(60)
    ref = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, dtype=np.float64)
    x_ref = ref.fit_transform(texts).toarray()
    vocabulary, idf = lexical.build_vocabulary(texts)
    assert vocabulary == list(ref.get_feature_names_out())
    np.testing.assert_allclose(idf, ref.idf_, rtol=1e-12)
    unseen = ["fever and word3 word3 word3 unknownword", ""]
    np.testing.assert_allclose(lexical.tfidf(texts, vocabulary, idf).to_dense().numpy(), x_ref, atol=1e-12)
    np.testing.assert_allclose(lexical.tfidf(unseen, vocabulary, idf).to_dense().numpy(),
                               ref.transform(unseen).toarray(), atol=1e-12)


def test_regression_equals_scikit_learn_logistic_regression():
    texts, y = corpus(80)
    prior = LexicalPrior.fit(texts, y, CODES, C=10.0)
    x = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(texts).transform(texts[:20])
    for j in range(len(CODES)):
        ref = LogisticRegression(C=10.0, tol=1e-10, max_iter=10_000).fit(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(texts), y[:, j])
        np.testing.assert_allclose(prior.logits(texts[:20])[:, j], ref.decision_function(x), atol=1e-4)


def test_prior_learns_the_words_and_explains_with_them():
    texts, y = corpus(120)
    prior = LexicalPrior.fit(texts[:100], y[:100], CODES)  # C chosen by cross-validation
    assert prior.C in lexical.C_GRID
    z = prior.logits(texts[100:])
    from cec.evaluation.metrics import roc_auc
    for j in range(len(CODES)):
        assert roc_auc(y[100:, j], z[:, j]) > 0.9
    terms = prior.top_terms("the patient has high blood pressure and word1")[CODES.index("I10")]
    assert terms and {t for t, _ in terms} <= {"high", "blood", "pressure", "high blood", "blood pressure"}
    assert [s for _, s in terms] == sorted((s for _, s in terms), reverse=True)


def test_out_of_fold_logits_come_from_priors_that_did_not_see_the_note():
    texts, y = corpus(50)
    oof = LexicalPrior.out_of_fold(texts, y, CODES, C=10.0, folds=5)
    held = np.sort(np.random.default_rng(0).permutation(50)[0::5])
    rest = np.setdiff1d(np.arange(50), held)
    alone = LexicalPrior.fit([texts[i] for i in rest], y[rest], CODES, C=10.0)
    np.testing.assert_allclose(oof[held], alone.logits([texts[i] for i in held]))
    assert not np.allclose(oof, LexicalPrior.fit(texts, y, CODES, C=10.0).logits(texts))


def test_file_round_trips_and_refuses_what_does_not_fit(tmp_path):
    texts, y = corpus(40)
    prior = LexicalPrior.fit(texts, y, CODES, C=10.0)
    prior.save(tmp_path / "lexical.safetensors")
    again = LexicalPrior.load(tmp_path / "lexical.safetensors", CODES)
    assert again.vocabulary == prior.vocabulary and again.C == 10.0
    np.testing.assert_allclose(again.logits(texts), prior.logits(texts), atol=1e-5)  # weights stored as float32
    with pytest.raises(DataError, match="other codes"):
        LexicalPrior.load(tmp_path / "lexical.safetensors", CODES[::-1])
    with pytest.raises(DataError, match="no such lexical-prior file"):
        LexicalPrior.load(tmp_path / "none.safetensors", CODES)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="malformed lexical-prior file"):
        LexicalPrior.load(tmp_path / "bad.safetensors", CODES)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    with pytest.raises(DataError, match="not a lexical-prior file"):
        LexicalPrior.load(tmp_path / "other.safetensors", CODES)
    with pytest.raises(DataError, match="no n-gram occurs"):
        LexicalPrior.fit(["alpha", "beta"], np.zeros((2, 3)), CODES, C=1.0)
    with pytest.raises(DataError, match="labels of shape"):
        LexicalPrior.fit(texts, y[:, :2], CODES, C=1.0)
    assert json.loads(json.dumps(prior.vocabulary)) == prior.vocabulary
