"""Two-fold evaluation on one scored set (less noise than one tune/report split of a small dev set).

The notes are split into two halves by a seeded permutation. For each direction (tune on A, report on B; then
B, A) a system fits what it fits (a concept bottleneck, a Platt calibration, a threshold) on the tuning half
only and predicts the report half. Every note thus gets a prediction from a fit that never saw it, and the
metrics are computed on all notes pooled, with a bootstrap 95% interval of micro-F1 over notes, beside the
micro-F1 of each direction and their mean.

A system is a function `fit(tune_idx) -> predict(idx) -> (probabilities, threshold)`; `score_system` wraps a
fixed [notes, codes] score matrix (TF-IDF, direct coding, the label LLM, a concept mean) with calibration
and a tuned threshold; `bottleneck_system` fits cec.coding.bottleneck on the tuning half's stage-1 probabilities.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from cec.coding.bottleneck import Bottleneck
from cec.coding.calibration import Platt, expected_calibration_error
from cec.evaluation.metrics import evaluate, macro_f1, micro_f1, roc_auc, tune_threshold

Fitted = Callable[[np.ndarray], np.ndarray]  # note indices -> [len, codes] probabilities


def halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def per_code_thresholds(y: np.ndarray, p: np.ndarray, fallback: float) -> np.ndarray:
    """Per code, the threshold with the best F1 on (y, p); codes without a positive keep `fallback`."""
    out = np.full(y.shape[1], fallback)
    for j in range(y.shape[1]):
        if y[:, j].any():
            out[j] = tune_threshold(y[:, j:j + 1], p[:, j:j + 1])
    return out


def score_system(scores: np.ndarray, y: np.ndarray, calibrate: bool = True):
    """A fixed score matrix: Platt fitted on the tuning half (if calibrate), threshold tuned there."""
    def fit(tune):
        cal = Platt.fit(scores[tune], y[tune]) if calibrate else None
        apply = cal if cal else (lambda s: s)
        return (lambda idx: apply(scores[idx])), apply(scores[tune]), cal
    return fit


def fit_bottleneck(cs, concept_p: np.ndarray, y: np.ndarray, tune: np.ndarray, folds: int = 5,
                   l2: float | None = None, direct_p: np.ndarray | None = None, also: tuple | None = None,
                   lexical_z: np.ndarray | None = None, prior=None) -> tuple[Bottleneck, np.ndarray]:
    """(the concept bottleneck fitted on the notes `tune`, its out-of-fold probabilities of those notes, for a
    calibration and threshold fitted on notes the model that predicts them never saw). Side inputs, [notes, codes]
    each: direct_p, the direct question's probabilities; lexical_z, lexical-prior logits from a prior that never
    saw the note (`prior`, stored with the bottleneck). also = (stage-1 probabilities, labels[, lexical logits,
    out of fold]) of more notes to fit on, such as the scored training notes."""
    if also is not None and direct_p is not None:
        raise ValueError("the extra fitting notes have no direct-question scores")
    if also is not None and (lexical_z is None) != (len(also) < 3):
        raise ValueError("lexical logits for the dev notes and for the extra fitting notes go together")
    x, labels, extra = concept_p[tune], y[tune], 0
    d = None if direct_p is None else direct_p[tune]
    lex = None if lexical_z is None else lexical_z[tune]
    if also is not None:
        x, labels, extra = np.concatenate([also[0], x]), np.concatenate([also[1], labels]), len(also[0])
        lex = None if lex is None else np.concatenate([also[2], lex])
    model = Bottleneck.fit(cs, x, labels, l2=l2, folds=folds, direct_p=d, lexical_z=lex, prior=prior)
    oof = Bottleneck.out_of_fold(cs, x, labels, folds=folds, l2=model.l2, direct_p=d, lexical_z=lex)
    return model, oof[extra:]


def bottleneck_system(cs, concept_p: np.ndarray, y: np.ndarray, calibrate: bool = True, folds: int = 5,
                      l2: float | None = None, direct_p: np.ndarray | None = None, also: tuple | None = None,
                      lexical_z: np.ndarray | None = None):
    """The concept bottleneck of fit_bottleneck fitted on the tuning half (and `also`); its threshold (and
    calibration) from out-of-fold predictions on that half."""
    def fit(tune):
        model, oof = fit_bottleneck(cs, concept_p, y, tune, folds, l2, direct_p, also, lexical_z)
        cal = Platt.fit(oof, y[tune]) if calibrate else None
        apply = cal if cal else (lambda s: s)
        side = lambda arr, idx: None if arr is None else arr[idx]  # noqa: E731
        return (lambda idx: apply(model.probs(concept_p[idx], side(direct_p, idx), side(lexical_z, idx))
                                  .double().numpy())), apply(oof), cal
    return fit


def bootstrap_micro_f1(y: np.ndarray, pred: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    stats = [micro_f1(y[idx], pred[idx]) for idx in (rng.integers(0, len(y), len(y)) for _ in range(n))]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def cross_fitted(system, y: np.ndarray, seed: int = 0, per_code: bool = False, fit_y: np.ndarray | None = None):
    """(probabilities [notes, codes], predictions, threshold per direction, micro-F1 per direction): each half
    predicted by the system fitted on the other. fit_y: the labels the system was fitted on, when not y (its
    thresholds are tuned on those too); the micro-F1s are against y."""
    fit_y = y if fit_y is None else fit_y
    a, b = halves(len(y), seed)
    probs = np.zeros(y.shape, dtype=np.float64)
    pred = np.zeros(y.shape, dtype=bool)
    directions, thresholds = [], []
    for tune, report in ((a, b), (b, a)):
        predict, tune_p, cal = system(tune)
        t = tune_threshold(fit_y[tune], tune_p)
        t_codes = per_code_thresholds(fit_y[tune], tune_p, t) if per_code else np.full(y.shape[1], t)
        probs[report] = predict(report)
        pred[report] = probs[report] >= t_codes
        thresholds.append(t)
        directions.append(micro_f1(y[report], pred[report]))
    return probs, pred, thresholds, directions


def two_fold(system, y: np.ndarray, seed: int = 0, per_code: bool = False, fit_y: np.ndarray | None = None,
             blanked: np.ndarray | None = None) -> dict:
    """Pooled cross-fitted metrics of one system, against y. per_code: thresholds per code (tuned per code on the
    tuning half, the global threshold for codes without a positive there); fit_y as in cross_fitted. blanked: a
    [notes, codes] mask of gold pairs a coder would not code from the note as read (negation blanks every mention):
    the micro-AUC and micro-F1 with them left out (AUC: neither positive nor negative; F1: not gold) are added."""
    probs, pred, thresholds, directions = cross_fitted(system, y, seed, per_code, fit_y)
    without = {}
    if blanked is not None and blanked.any():
        keep = ~blanked
        without = {"micro_auc_without_blanked": roc_auc(y[keep], probs[keep]),
                   "micro_f1_without_blanked": micro_f1(y & keep, pred), "blanked_pairs": int(blanked.sum())}
    pooled = evaluate(y, probs, 0.5)  # AUC and P@k do not depend on the threshold; F1 recomputed below
    low, high = bootstrap_micro_f1(y, pred)
    return {
        "micro_f1": micro_f1(y, pred), "micro_f1_ci95": [low, high], "macro_f1": macro_f1(y, pred),
        "micro_f1_directions": directions, "micro_f1_mean": float(np.mean(directions)),
        "micro_auc": pooled["micro_auc"], "macro_auc": pooled["macro_auc"], "p_at_5": pooled["p_at_5"],
        "thresholds": thresholds, "ece": expected_calibration_error(probs, y),
        "share_above_0_99": float((probs > 0.99).mean()), "mean_probability": float(probs.mean()),
        "codes_per_note": float(pred.sum(1).mean()), "gold_codes_per_note": float(y.sum(1).mean()), **without,
    }
