import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from cec.errors import DataError
from cec.evaluation.metrics import (
    evaluate,
    label_matrix,
    macro_auc,
    macro_f1,
    macro_f1_caml,
    micro_auc,
    micro_f1,
    per_label_f1,
    precision_at_k,
    roc_auc,
    tune_threshold,
)


def random_problem(seed, n=40, labels=12, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.random((n, labels)) < rng.uniform(0.05, 0.5, size=labels)
    y[:, 0] = False  # a label with no positive
    y[:, 1] = True  # a label with no negative
    scores = np.clip(0.5 * y + rng.normal(0.25, 0.25, size=y.shape), 0, 1)
    if ties:
        scores = np.round(scores, 1)  # many tied scores
    return y, scores.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_matches_sklearn(seed):
    y, scores = random_problem(seed)
    pred = scores >= 0.5
    assert micro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="micro", zero_division=0), abs=1e-12)
    assert macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    np.testing.assert_allclose(per_label_f1(y, pred), f1_score(y, pred, average=None, zero_division=0))
    p = precision_score(y, pred, average="macro", zero_division=0)
    r = recall_score(y, pred, average="macro", zero_division=0)
    assert macro_f1_caml(y, pred) == pytest.approx(2 * p * r / (p + r), abs=1e-12)
    assert macro_f1_caml(y, pred) != pytest.approx(macro_f1(y, pred), abs=1e-6)


def test_f1_edge_cases():
    y = np.zeros((3, 2), dtype=bool)
    assert micro_f1(y, y) == 0.0 and macro_f1(y, y) == 0.0 and macro_f1_caml(y, y) == 0.0
    y = np.eye(3, dtype=bool)
    assert micro_f1(y, y) == 1.0 and macro_f1(y, y) == 1.0 and macro_f1_caml(y, y) == 1.0


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 3])
def test_auc_matches_sklearn(seed, ties):
    y, scores = random_problem(seed, ties=ties)
    assert micro_auc(y, scores) == pytest.approx(roc_auc_score(y.ravel(), scores.ravel()), abs=1e-12)
    auc, skipped = macro_auc(y, scores)
    assert skipped == 2
    assert auc == pytest.approx(roc_auc_score(y[:, 2:], scores[:, 2:], average="macro"), abs=1e-12)
    for j in range(2, y.shape[1]):
        assert roc_auc(y[:, j], scores[:, j]) == pytest.approx(roc_auc_score(y[:, j], scores[:, j]), abs=1e-12)


def test_auc_undefined():
    assert np.isnan(roc_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    auc, skipped = macro_auc(np.ones((4, 3), dtype=bool), np.random.default_rng(0).random((4, 3)))
    assert np.isnan(auc) and skipped == 3


def test_precision_at_k():
    y = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    s = np.array([[0.9, 0.8, 0.7, 0.1], [0.5, 0.5, 0.2, 0.4]])
    assert precision_at_k(y, s, 1) == pytest.approx((1 + 0) / 2)
    assert precision_at_k(y, s, 2) == pytest.approx((1 / 2 + 0) / 2)
    assert precision_at_k(y, s, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    with pytest.raises(ValueError):
        precision_at_k(y, s, 5)


def test_precision_at_k_matches_brute_force():
    y, scores = random_problem(5, n=30, labels=20)
    scores = scores + np.arange(20) * 1e-4  # no ties: the top k is unique
    for k in (1, 5, 8):
        expected = np.mean([y[i, np.argsort(-scores[i])[:k]].sum() / k for i in range(len(y))])
        assert precision_at_k(y, scores, k) == pytest.approx(expected)


def test_tune_threshold_is_the_grid_argmax():
    y, scores = random_problem(7, n=60, labels=15, ties=True)
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    f1s = [f1_score(y, scores.astype(np.float64) >= t, average="micro", zero_division=0) for t in grid]
    best = tune_threshold(y, scores, grid)
    assert best == grid[int(np.argmax(f1s))]
    assert evaluate(y, scores, best)["micro_f1"] == pytest.approx(max(f1s), abs=1e-12)


def test_tune_threshold_separable():
    y = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    s = np.where(y, 0.7, 0.3)
    t = tune_threshold(y, s)
    assert 0.3 < t <= 0.7 and t == 0.31  # smallest threshold reaching the best F1
    assert micro_f1(y, s >= t) == 1.0


def test_tune_threshold_reaches_beyond_the_percent_grid():
    # an overconfident model: every score near 1, positives the nearest; and a calibrated one on a rare label
    y = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    high = np.where(y, 0.9999, 0.997)
    assert tune_threshold(y, high) == 0.998 and micro_f1(y, high >= 0.998) == 1.0
    assert tune_threshold(y, np.where(y, 0.004, 0.0001)) == 0.0002


def test_evaluate_keys_and_values():
    y, scores = random_problem(11, n=25, labels=10)
    out = evaluate(y, scores, 0.5, ks=(5, 8, 15))
    assert set(out) == {"threshold", "micro_f1", "macro_f1", "macro_f1_caml", "micro_auc", "macro_auc",
                        "auc_labels_skipped", "p_at_5", "p_at_8"}
    assert out["auc_labels_skipped"] == 2
    assert out["micro_f1"] == pytest.approx(f1_score(y, scores >= 0.5, average="micro"))


def test_label_matrix():
    y = label_matrix([["a", "c"], [], ["b", "a"]], ["a", "b", "c"])
    np.testing.assert_array_equal(y, [[1, 0, 1], [0, 0, 0], [1, 1, 0]])
    with pytest.raises(DataError, match="'z'"):
        label_matrix([["z"]], ["a"])


def test_shape_mismatch():
    with pytest.raises(ValueError):
        micro_f1(np.zeros((2, 3)), np.zeros((3, 2)))
