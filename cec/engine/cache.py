"""Shared-prefix yes/no scoring: encode a note once, answer many short questions against its KV cache.

For a prefix of P tokens and B questions of L tokens the cost is one pass over P tokens plus B*L question
tokens, instead of B*(P+L). Questions run in batches at positions P..P+L-1; each layer's attention is the
prefix partial (all B*L queries as one block against the one cached prefix, never copied per question) merged
with the causal suffix partial inside each question (model.Attention, attention.merge_partials).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cec.engine.heads import YesNoHead
from cec.engine.model import KVCache, Transformer


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of all sequences, leaving at least one token in each."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for i in range(max(n, 0)):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return max(n, 0)


def batches_by_length(lengths: list[int], max_tokens: int, max_batch: int,
                      max_padding: float = 0.05) -> list[list[int]]:
    """Indices grouped so that padding is small: sorted by length, each batch within a padded token budget, and a
    new batch started where taking the next (longer) question would make padding over `max_padding` of it."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur, real = [], [], 0
    for i in order:  # ascending, so the current length is the batch's padded length
        padded = (len(cur) + 1) * lengths[i]
        if cur and (padded > max_tokens or len(cur) == max_batch or padded - real - lengths[i] > max_padding * padded):
            out.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        out.append(cur)
    return out


@dataclass
class ScoreStats:
    prefix_tokens: int = 0
    shared_question_tokens: int = 0  # common question text moved into the prefix
    questions: int = 0
    question_tokens: int = 0  # tokens run, padding included
    batches: int = 0
    seconds: dict = field(default_factory=dict)


class PrefixScorer:
    """Scores yes/no questions that all follow one shared prefix.

    score(prefix_ids, questions) -> float32 scores l_yes - l_no, one per question; P(yes) = sigmoid(score).
    score(prefix_ids, questions, hide) -> the same with hide[i] = (start, end) prefix token positions that
    question i may not attend to (None: sees all); a mask in the prefix partial, the prefix is still encoded once.
    """

    def __init__(self, model: Transformer, head: YesNoHead, *, batch_tokens: int = 4096, max_batch: int = 256,
                 chunk: int = 1024, share_question_prefix: bool = True, pad_id: int = 0):
        self.model, self.head = model, head
        self.batch_tokens, self.max_batch, self.chunk = batch_tokens, max_batch, chunk
        self.share_question_prefix, self.pad_id = share_question_prefix, pad_id
        self.stats = ScoreStats()

    @torch.no_grad()
    def encode_prefix(self, prefix_ids: list[int], extra: int = 0) -> KVCache:
        cache = self.model.new_cache(len(prefix_ids) + extra)
        self.model.prefill(prefix_ids, chunk=self.chunk, cache=cache)
        return cache

    @torch.no_grad()
    def score(self, prefix_ids: list[int], questions: list[list[int]],
              hide: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
        if not questions:
            return torch.empty(0)
        if any(len(q) == 0 for q in questions):
            raise ValueError("every question needs at least one token")
        if hide is not None and not any(hide):
            hide = None
        t0 = time.perf_counter()
        # shared question tokens would go into the cache having read the hidden keys: none shared with hide
        shared = common_prefix_len(questions) if self.share_question_prefix and hide is None else 0
        cache = self.encode_prefix(list(prefix_ids) + list(questions[0][:shared]))
        t1 = time.perf_counter()
        scores = self.score_cached(cache, [q[shared:] for q in questions], hide)
        t2 = time.perf_counter()
        st = self.stats
        st.prefix_tokens, st.shared_question_tokens = len(prefix_ids), shared
        st.seconds = {"prefill": t1 - t0, "questions": t2 - t1, "total": t2 - t0}
        return scores

    @torch.no_grad()
    def score_cached(self, cache: KVCache, questions: list[list[int]],
                     hide: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """Scores of questions (already stripped of anything in the cache) against a prefilled cache."""
        dev = self.model.device
        lengths = [len(q) for q in questions]
        out = torch.empty(len(questions), dtype=torch.float32, device=dev)
        n_tok = n_batch = 0
        for idx in batches_by_length(lengths, self.batch_tokens, self.max_batch):
            width = max(lengths[i] for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            for row, i in enumerate(idx):  # right padding: causal attention keeps real tokens blind to it
                ids[row, : lengths[i]] = torch.tensor(questions[i])
            ids = ids.to(dev)
            last = torch.tensor([lengths[i] - 1 for i in idx], device=dev)
            seen = None
            if hide is not None and any(hide[i] for i in idx):
                seen = visible(cache.length, [hide[i] for i in idx], dev)
            h_last = self.model(ids, prefix=cache, final_norm=False, last=last, prefix_mask=seen)[:, 0]
            out[torch.tensor(idx, device=dev)] = self.head.scores(h_last)
            n_tok += ids.numel()
            n_batch += 1
        self.stats.questions, self.stats.question_tokens, self.stats.batches = len(questions), n_tok, n_batch
        return out.float().cpu()


def visible(length: int, hide: list[tuple[int, int] | None], device=None) -> torch.Tensor:
    """[len(hide), length] bool: False on each row's hidden (start, end) range."""
    seen = torch.ones(len(hide), length, dtype=torch.bool, device=device)
    for row, h in enumerate(hide):
        if h is not None:
            seen[row, h[0]: h[1]] = False
    return seen


@torch.no_grad()
def score_naive(model: Transformer, head: YesNoHead, prefix_ids: list[int], questions: list[list[int]],
                batch_tokens: int = 8192, pad_id: int = 0,
                hide: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """The baseline: every question re-encodes the whole prefix (batched, right-padded). Same scores.
    hide: as PrefixScorer.score, an explicit attention mask keeping the question tokens off those prefix keys."""
    seqs = [list(prefix_ids) + list(q) for q in questions]
    lengths = [len(s) for s in seqs]
    out = torch.empty(len(seqs), dtype=torch.float32)
    dev = model.device
    for idx in batches_by_length(lengths, batch_tokens, 1 << 30):
        width = max(lengths[i] for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : lengths[i]] = torch.tensor(seqs[i])
        last = torch.tensor([lengths[i] - 1 for i in idx], device=dev)
        mask = None
        if hide is not None and any(hide[i] for i in idx):
            # causal, and the rows from len(prefix) on (the question) blind to their hidden prefix keys
            mask = torch.ones(len(idx), width, width, dtype=torch.bool).tril()
            mask[:, len(prefix_ids):, : len(prefix_ids)] &= visible(len(prefix_ids), [hide[i] for i in idx])[:, None]
            mask = mask.to(dev)
        out[torch.tensor(idx)] = head.scores(model(ids.to(dev), mask=mask, final_norm=False, last=last)[:, 0]
                                             ).float().cpu()
    return out


def head_for(model: Transformer, yes_ids, no_ids) -> YesNoHead:
    return YesNoHead.from_config(model.config, model.model.norm.weight, model.lm_head.weight, yes_ids, no_ids)
