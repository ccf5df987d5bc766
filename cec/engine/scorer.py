"""Shared-prefix yes/no scoring: encode a note once, answer many short questions against its KV cache.

For a prefix of P tokens and B questions of L tokens the cost is one pass over P tokens plus B*L question
tokens, instead of B*(P+L). Questions run in batches at positions P..P+L-1; each layer's attention is the
prefix partial (all B*L queries as one block against the one cached prefix, never copied per question) merged
with the causal suffix partial inside each question (attention.cascade_attend), or both in one FlexAttention
call (attention="flex", attention.flex_attend). Compiled kernels (flex, compile=True) want few shapes: batches
then run at fixed shapes (fixed_batches) against a prefix padded to a power of two (prefix_slots).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from cec.engine.attention import allow_recompiles
from cec.engine.cache import KVCache
from cec.engine.heads import YesNoHead
from cec.engine.model import Transformer

ATTENTION = ("cascade", "flex")


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


def bucket(n: int, least: int = 8) -> int:
    """The least of least * 2**k and 1.5 * least * 2**k that holds n (a third of it padding at most)."""
    b = least
    while n > b:
        if n <= b * 3 // 2:
            return b * 3 // 2
        b *= 2
    return b


def fixed_batches(lengths: list[int], max_tokens: int, max_batch: int) -> list[tuple[list[int], int, int]]:
    """Indices in batches of a few fixed shapes, as (indices, rows, width): widths rounded up to a bucket, each
    width's questions in batches of its full row count (the token budget, at most max_batch), the last one's rows
    rounded up to a power of two. Rows past len(indices) are padding."""
    by_width: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        by_width.setdefault(bucket(lengths[i]), []).append(i)
    out = []
    for width, idx in by_width.items():
        full = max(1, min(max_batch, max_tokens // width))
        for s in range(0, len(idx), full):
            part = idx[s: s + full]
            out.append((part, min(full, 1 << (len(part) - 1).bit_length()), width))
    return out


def prefix_slots(n: int) -> int:
    """The cache length a prefix of n tokens gets at fixed shapes: a power of two, 256 at least, so that the shapes
    are few. FlexAttention skips the padding slots' blocks; cascade attention masks them (compile=True only)."""
    return max(256, 1 << (n - 1).bit_length())


_COMPILED = {}  # mode -> Transformer.forward compiled, once per process for every model
_RUN_SHAPES = set()  # (model, attention, compile, batch shape) run so far in this process


def compiled_forward(device: torch.device):
    """Transformer.forward compiled for one fixed shape per graph (dynamic=False: the CPU FlexAttention kernel does
    not compile with dynamic shapes), as CUDA graphs on a GPU."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    if mode not in _COMPILED:
        allow_recompiles()
        _COMPILED[mode] = torch.compile(Transformer.forward, dynamic=False, mode=mode)
    return _COMPILED[mode]


@dataclass
class ScoreStats:
    prefix_tokens: int = 0
    shared_question_tokens: int = 0  # common question text moved into the prefix
    questions: int = 0
    question_tokens: int = 0  # tokens run, padding included
    batches: int = 0
    seconds: dict = field(default_factory=dict)  # prefill, questions (compile_seconds apart), total
    compile_seconds: float = 0.0  # the first batch of each fixed shape new to the process: compiling, and running it
    shapes: int = 0  # fixed batch shapes run


class PrefixScorer:
    """Scores yes/no questions that all follow one shared prefix.

    score(prefix_ids, questions) -> float32 scores l_yes - l_no, one per question; P(yes) = sigmoid(score).
    score(prefix_ids, questions, hide) -> the same with hide[i] = (start, end) prefix token positions, or a list of
    such ranges, that question i may not attend to (None: sees all); a mask in the prefix partial, the prefix is
    still encoded once.

    attention: how the question tokens read the prefix, "cascade" (two partials merged; the reference and the
    default, with no compile cost) or "flex" (one FlexAttention call per layer, its kernel compiled: it skips
    the prefix blocks a sliding window does not reach, so it gains with long prefixes).
    compile: run the layer stack compiled (torch.compile; CUDA graphs on a GPU). Either of flex and compile runs
    batches at fixed shapes (fixed_batches, prefix_slots); the first batch of each new shape compiles (once per
    process; minutes on a CPU) and is timed apart, in stats.compile_seconds. Every path gives the same scores,
    to rounding.
    """

    def __init__(self, model: Transformer, head: YesNoHead, *, batch_tokens: int = 4096, max_batch: int = 256,
                 chunk: int = 1024, share_question_prefix: bool = True, pad_id: int = 0,
                 attention: str = "cascade", compile: bool = False, keep_last: bool = False):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, not {attention!r}")
        self.model, self.head = model, head
        self.batch_tokens, self.max_batch, self.chunk = batch_tokens, max_batch, chunk
        self.share_question_prefix, self.pad_id = share_question_prefix, pad_id
        self.attention, self.compile = attention, compile
        self.fixed_shapes = compile or attention == "flex"
        self.stats = ScoreStats()
        # keep_last: the last prefilled cache is kept, and a call with the same prefix ids (the shared question
        # tokens included) reuses it instead of prefilling again. Only for a model whose weights do not change.
        self.keep_last = keep_last
        self._last: tuple[tuple[int, ...], KVCache] | None = None

    @torch.no_grad()
    def encode_prefix(self, prefix_ids: list[int], extra: int = 0) -> KVCache:
        n = len(prefix_ids) + extra
        cache = self.model.new_cache(prefix_slots(n) if self.fixed_shapes else n)
        self.model.prefill(prefix_ids, chunk=self.chunk, cache=cache)
        return cache

    def shared_len(self, questions: list[list[int]]) -> int:
        """How many leading tokens, common to all the questions, an unhidden score call moves into the prefix."""
        return common_prefix_len(questions) if self.share_question_prefix else 0

    def forget(self) -> None:
        """Drop the kept cache (keep_last): the next call prefills, e.g. to time a coding from scratch."""
        self._last = None

    def prefilled(self, prefix_ids: list[int]) -> KVCache:
        """The cache of prefix_ids: the kept one when it holds exactly these ids (keep_last), else prefilled."""
        key = tuple(prefix_ids)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        cache = self.encode_prefix(list(prefix_ids))
        self._last = (key, cache) if self.keep_last else None
        return cache

    @torch.no_grad()
    def score(self, prefix_ids: list[int], questions: list[list[int]],
              hide: list | None = None) -> torch.Tensor:
        if not questions:
            return torch.empty(0)
        if any(len(q) == 0 for q in questions):
            raise ValueError("every question needs at least one token")
        if hide is not None and not any(hide):
            hide = None
        t0 = time.perf_counter()
        # shared question tokens would go into the cache having read the hidden keys: none shared with hide
        shared = self.shared_len(questions) if hide is None else 0
        cache = self.prefilled(list(prefix_ids) + list(questions[0][:shared]))
        t1 = time.perf_counter()
        scores = self.score_cached(cache, [q[shared:] for q in questions], hide)
        t2 = time.perf_counter()
        st = self.stats
        st.prefix_tokens, st.shared_question_tokens = len(prefix_ids), shared
        st.seconds = {"prefill": t1 - t0, "questions": t2 - t1 - st.compile_seconds, "total": t2 - t0}
        return scores

    @torch.no_grad()
    def score_cached(self, cache: KVCache, questions: list[list[int]],
                     hide: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """Scores of questions (already stripped of anything in the cache) against a prefilled cache."""
        dev = self.model.device
        prefix = cache.as_prefix(whole=self.fixed_shapes)
        lengths = [len(q) for q in questions]
        out = torch.empty(len(questions), dtype=torch.float32, device=dev)
        if self.fixed_shapes:
            batches = fixed_batches(lengths, self.batch_tokens, self.max_batch)
        else:
            batches = [(idx, len(idx), max(lengths[i] for i in idx))
                       for idx in batches_by_length(lengths, self.batch_tokens, self.max_batch)]
        n_tok = n_batch = 0
        compiling, shapes = 0.0, set()
        forward = self.model
        if self.compile:
            t, fresh = time.perf_counter(), not _COMPILED
            forward = partial(compiled_forward(dev), self.model)
            if fresh:  # the first one imports the compiler
                compiling = time.perf_counter() - t
        for idx, rows, width in batches:
            ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
            last = torch.zeros(rows, dtype=torch.long)  # padding rows keep their first token
            for row, i in enumerate(idx):  # right padding: causal attention keeps real tokens blind to it
                ids[row, : lengths[i]] = torch.tensor(questions[i])
                last[row] = lengths[i] - 1
            ids, last = ids.to(dev), last.to(dev)
            seen = None
            if hide is not None and any(hide[i] for i in idx):
                seen = visible(prefix.positions.shape[0], [hide[i] for i in idx] + [None] * (rows - len(idx)), dev)
            # a hidden range adds masks to cascade attention; flex reads a visibility tensor either way
            shape = (id(self.model), self.attention, self.compile, rows, width, prefix.positions.shape[0],
                     seen is not None and self.attention == "cascade")
            t = time.perf_counter()
            plan = self.model.plan(ids, prefix=prefix, prefix_visible=seen, last=last, attention=self.attention,
                                   trim=not self.fixed_shapes)
            h_last = forward(ids, plan=plan, final_norm=False)[: len(idx), 0]
            out[torch.tensor(idx, device=dev)] = self.head.scores(h_last)
            if self.fixed_shapes and shape not in _RUN_SHAPES:
                _RUN_SHAPES.add(shape)
                compiling += time.perf_counter() - t
            shapes.add(shape)
            n_tok += ids.numel()
            n_batch += 1
        st = self.stats
        st.questions, st.question_tokens, st.batches = len(questions), n_tok, n_batch
        st.shapes, st.compile_seconds = len(shapes) if self.fixed_shapes else 0, compiling
        return out.float().cpu()


def visible(length: int, hide: list, device=None) -> torch.Tensor:
    """[len(hide), length] bool: False on each row's hidden range(s): a (start, end) pair, a list of them, or None."""
    seen = torch.ones(len(hide), length, dtype=torch.bool, device=device)
    for row, h in enumerate(hide):
        for a, b in ([h] if h and isinstance(h[0], int) else h or ()):
            seen[row, a:b] = False
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
