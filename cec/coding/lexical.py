"""A lexical prior for the concept bottleneck: TF-IDF over word 1-2-grams and one logistic regression per code.

The concept model answers "is this concept relevant to the note" and misses what a word count sees at once (a
drug name, an eponym, a lab value spelled out). This model reads the note as a bag of n-grams and gives each code
a logit; the bottleneck reads that logit with one shared weight beside the concepts (cec.coding.bottleneck), so
the lexical part of a code's probability is one visible term, and `top_terms` says which n-grams made it.

The vectorizer is scikit-learn's TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
written out (tests check it equals scikit-learn's on real notes): lowercase, tokens of two or more word
characters, smoothed idf, 1 + log(count), rows L2-normalised. The regression is scikit-learn's
LogisticRegression(C) objective (C * log-loss + |w|^2 / 2, intercept not penalised), fitted for all codes at once
with L-BFGS; C is chosen by cross-validated log-loss over the fitting notes. No scikit-learn at run time.
Stored as one safetensors file (weights; vocabulary and settings in its metadata) beside the pipeline.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cec.errors import DataError
from cec.io import atomic_write_bytes

FORMAT = "cec-lexical-1"
TOKEN = re.compile(r"(?u)\b\w\w+\b")
C_GRID = (1.0, 10.0, 100.0)
MIN_DF = 2


def ngrams(text: str) -> list[str]:
    words = TOKEN.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def build_vocabulary(texts: list[str], min_df: int = MIN_DF) -> tuple[list[str], np.ndarray]:
    """(sorted n-grams, their smoothed idf) of the n-grams in at least min_df texts. No cap on their number: 500
    CodiEsp notes have 20k."""
    df = Counter()
    for t in texts:
        df.update(set(ngrams(t)))
    terms = sorted(t for t, d in df.items() if d >= min_df)
    if not terms:
        raise DataError(f"lexical prior: no n-gram occurs in {min_df} of the {len(texts)} fitting notes")
    idf = np.array([math.log((1 + len(texts)) / (1 + df[t])) + 1 for t in terms])
    return terms, idf


def tfidf(texts: list[str], vocabulary: list[str], idf: np.ndarray) -> torch.Tensor:
    """[len(texts), len(vocabulary)] sparse float64 rows: (1 + log count) * idf, L2-normalised."""
    index = {t: i for i, t in enumerate(vocabulary)}
    rows, cols, vals = [], [], []
    for r, text in enumerate(texts):
        c = Counter(g for g in ngrams(text) if g in index)
        v = np.array([(1 + math.log(n)) * idf[index[g]] for g, n in c.items()])
        norm = float(np.sqrt((v ** 2).sum())) or 1.0
        rows += [r] * len(c)
        cols += [index[g] for g in c]
        vals += list(v / norm)
    return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
                                   torch.tensor(vals, dtype=torch.float64), (len(texts), len(vocabulary)),
                                   check_invariants=True).coalesce()


def _fit_regression(x: torch.Tensor, y: torch.Tensor, C: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [vocabulary, codes], intercepts [codes]) minimising C * log-loss + |w|^2 / 2 per code. The gradient
    is written out over CSR copies of x and its transpose: autograd through a COO product costs 4x the time."""
    n = x.shape[0]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the two products below are all it does
        warnings.simplefilter("ignore", UserWarning)
        x_csr, xt_csr = x.to_sparse_csr(), x.t().coalesce().to_sparse_csr()
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    prior = y.mean(0).clamp(0.5 / n, 1 - 0.5 / n)
    b = torch.logit(prior)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():  # the sklearn objective divided by C * n, and its gradient
        z = x_csr @ w + b
        loss = (torch.nn.functional.softplus(z) - y * z).sum() / n + w.square().sum() / (2 * C * n)
        g = (torch.sigmoid(z) - y) / n
        w.grad = xt_csr @ g + w / (C * n)
        b.grad = g.sum(0)
        return loss

    opt.step(closure)
    return w, b


def _folds(n: int, folds: int, seed: int):
    order = np.random.default_rng(seed).permutation(n)
    for k in range(min(folds, n)):
        held = np.sort(order[k::folds])
        yield np.setdiff1d(np.arange(n), held), held


@dataclass
class LexicalPrior:
    codes: list[str]
    vocabulary: list[str]
    idf: np.ndarray  # [vocabulary]
    weights: np.ndarray  # [vocabulary, codes]
    intercept: np.ndarray  # [codes]
    C: float

    def logits(self, texts: list[str]) -> np.ndarray:
        """[len(texts), codes] logits of the texts (as the pipeline reads them)."""
        x = tfidf(texts, self.vocabulary, self.idf)
        return (torch.sparse.mm(x, torch.as_tensor(self.weights, dtype=torch.float64)) + torch.as_tensor(
            self.intercept, dtype=torch.float64)).numpy()

    def top_terms(self, text: str, n: int = 3) -> list[list[tuple[str, float]]]:
        """Per code, the (at most) n n-grams of the text with the largest positive terms in its logit, as (n-gram,
        term), largest first."""
        x = tfidf([text], self.vocabulary, self.idf)
        cols, vals = x.indices()[1].numpy(), x.values().numpy()
        terms = vals[:, None] * self.weights[cols]  # [n-grams of the text, codes]
        out = []
        for j in range(len(self.codes)):
            best = np.argsort(-terms[:, j], kind="stable")[:n]
            out.append([(self.vocabulary[cols[i]], float(terms[i, j])) for i in best if terms[i, j] > 0])
        return out

    @classmethod
    def fit(cls, texts: list[str], y, codes: list[str], C: float | None = None, folds: int = 5,
            seed: int = 0) -> "LexicalPrior":
        """Fit on texts and [texts, codes] 0/1 labels; C=None: chosen from C_GRID by `folds`-fold log-loss."""
        y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
        if y.shape != (len(texts), len(codes)):
            raise DataError(f"lexical prior: {len(texts)} notes but labels of shape {tuple(y.shape)}")
        if C is None:
            C = min(C_GRID, key=lambda c: float(torch.nn.functional.binary_cross_entropy_with_logits(
                torch.as_tensor(cls.out_of_fold(texts, y, codes, c, folds, seed)), y, reduction="sum")))
        vocabulary, idf = build_vocabulary(texts)
        w, b = _fit_regression(tfidf(texts, vocabulary, idf), y, C)
        return cls(list(codes), vocabulary, idf, w.numpy(), b.numpy(), float(C))

    @classmethod
    def out_of_fold(cls, texts: list[str], y, codes: list[str], C: float, folds: int = 5, seed: int = 0
                    ) -> np.ndarray:
        """[texts, codes] logits, each text's from a prior (vocabulary included) fitted on the other folds: what the
        bottleneck fits on for notes the prior itself was fitted on."""
        y = np.asarray(y, dtype=np.float64)
        out = np.zeros(y.shape)
        for rest, held in _folds(len(texts), folds, seed):
            prior = cls.fit([texts[i] for i in rest], y[rest], codes, C)
            out[held] = prior.logits([texts[i] for i in held])
        return out

    # -- files --------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save
        meta = {"format": FORMAT, "codes": json.dumps(self.codes), "vocabulary": json.dumps(self.vocabulary),
                "C": repr(self.C), "ngram_range": "1,2", "sublinear_tf": "true"}
        tensors = {"idf": torch.as_tensor(self.idf, dtype=torch.float64),
                   "weights": torch.as_tensor(self.weights, dtype=torch.float32).contiguous(),
                   "intercept": torch.as_tensor(self.intercept, dtype=torch.float64)}
        atomic_write_bytes(Path(path), save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, codes: list[str]) -> "LexicalPrior":
        from safetensors import SafetensorError, safe_open
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise DataError(f"{path}: not a lexical-prior file (format {meta.get('format')!r})")
                t = {k: f.get_tensor(k) for k in ("idf", "weights", "intercept")}
            file_codes, vocabulary = json.loads(meta["codes"]), json.loads(meta["vocabulary"])
            C = float(meta["C"])
        except FileNotFoundError:
            raise DataError(f"{path}: no such lexical-prior file") from None
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: malformed lexical-prior file ({type(e).__name__}: {e})") from None
        if file_codes != list(codes):
            raise DataError(f"{path}: fitted for other codes than the pipeline's")
        if t["weights"].shape != (len(vocabulary), len(codes)) or t["idf"].shape != (len(vocabulary),):
            raise DataError(f"{path}: weights of shape {tuple(t['weights'].shape)} for {len(vocabulary)} n-grams")
        return cls(file_codes, vocabulary, t["idf"].numpy(), t["weights"].double().numpy(), t["intercept"].numpy(), C)
