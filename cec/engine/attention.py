"""Attention: plain causal attention (SDPA) and shared-prefix attention, as two partials merged (cascade) or as
one FlexAttention call with a block mask (flex).

Shapes: q [B, H, T, D], k/v [B, Hkv, S, D]; H is a multiple of Hkv (GQA/MQA).
Masks are boolean, True where a query may see a key. Positions are absolute token positions; sliding windows
(Gemma 2/3) are applied by position, HF's rule: key visible when 0 <= q_pos - k_pos < window.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

FLEX_BLOCK = 128  # FlexAttention's block of queries and of keys: the unit in which masked work is skipped


@dataclass(frozen=True)
class LayerMasks:
    """What the queries of one layer kind (one sliding window) may see; built once per forward (model.ForwardPlan).
    attn [B or 1, 1, Tq, S]: their own attention (this call's keys, or all cached ones); None = causal over this
    call's own tokens, which SDPA does by index. prefix [B*Tq, P - prefix_start]: the shared prefix keys each query
    sees in cascade attention, from slot prefix_start on; None = all of them. block: in place of both, the block
    mask of flex_attend."""
    attn: torch.Tensor | None
    prefix: torch.Tensor | None = None
    block: BlockMask | None = None
    prefix_start: int = 0  # the first prefix slot any query's window reaches: the slots before it are not read

    @cached_property
    def prefix_bias(self) -> torch.Tensor:
        """prefix as an additive mask, made once per forward for every layer of this window (the CPU kernel takes
        no bool mask; building it per layer was a third of the masked prefix partial's time)."""
        return additive_mask(self.prefix)


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., Tq, Tk] bool: causal by position, and inside the sliding window when there is one."""
    diff = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)
    ok = diff >= 0
    if window is not None:
        ok = ok & (diff < window)
    return ok


def attend(q, k, v, scale: float, mask: torch.Tensor | None, softcap: float | None = None) -> torch.Tensor:
    """Softmax attention; mask None means plain causal with aligned positions."""
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] > 1, scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    out, _ = attend_with_lse(q, k, v, scale, mask if mask is not None else _causal(q, k), softcap)
    return out


def _causal(q, k):
    tq, tk = q.shape[-2], k.shape[-2]
    return torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)


def additive_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """A bool mask (True = visible) as the additive one (0 / -inf) the CPU flash kernel takes."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _cpu_flash(q, softcap) -> bool:
    return softcap is None and q.device.type == "cpu"


def attend_with_lse(q, k, v, scale: float, mask: torch.Tensor | None, softcap: float | None = None,
                    bias: torch.Tensor | None = None):
    """Attention that also returns the log-sum-exp of each query's scores: (out [B,H,T,D], lse [B,H,T] fp32).

    GQA: K/V are never copied per query head. On CPU the heads that share a KV head read it through a stride-0
    view and the mask [B or 1, 1, T, S] broadcasts over them; elsewhere those heads are folded into the query rows.
    bias: the mask already made additive (additive_mask), for the CPU kernel, when the caller keeps it across layers.
    A query row with no visible key gets lse = -inf and out = 0, so it drops out of a merge.
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    m = None if mask is None else (mask if mask.dim() == 4 else mask.view(1, 1, *mask.shape))
    if _cpu_flash(q, softcap):  # [B*Hkv, rep, T, D] against K/V [B*Hkv, 1 -> rep, S, D]
        s_len = k.shape[2]
        kg = k.reshape(b * hkv, 1, s_len, d).expand(-1, rep, -1, -1)
        vg = v.reshape(b * hkv, 1, s_len, d).expand(-1, rep, -1, -1)
        if m is None:
            bias = None
        else:  # the caller's additive mask has the bool mask's shape
            bias = additive_mask(m, q.dtype) if bias is None else bias.to(q.dtype).view(m.shape)
            if bias.shape[0] > 1 and hkv > 1:  # one mask per sequence: repeated for each of its KV heads
                bias = bias.repeat_interleave(hkv, 0)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.reshape(b * hkv, rep, t, d), kg, vg, 0.0, False, attn_mask=bias, scale=scale)
        out, lse = out.nan_to_num_(0.0).reshape(b, h, t, d), lse.float().reshape(b, h, t)
        if m is not None:  # the CPU kernel reports lse 0, not -inf, for a row that sees no key
            lse = lse.masked_fill(~m.any(-1), float("-inf"))
        return out, lse
    qg = q.reshape(b, hkv, rep * t, d)
    mg = None
    if m is not None:  # [.., T, S] -> [B or 1, 1 or Hkv, rep*T, S]
        mg = m.repeat(1, 1, rep, 1) if rep > 1 else m
    if (softcap is None and q.is_cuda and mg is None and d <= 256
            and q.dtype in (torch.float16, torch.bfloat16)):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qg, k, v, 0.0, False, False, scale=scale)[:2]
        lse = lse[..., : rep * t].float()
    else:
        s = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if mg is not None:
            s = s.masked_fill(~mg, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
        out = torch.matmul(p.to(v.dtype), v)
    return out.reshape(b, h, t, d), lse.reshape(b, h, t)


def merge_partials(o1, lse1, o2, lse2):
    """Combine two attention partials over disjoint key sets (the Hydragen / cascade identity): the share of the
    first is exp(lse1) / (exp(lse1) + exp(lse2)) = sigmoid(lse1 - lse2), so the merge is one lerp, in fp32. A row
    that sees no key in either (both lse -inf) gets the mean of the two zero outputs."""
    share = torch.sigmoid(lse1.float() - lse2.float()).nan_to_num_(0.5).unsqueeze(-1)
    return torch.lerp(o2.float(), o1.float(), share).to(o1.dtype)


def cascade_attend(q, k, v, prefix_k, prefix_v, scale: float, masks: LayerMasks, softcap: float | None = None):
    """B questions q [B, H, L, D] with their own k/v [B, Hkv, L, D] after one shared prefix [1, Hkv, P, D]:
    the prefix partial (all B*L queries as one block, so the prefix K/V are never copied per question), the
    suffix partial inside each question, merged. masks.attn must be explicit: attend_with_lse has no causal
    default."""
    b, h, t, d = q.shape
    qf = q.transpose(0, 1).reshape(1, h, b * t, d)
    if masks.prefix_start:  # a sliding window that no longer reaches the start of the prefix: read the rest only
        prefix_k, prefix_v = prefix_k[:, :, masks.prefix_start:], prefix_v[:, :, masks.prefix_start:]
    bias = masks.prefix_bias if masks.prefix is not None and _cpu_flash(q, softcap) else None
    o_p, lse_p = attend_with_lse(qf, prefix_k, prefix_v, scale, masks.prefix, softcap, bias)
    o_p = o_p.view(h, b, t, d).transpose(0, 1)
    lse_p = lse_p.view(h, b, t).transpose(0, 1)
    o_s, lse_s = attend_with_lse(q, k, v, scale, masks.attn, softcap)
    return merge_partials(o_p, lse_p, o_s, lse_s)


@dataclass(frozen=True)
class QuestionLayout:
    """Where the queries and keys of flex_attend sit. The keys are one sequence: the shared prefix, then every
    question's own tokens, question after question. Query i is a token of question q_row[i] at position q_pos[i];
    key j is at k_pos[j], of question k_row[j] (-1: the prefix, which every question may read)."""
    q_row: torch.Tensor  # [Tq] long
    q_pos: torch.Tensor  # [Tq] long
    k_row: torch.Tensor  # [P + S] long
    k_pos: torch.Tensor  # [P + S] long
    visible: torch.Tensor  # [B, P + S] bool: the keys each question may read (prefix hide ranges)

    @classmethod
    def of(cls, positions: torch.Tensor, prefix_positions: torch.Tensor,
           prefix_visible: torch.Tensor | None = None) -> "QuestionLayout":
        """B questions at positions [B, T] after a prefix at prefix_positions [P]; prefix_visible [B, P] or None."""
        b, t = positions.shape
        dev = positions.device
        rows = torch.arange(b, device=dev).repeat_interleave(t)
        p = prefix_positions.shape[0]
        if prefix_visible is None:
            visible = torch.ones(b, p + b * t, dtype=torch.bool, device=dev)
        else:
            visible = torch.cat([prefix_visible, prefix_visible.new_ones(b, b * t)], 1)
        return cls(rows, positions.reshape(-1), torch.cat([rows.new_full((p,), -1), rows]),
                   torch.cat([prefix_positions, positions.reshape(-1)]), visible)

    def keep(self, rows: torch.Tensor) -> "QuestionLayout":
        """One query per question, rows [B]: the token at index rows[i] of question i; the keys unchanged."""
        b = rows.shape[0]
        sel = torch.arange(b, device=rows.device)
        return QuestionLayout(sel, self.q_pos.view(b, -1)[sel, rows], self.k_row, self.k_pos, self.visible)

    def mask_mod(self, window: int | None):
        """FlexAttention's mask_mod: a key of the prefix or of the query's own question, visible to its question,
        causal by position and inside the window. Every value it reads is a tensor, so one compiled kernel serves
        every window and every visibility."""
        q_row, q_pos, k_row, k_pos, visible = self.q_row, self.q_pos, self.k_row, self.k_pos, self.visible
        reach = torch.tensor(window or torch.iinfo(torch.long).max, device=q_pos.device)

        def mask(b, h, qi, ki):
            d = q_pos[qi] - k_pos[ki]
            return ((d >= 0) & (d < reach) & ((k_row[ki] == q_row[qi]) | (k_row[ki] < 0))
                    & visible[q_row[qi], ki])
        return mask

    def block_mask(self, window: int | None, block: int = FLEX_BLOCK) -> BlockMask:
        """The BlockMask of mask_mod(window), decided per block pair from the ranges of rows and positions in each
        block (no dense [Tq, P + S] mask is built, no value is read back to the host). A pair is full where every
        query-key pair passes, skipped where none can, and masked element by element otherwise."""
        q_row, q_pos = _blocks(self.q_row, block), _blocks(self.q_pos, block)  # [nq, block]
        k_row, k_pos = _blocks(self.k_row, block), _blocks(self.k_pos, block)  # [nk, block]
        q_lo, q_hi = q_pos.amin(1)[:, None], q_pos.amax(1)[:, None]
        k_lo, k_hi = k_pos.amin(1)[None], k_pos.amax(1)[None]
        some, full = q_hi - k_lo >= 0, q_lo - k_hi >= 0  # by the range of q_pos - k_pos
        if window is not None:
            some, full = some & (q_lo - k_hi < window), full & (q_hi - k_lo < window)
        qr_lo, qr_hi = q_row.amin(1)[:, None], q_row.amax(1)[:, None]
        kr_lo, kr_hi = k_row.amin(1)[None], k_row.amax(1)[None]
        some = some & ((kr_lo < 0) | ((qr_lo <= kr_hi) & (kr_lo <= qr_hi)))  # prefix keys, or rows that overlap
        full = full & ((kr_hi < 0) | ((qr_lo == qr_hi) & (kr_lo == kr_hi) & (qr_lo == kr_lo)))
        seen = _blocks(self.visible.T, block).transpose(0, 2)  # [B, block, nk]
        some = some & seen.any(1)[q_row].any(1)
        full = full & seen.all(1)[q_row].all(1)
        return BlockMask.from_kv_blocks(*_ordered(some & ~full), *_ordered(full), BLOCK_SIZE=block,
                                        mask_mod=self.mask_mod(window),
                                        seq_lengths=(self.q_row.shape[0], self.k_row.shape[0]))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[N, ...] -> [ceil(N / block), block, ...], the last block filled with copies of the last entry (which
    leave every block's min, max, any and all as they are)."""
    pad = -x.shape[0] % block
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
    return x.view(-1, block, *x.shape[1:])


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nq, nk] bool -> BlockMask's (number of key blocks per query block [1, 1, nq], their indices first)."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None], idx[None, None]


def allow_recompiles(limit: int = 256):
    """Every fixed shape is one more compiled entry of the same function; past dynamo's default limit (8) it would
    run eagerly without a word, and eager flex_attention is the dense reference."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


_COMPILED_FLEX = []


def _flex_kernel():
    """flex_attention compiled, made once per process: the fused, block-sparse kernel (dynamic=False: on CPU it
    does not compile with dynamic shapes). Run eagerly, flex_attention is its dense reference; inside a compiled
    stack it is compiled with the stack."""
    if torch.compiler.is_compiling():
        return flex_attention
    if not _COMPILED_FLEX:
        allow_recompiles()
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0]


def flex_attend(q, k, v, prefix_k, prefix_v, scale: float, block_mask: BlockMask, softcap: float | None = None,
                kernel=None):
    """cascade_attend in one FlexAttention call: the queries q [B, H, Tq, D] of B questions (all tokens, or one
    row each), flattened into one sequence, against the keys of QuestionLayout: the prefix [1, Hkv, P, D] once,
    then the questions' own k/v [B, Hkv, L, D] one after the other. block_mask (QuestionLayout.block_mask) keeps
    each query to the keys its question sees. kernel: flex_attention to run the dense reference eagerly."""
    b, h, tq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    qf = q.transpose(0, 1).reshape(1, h, b * tq, d)
    kf = torch.cat([prefix_k, k.transpose(0, 1).reshape(1, hkv, b * t, d)], 2)
    vf = torch.cat([prefix_v, v.transpose(0, 1).reshape(1, hkv, b * t, d)], 2)
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, qi, ki):
            return torch.tanh(score / softcap) * softcap
    o = (kernel or _flex_kernel())(qf, kf, vf, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                  enable_gqa=h != hkv)
    return o.view(h, b, tq, d).transpose(0, 1)
