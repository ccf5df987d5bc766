"""The TF-IDF + one-vs-rest logistic regression baseline, C tuned on dev by micro-F1.

Needs scikit-learn (`pip install scikit-learn`, or the `baselines` extra); it is imported only when the
baseline runs, so the rest of the package works without it.
"""
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from cec.errors import CECError, DataError
from cec.evaluation.metrics import label_matrix, micro_f1, tune_threshold


@dataclass
class BaselineResult:
    dev_scores: np.ndarray  # [len(dev), len(codes)] probabilities at the chosen C
    test_scores: np.ndarray  # [len(test), len(codes)]
    C: float  # the inverse regularisation strength chosen on dev
    threshold: float  # the dev-tuned threshold at that C
    dev_micro_f1: float
    search: dict[float, float]  # every C tried -> its dev micro-F1 (at its own tuned threshold)


def _sklearn():
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise CECError("the TF-IDF + logistic regression baseline needs scikit-learn: "
                       "pip install scikit-learn (or pip install 'cec-engine[baselines]')") from None
    return TfidfVectorizer, LogisticRegression


def _one_vs_rest(x_train, y_train: np.ndarray, x_eval: list, C: float, desc: str) -> list[np.ndarray]:
    """P(code) for each matrix in x_eval, one binary logistic regression per code.

    A code that is always (or never) present in train gets probability 1 (or 0) everywhere, as scikit-learn's
    OneVsRestClassifier does for a constant label.
    """
    _, LogisticRegression = _sklearn()
    out = [np.zeros((x.shape[0], y_train.shape[1]), dtype=np.float64) for x in x_eval]
    for j in tqdm(range(y_train.shape[1]), desc=desc, unit="code", leave=False):
        y = y_train[:, j]
        if y.all() or not y.any():
            for scores in out:
                scores[:, j] = float(y[0])
            continue
        model = LogisticRegression(C=C, solver="liblinear", random_state=0).fit(x_train, y)
        for scores, x in zip(out, x_eval):
            scores[:, j] = model.predict_proba(x)[:, 1]
    return out


def tfidf_logreg(train: list[dict], dev: list[dict], test: list[dict], codes: list[str],
                 Cs=(0.1, 1.0, 10.0, 100.0, 1000.0), ngram_range=(1, 2), min_df: int = 2,
                 max_features: int | None = 50_000) -> BaselineResult:
    """Fit TF-IDF on the train notes, one logistic regression per code for each C; keep the C whose dev
    micro-F1 (at a dev-tuned threshold) is best, the smallest C on ties. Notes are {"id", "text", "labels"}."""
    TfidfVectorizer, _ = _sklearn()
    if not train or not dev:
        raise DataError("the TF-IDF baseline needs train and dev notes")
    if not Cs:
        raise ValueError("empty C grid")
    vectorizer = TfidfVectorizer(lowercase=True, ngram_range=ngram_range, min_df=min_df,
                                 max_features=max_features, sublinear_tf=True, dtype=np.float64)
    try:
        x_train = vectorizer.fit_transform([n["text"] for n in train])
    except ValueError as e:  # e.g. an empty vocabulary after min_df
        raise DataError(f"TF-IDF on the train notes: {e}") from None
    x_dev = vectorizer.transform([n["text"] for n in dev])
    x_test = vectorizer.transform([n["text"] for n in test]) if test else None
    y_train = label_matrix([n["labels"] for n in train], codes)
    y_dev = label_matrix([n["labels"] for n in dev], codes)

    best, search = None, {}
    for C in sorted(Cs):
        x_eval = [x_dev] + ([x_test] if x_test is not None else [])
        scores = _one_vs_rest(x_train, y_train, x_eval, C, desc=f"TF-IDF+LR C={C:g}")
        threshold = tune_threshold(y_dev, scores[0])
        f1 = micro_f1(y_dev, scores[0] >= threshold)
        search[float(C)] = f1
        if best is None or f1 > best[0]:
            best = (f1, float(C), threshold, scores)
    f1, C, threshold, scores = best
    test_scores = scores[1] if x_test is not None else np.zeros((0, len(codes)))
    return BaselineResult(scores[0], test_scores, C, threshold, f1, search)
