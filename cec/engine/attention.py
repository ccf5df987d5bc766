"""Attention: plain causal attention (SDPA) and the two partials of shared-prefix (cascade) attention.

Shapes: q [B, H, T, D], k/v [B, Hkv, S, D]; H is a multiple of Hkv (GQA/MQA).
Masks are boolean, True where a query may see a key. Positions are absolute token positions; sliding windows
(Gemma 2/3) are applied by position, HF's rule: key visible when 0 <= q_pos - k_pos < window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def attend_with_lse(q, k, v, scale: float, mask: torch.Tensor | None, softcap: float | None = None):
    """Attention that also returns the log-sum-exp of each query's scores: (out [B,H,T,D], lse [B,H,T] fp32).

    GQA is handled by folding the heads that share a KV head into the query rows, so K/V are never expanded.
    A query row with no visible key gets lse = -inf and out = 0, so it drops out of a merge.
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    qg = q.reshape(b, hkv, rep * t, d)
    mg = None
    if mask is not None:  # [.., T, S] -> [B or 1, 1 or Hkv, rep*T, S]
        m = mask if mask.dim() == 4 else mask.view(1, 1, *mask.shape)
        mg = m.repeat(1, 1, rep, 1) if rep > 1 else m
    if softcap is None and q.device.type == "cpu":
        bias = None
        if mg is not None:
            bias = torch.zeros(mg.shape, dtype=q.dtype, device=q.device).masked_fill_(~mg, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, k, v, 0.0, False,
                                                                            attn_mask=bias, scale=scale)
        out, lse = out.nan_to_num_(0.0), lse.float()
        if mg is not None:  # the CPU kernel reports lse 0, not -inf, for a row that sees no key
            lse = lse.masked_fill(~mg.any(-1), float("-inf"))
    elif (softcap is None and q.is_cuda and mg is None and d <= 256
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
    """Combine two attention partials over disjoint key sets (the Hydragen / cascade identity)."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1 = torch.exp(lse1 - m).unsqueeze(-1)
    w2 = torch.exp(lse2 - m).unsqueeze(-1)
    out = (w1 * o1.float() + w2 * o2.float()) / (w1 + w2)
    return out.to(o1.dtype)
