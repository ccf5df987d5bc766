"""Multi-label coding metrics on [notes, codes] matrices: F1, AUC, P@k, and a threshold tuned on dev.

Two macro-F1s exist in the literature and give different numbers:
- `macro_f1`: the mean of per-label F1 (medical-coding-reproducibility, scikit-learn's average="macro").
- `macro_f1_caml`: the harmonic mean of macro precision and macro recall (CAML and the papers that reuse its
  scripts, e.g. KEPT).
A label with no gold and no predicted positive has F1 = 0 here (scikit-learn's zero_division=0) and counts in
the macro mean. Macro AUC skips labels whose gold column has no positive or no negative (AUC is undefined
there) and reports how many it skipped. Predictions are `scores >= threshold`.
"""
import numpy as np

from cec.errors import DataError

# 0.01..0.99 by 0.01, plus tails: an overconfident model's best threshold can lie above 0.99 (most scores near 1),
# a calibrated model's on a rare label below 0.01, and a grid edge would cut the tuning short there.
GRID_TAILS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.995, 0.998, 0.999, 0.9995, 0.9998, 0.9999)
DEFAULT_GRID = np.sort(np.r_[np.round(np.arange(0.01, 1.0, 0.01), 2), GRID_TAILS])
GRID_TEXT = "0.01..0.99 by 0.01 with tails 0.0001..0.005 and 0.995..0.9999"


def label_matrix(label_lists: list[list[str]], codes: list[str]) -> np.ndarray:
    """Multi-hot [len(label_lists), len(codes)] matrix; a label outside `codes` is an error."""
    index = {c: j for j, c in enumerate(codes)}
    y = np.zeros((len(label_lists), len(codes)), dtype=bool)
    for i, labels in enumerate(label_lists):
        for c in labels:
            if c not in index:
                raise DataError(f"note {i}: label {c!r} is not in the code set")
            y[i, index[c]] = True
    return y


def _check(y_true, other) -> tuple[np.ndarray, np.ndarray]:
    y_true, other = np.asarray(y_true).astype(bool), np.asarray(other)
    if y_true.ndim != 2 or y_true.shape != other.shape:
        raise ValueError(f"expected two [notes, codes] matrices of one shape, got {y_true.shape} and {other.shape}")
    return y_true, other


def _counts(y_true, y_pred, axis=None):
    tp = (y_true & y_pred).sum(axis=axis)
    return tp, (~y_true & y_pred).sum(axis=axis), (y_true & ~y_pred).sum(axis=axis)


def _divide(num, den):
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def micro_f1(y_true, y_pred) -> float:
    y_true, y_pred = _check(y_true, y_pred)
    tp, fp, fn = _counts(y_true, y_pred.astype(bool))
    return float(_divide(2 * tp, 2 * tp + fp + fn))


def per_label_f1(y_true, y_pred) -> np.ndarray:
    y_true, y_pred = _check(y_true, y_pred)
    tp, fp, fn = _counts(y_true, y_pred.astype(bool), axis=0)
    return _divide(2 * tp, 2 * tp + fp + fn)


def macro_f1(y_true, y_pred) -> float:
    return float(per_label_f1(y_true, y_pred).mean())


def macro_f1_caml(y_true, y_pred) -> float:
    y_true, y_pred = _check(y_true, y_pred)
    tp, fp, fn = _counts(y_true, y_pred.astype(bool), axis=0)
    precision, recall = _divide(tp, tp + fp).mean(), _divide(tp, tp + fn).mean()
    return float(_divide(2 * precision * recall, precision + recall))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing their average rank (what the Mann-Whitney U statistic needs)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve of one binary problem; nan when y_true has no positive or no negative."""
    y_true, scores = np.asarray(y_true, dtype=bool).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y_true.sum())
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(scores)[y_true].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def micro_auc(y_true, scores) -> float:
    y_true, scores = _check(y_true, scores)
    return roc_auc(y_true.ravel(), scores.ravel())


def macro_auc(y_true, scores) -> tuple[float, int]:
    """(mean AUC over labels with both classes in y_true, number of labels skipped); nan if all are skipped."""
    y_true, scores = _check(y_true, scores)
    positives = y_true.sum(axis=0)
    usable = np.flatnonzero((positives > 0) & (positives < y_true.shape[0]))
    skipped = y_true.shape[1] - len(usable)
    if len(usable) == 0:
        return float("nan"), skipped
    return float(np.mean([roc_auc(y_true[:, j], scores[:, j]) for j in usable])), skipped


def precision_at_k(y_true, scores, k: int) -> float:
    """Mean over notes of (gold codes among the k top-scored) / k, as CAML computes it (ties: lower index first)."""
    y_true, scores = _check(y_true, scores)
    if not 1 <= k <= y_true.shape[1]:
        raise ValueError(f"k={k} outside 1..{y_true.shape[1]}")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.take_along_axis(y_true, top, axis=1).sum(axis=1).mean() / k)


def tune_threshold(y_true, scores, grid=DEFAULT_GRID) -> float:
    """The grid threshold with the best micro-F1 (`scores >= t`); the smallest such threshold on ties."""
    y_true, scores = _check(y_true, scores)
    grid = np.sort(np.asarray(grid, dtype=np.float64))
    if len(grid) == 0:
        raise ValueError("empty threshold grid")
    flat, gold = scores.ravel().astype(np.float64), y_true.ravel()
    order = np.argsort(flat, kind="stable")
    sorted_scores, sorted_gold = flat[order], gold[order]
    # Predicted positives at threshold t are the suffix starting at searchsorted(t, "left").
    gold_suffix = np.r_[np.cumsum(sorted_gold[::-1])[::-1], 0]
    start = np.searchsorted(sorted_scores, grid, side="left")
    tp = gold_suffix[start]
    predicted = len(flat) - start
    f1 = _divide(2 * tp, predicted + gold.sum())
    return float(grid[int(np.argmax(f1))])


def evaluate(y_true, scores, threshold: float, ks=(5, 8, 15)) -> dict:
    """All metrics of one system on one split; P@k for each k in `ks` not above the number of codes."""
    y_true, scores = _check(y_true, scores)
    y_pred = scores.astype(np.float64) >= threshold  # compare in float64, as tune_threshold does
    auc, skipped = macro_auc(y_true, scores)
    result = {
        "threshold": float(threshold),
        "micro_f1": micro_f1(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "macro_f1_caml": macro_f1_caml(y_true, y_pred),
        "micro_auc": micro_auc(y_true, scores),
        "macro_auc": auc,
        "auc_labels_skipped": skipped,
    }
    for k in ks:
        if k <= y_true.shape[1]:
            result[f"p_at_{k}"] = precision_at_k(y_true, scores, k)
    return result
