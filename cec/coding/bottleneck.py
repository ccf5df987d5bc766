"""Concept-bottleneck stage 2: each code's probability from a small logistic model over its own concepts'
stage-1 probabilities, instead of (or beside) the label LLM.

For code c with own concepts i (parent and leaf level), x_i = logit(P(yes) of concept i), clipped to +-CLIP:

    z_c = b_c + a_leaf * mean(x_leaf(c)) + a_own * mean(x_own(c)) + a_max * max(x_own(c)) + sum_i w_ci * x_i

The three pooled weights `a` are shared by all codes (codes with few positives borrow strength from the rest);
the per-concept weights w_ci and the per-code biases b_c are shrunk by L2 towards 0 and towards the mean bias.
Side logits (SIDE, each optional, one shared weight each) are read beside the concepts: `direct`, the logit of
code c's direct question asked with the direct adapter (cec.coding.stages.DIRECT), the fine-tuned direct coder's
answer; `lexical`, the logit of code c under the lexical prior (cec.coding.lexical: TF-IDF + logistic regression
over the note as read), stored beside the bottleneck file. Each is clipped to +-CLIP like the concepts.
P(c) = sigmoid(z_c). The logit decomposes exactly into one term per own concept plus the bias
(`contributions`), which is the evidence a coder reads: which concepts pushed the code up or down.
Fitted full-batch with L-BFGS on [notes, concepts] probabilities and [notes, codes] labels; the L2 strength
is chosen by k-fold cross-validation over notes of the fitting set only. Stored as JSON beside the pipeline.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cec.coding.lexical import LexicalPrior
from cec.errors import DataError
from cec.io import atomic_write_json

CLIP = 8.0
L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
POOLED = ("leaf_mean", "own_mean", "own_max")
SIDE = ("direct", "lexical")  # per-code logits read beside the concepts, in this order


def concept_logits(concept_p) -> torch.Tensor:
    p = torch.as_tensor(np.asarray(concept_p), dtype=torch.float64)
    return torch.logit(p.clamp(1e-6, 1 - 1e-6)).clamp(-CLIP, CLIP)


def side_inputs(direct_p=None, lexical_z=None) -> dict[str, torch.Tensor]:
    """The side logits given ({name: clipped [..., codes] logits}): direct_p are probabilities, lexical_z logits."""
    out = {}
    if direct_p is not None:
        out["direct"] = concept_logits(direct_p)
    if lexical_z is not None:
        out["lexical"] = torch.as_tensor(np.asarray(lexical_z), dtype=torch.float64).clamp(-CLIP, CLIP)
    return out


@dataclass
class Bottleneck:
    codes: list[str]
    own: list[list[int]]  # per code: concept ids (the concept set's ids), parent and leaf level
    leaf: list[list[int]]  # per code: its leaf-level concept ids (a subset of own)
    pooled: np.ndarray  # [3] shared weights of POOLED
    bias: np.ndarray  # [codes]
    weights: list[np.ndarray]  # per code: one weight per own concept
    l2: float = 1.0
    concept_texts: list[str] | None = None  # for a readable file; checked against the concept set on load
    direct: float | None = None  # weight of the direct question's logit; None: the bottleneck does not read it
    lexical: float | None = None  # weight of the lexical prior's logit; None: not read
    prior: LexicalPrior | None = None  # the lexical prior (saved beside the bottleneck file), when it is read

    @property
    def side(self) -> dict[str, float]:
        """{name: shared weight} of the side logits this bottleneck reads, in SIDE order."""
        return {k: getattr(self, k) for k in SIDE if getattr(self, k) is not None}

    # -- scoring ------------------------------------------------------------------------------------------
    def _pool(self, x: torch.Tensor, j: int) -> torch.Tensor:
        own, leaf = x[..., self.own[j]], x[..., self.leaf[j] or self.own[j]]
        return torch.stack([leaf.mean(-1), own.mean(-1), own.max(-1).values], -1)

    def logits(self, concept_p, direct_p=None, lexical_z=None) -> torch.Tensor:
        """[..., concepts] probabilities (and the [..., codes] side inputs the bottleneck reads: direct-question
        probabilities, lexical-prior logits) -> [..., codes] logits."""
        side = side_inputs(direct_p, lexical_z)
        missing = [k for k in self.side if k not in side]
        if missing:
            words = {"direct": "the direct question (direct_p)", "lexical": "the lexical prior (lexical_z)"}
            raise ValueError(f"this bottleneck also reads {' and '.join(words[k] for k in missing)}: pass its scores")
        return self._logits(concept_logits(concept_p), side)

    def _logits(self, x: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same from clipped logits x and side logits (those this bottleneck reads are used)."""
        pooled = torch.as_tensor(self.pooled)
        cols = [self.bias[j] + self._pool(x, j) @ pooled + x[..., self.own[j]] @ torch.as_tensor(self.weights[j])
                for j in range(len(self.codes))]
        z = torch.stack(cols, -1)
        for k, weight in self.side.items():
            z = z + weight * side[k]
        return z

    def probs(self, concept_p, direct_p=None, lexical_z=None) -> torch.Tensor:
        return torch.sigmoid(self.logits(concept_p, direct_p, lexical_z)).float()

    def direct_term(self, direct_p, j: int) -> float:
        """The direct question's term of code j's logit (0 when the bottleneck does not read it)."""
        return 0.0 if self.direct is None else self.direct * float(side_inputs(direct_p=direct_p)["direct"][..., j])

    def lexical_term(self, lexical_z, j: int) -> float:
        """The lexical prior's term of code j's logit (0 when the bottleneck does not read it)."""
        return 0.0 if self.lexical is None else self.lexical * float(side_inputs(lexical_z=lexical_z)["lexical"][..., j])

    def coefficients(self, concept_p, j: int) -> dict[int, float]:
        """Concept id -> d(code j's logit) / d(its x_i) at these probabilities (the max term goes to the argmax)."""
        x = concept_logits(concept_p)
        own, leaf = self.own[j], self.leaf[j] or self.own[j]
        out = {i: float(self.weights[j][n]) + self.pooled[1] / len(own) for n, i in enumerate(own)}
        for i in leaf:
            out[i] += self.pooled[0] / len(leaf)
        out[own[int(torch.argmax(x[own]))]] += self.pooled[2]
        return out

    def contributions(self, concept_p, j: int) -> dict[int, float]:
        """Concept id -> its term of code j's logit (the terms and the bias sum to the logit)."""
        x = concept_logits(concept_p)
        return {i: float(x[i]) * c for i, c in self.coefficients(concept_p, j).items()}

    # -- fitting ------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, cs, concept_p, y, l2: float | None = None, folds: int = 5, seed: int = 0,
            direct_p=None, lexical_z=None, prior: LexicalPrior | None = None) -> "Bottleneck":
        """Fit on [notes, concepts] stage-1 probabilities and [notes, codes] 0/1 labels (cs.codes order), and with
        side inputs ([notes, codes] direct_p: direct-question probabilities; lexical_z: lexical-prior logits, from
        priors that did not see the note, LexicalPrior.out_of_fold) a bottleneck that also reads those; `prior`,
        the lexical prior it reads at inference (stored with it). l2=None: chosen from L2_GRID by `folds`-fold
        cross-validation (log-loss) over these notes."""
        x, y, side, own, leaf = _inputs(cs, concept_p, y, direct_p, lexical_z)
        if l2 is None:
            l2 = cls._choose_l2(own, leaf, x, y, folds, seed, side)
        pooled, bias, weights, weights_side = cls._fit(own, leaf, x, y, l2, side)
        return cls(list(cs.codes), own, leaf, pooled, bias, weights, l2, [c.text for c in cs.concepts],
                   weights_side.get("direct"), weights_side.get("lexical"), prior)

    @classmethod
    def out_of_fold(cls, cs, concept_p, y, folds: int = 5, seed: int = 0, l2: float | None = None,
                    direct_p=None, lexical_z=None) -> np.ndarray:
        """[notes, codes] probabilities, each note's from a model fitted on the other folds (for calibrating and
        tuning a threshold on the same notes the final model is fitted on); l2=None: chosen per fold, on that
        fold's fitting notes only."""
        x, y, side, own, leaf = _inputs(cs, concept_p, y, direct_p, lexical_z)
        return torch.sigmoid(cls._out_of_fold_logits(own, leaf, x, y, l2, folds, seed, side)).numpy()

    @staticmethod
    def _fit(own, leaf, x, y, l2, side: dict[str, torch.Tensor]):
        n, codes = y.shape
        sizes = [len(o) for o in own]
        flat = torch.cat([torch.as_tensor(o) for o in own])
        pooled_x = torch.stack([torch.stack([x[:, lf or o].mean(1), x[:, o].mean(1), x[:, o].max(1).values], 1)
                                for o, lf in zip(own, leaf)], 1)  # [n, codes, 3]
        owner = torch.repeat_interleave(torch.arange(codes), torch.as_tensor(sizes))
        xo = x[:, flat]  # [n, total own]
        prior = torch.logit(y.mean(0).clamp(0.5 / n, 1 - 0.5 / n))
        a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        b = prior.clone().requires_grad_(True)
        w = torch.zeros(len(flat), dtype=torch.float64, requires_grad=True)
        names = [k for k in SIDE if k in side]
        xs = torch.stack([side[k] for k in names], -1) if names else None  # [n, codes, side]
        d = torch.zeros(len(names), dtype=torch.float64, requires_grad=True)  # the side logits' shared weights
        opt = torch.optim.LBFGS([a, b, w, d], lr=1, max_iter=150, tolerance_grad=1e-7, tolerance_change=1e-10,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            z = b + pooled_x @ a + torch.zeros(n, codes, dtype=torch.float64).index_add(1, owner, xo * w)
            if xs is not None:
                z = z + xs @ d
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum") / n
            loss = loss + l2 * (w.square().sum() + (b - b.mean()).square().sum()) / n
            loss.backward()
            return loss

        opt.step(closure)
        split = torch.split(w.detach(), sizes)
        return (a.detach().numpy(), b.detach().numpy(), [s.numpy() for s in split],
                dict(zip(names, d.detach().tolist())))

    @classmethod
    def _out_of_fold_logits(cls, own, leaf, x, y, l2, folds, seed, side) -> torch.Tensor:
        z = torch.zeros(y.shape, dtype=torch.float64)
        for train, held in _folds(x.shape[0], folds, seed):
            side_train = {k: v[train] for k, v in side.items()}
            lam = l2 if l2 is not None else cls._choose_l2(own, leaf, x[train], y[train], folds, seed, side_train)
            a, b, w, d = cls._fit(own, leaf, x[train], y[train], lam, side_train)
            model = cls([""] * y.shape[1], own, leaf, a, b, w, lam, direct=d.get("direct"), lexical=d.get("lexical"))
            z[held] = model._logits(x[held], {k: v[held] for k, v in side.items()})
        return z

    @classmethod
    def _choose_l2(cls, own, leaf, x, y, folds, seed, side) -> float:
        """The L2_GRID strength with the least cross-validated log-loss over these notes."""
        def cv_loss(lam):
            z = cls._out_of_fold_logits(own, leaf, x, y, lam, folds, seed, side)
            return float(torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum"))
        return min(L2_GRID, key=cv_loss)

    # -- files --------------------------------------------------------------------------------------------
    @staticmethod
    def lexical_file(path: str | Path) -> Path:
        """Where the lexical prior of the bottleneck file `path` lives: beside it."""
        path = Path(path)
        return path.with_name(path.stem + ".lexical.safetensors")

    def save(self, path: str | Path) -> None:
        if self.lexical is not None and self.prior is None:
            raise ValueError("this bottleneck reads a lexical prior but has none to save (Bottleneck.fit(prior=))")
        texts = self.concept_texts or []
        codes = {c: {"bias": float(self.bias[j]),
                     "concepts": [{"id": i, "concept": texts[i] if texts else None, "weight": float(w),
                                   "level": "leaf" if i in set(self.leaf[j]) else "parent"}
                                  for i, w in zip(self.own[j], self.weights[j])]}
                 for j, c in enumerate(self.codes)}
        side = {} if self.direct is None else {"direct": self.direct}
        if self.lexical is not None:
            self.prior.save(self.lexical_file(path))
            side["lexical"] = {"weight": self.lexical, "file": self.lexical_file(path).name}
        atomic_write_json(Path(path), {"format": "cec-bottleneck-1", "clip": CLIP, "l2": self.l2,
                                       "pooled": dict(zip(POOLED, map(float, self.pooled))), **side,
                                       "codes": codes})

    @classmethod
    def load(cls, path: str | Path, cs) -> "Bottleneck":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if d.get("format") != "cec-bottleneck-1":
                raise DataError(f"{path}: not a concept-bottleneck file (format {d.get('format')!r})")
            if list(d["codes"]) != list(cs.codes):
                raise DataError(f"{path}: fitted for another code set than concept set {cs.name!r}")
            own, leaf, weights, bias = [], [], [], []
            for code in cs.codes:
                entry = d["codes"][code]
                ids = [int(e["id"]) for e in entry["concepts"]]
                if ids != cs.concept_ids(code) or any(
                        e["concept"] is not None and e["concept"] != cs.concepts[e["id"]].text for e in entry["concepts"]):
                    raise DataError(f"{path}: code {code}'s concepts differ from concept set {cs.name!r}")
                own.append(ids)
                leaf.append([e["id"] for e in entry["concepts"] if e["level"] == "leaf"])
                weights.append(np.array([float(e["weight"]) for e in entry["concepts"]]))
                bias.append(float(entry["bias"]))
            pooled = np.array([float(d["pooled"][k]) for k in POOLED])
            direct = None if d.get("direct") is None else float(d["direct"])
            lexical = d.get("lexical")
            weight = None if lexical is None else float(lexical["weight"])
            prior = None if lexical is None else LexicalPrior.load(path.with_name(str(lexical["file"])), cs.codes)
        except FileNotFoundError:
            raise DataError(f"{path}: no such concept-bottleneck file") from None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise DataError(f"{path}: malformed concept-bottleneck file ({type(e).__name__}: {e})") from None
        return cls(list(cs.codes), own, leaf, pooled, np.array(bias), weights, float(d.get("l2", 1.0)),
                   [c.text for c in cs.concepts], direct, weight, prior)


def _inputs(cs, concept_p, y, direct_p, lexical_z):
    """Clipped logits of the stage-1 probabilities, the labels, the side logits given, and per code of the concept
    set its own and its leaf-level concept ids; shapes checked."""
    x, y = concept_logits(concept_p), torch.as_tensor(np.asarray(y), dtype=torch.float64)
    side = side_inputs(direct_p, lexical_z)
    if x.shape[0] != y.shape[0] or y.shape[1] != len(cs.codes):
        raise DataError(f"bottleneck: {x.shape[0]} notes of concept scores but labels of shape {tuple(y.shape)}")
    for k, v in side.items():
        if v.shape != y.shape:
            raise DataError(f"bottleneck: {k} scores of shape {tuple(v.shape)}, labels {tuple(y.shape)}")
    own = [cs.concept_ids(c) for c in cs.codes]
    return x, y, side, own, [list(cs.leaf_ids.get(c, [])) for c in cs.codes]


def _folds(n: int, folds: int, seed: int):
    order = np.random.default_rng(seed).permutation(n)
    for k in range(min(folds, n)):
        held = np.sort(order[k::folds])
        yield np.setdiff1d(np.arange(n), held), held
