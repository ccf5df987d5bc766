"""Calibrated code probabilities: Platt scaling of the logit, P' = sigmoid(a * logit(P) + b), one (a, b) for
all codes, fitted by log-loss on dev; and the expected calibration error (ECE) that measures it.

Temperature scaling is Platt with b = 0 (a = 1/T). The pair lives in cec_pipeline.json ("calibration") and
infer.py applies it to every code probability before the threshold, so a threshold tuned on calibrated dev
scores reads as a probability.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from cec.errors import DataError

EPS = 1e-6


def _logit(p) -> torch.Tensor:
    return torch.logit(torch.as_tensor(np.asarray(p), dtype=torch.float64).clamp(EPS, 1 - EPS))


@dataclass(frozen=True)
class Platt:
    a: float = 1.0
    b: float = 0.0

    def __call__(self, p):
        """Calibrated probabilities, same shape (numpy or torch in, same kind out)."""
        out = torch.sigmoid(self.a * _logit(p) + self.b)
        return out.numpy() if isinstance(p, np.ndarray) else out.to(torch.as_tensor(p).dtype)

    @classmethod
    def fit(cls, scores, y, temperature_only: bool = False) -> "Platt":
        z, t = _logit(scores).ravel(), torch.as_tensor(np.asarray(y), dtype=torch.float64).ravel()
        if z.numel() == 0 or t.min() == t.max():
            raise DataError("calibration needs dev scores with both positive and negative labels")
        a = torch.ones((), dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=not temperature_only)
        opt = torch.optim.LBFGS([a, b] if not temperature_only else [a], lr=1, max_iter=200,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(a * z + b, t)
            loss.backward()
            return loss

        opt.step(closure)
        return cls(float(a.detach()), float(b.detach()))

    def to_json(self) -> dict:
        return {"method": "platt", **asdict(self)}

    @classmethod
    def from_json(cls, d: dict | None) -> "Platt | None":
        if d is None:
            return None
        if not isinstance(d, dict) or d.get("method") != "platt":
            raise DataError(f"calibration: expected {{'method': 'platt', 'a', 'b'}}, got {d!r}")
        try:
            return cls(float(d["a"]), float(d["b"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"calibration: expected numbers a and b, got {d!r}") from None


def expected_calibration_error(scores, y, bins: int = 10) -> float:
    """ECE over equal-width probability bins: sum over bins of (share of scores in the bin) * |mean score -
    fraction positive|, over every (note, code) pair."""
    p, t = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for k in range(bins):
        sel = which == k
        if sel.any():
            ece += sel.mean() * abs(p[sel].mean() - t[sel].mean())
    return float(ece)
