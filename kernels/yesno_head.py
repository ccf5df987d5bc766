"""Fused yes/no head: final RMSNorm + gather of the answer rows + dot products + soft-cap + log-sum-exp per side.

One program handles BLOCK_N hidden rows: a first pass over H sums the squares, a second normalizes each chunk and
accumulates its dot products with every answer row, so the normed hidden never goes to memory and no
full-vocabulary logits exist. Everything is computed in fp32 after each load; where the model runs in 16-bit the
kernel rounds where HF's reference rounds (the normed hidden, Llama's weight product, the logits, each soft-cap
step), so bf16 scores agree with `cec.engine.heads.yes_no_scores_reference` to within accumulation order.
`llama_norm` is the model's cast rule (ModelConfig.llama_norm), with any norm offset. The reference lives in
`cec/engine/heads.py`; tests compare the two under TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # libdevice.tanh does not run in the interpreter; this form never overflows
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _yes_no_kernel(
    x_ptr, w_ptr, rows_ptr, ids_ptr, out_ptr,
    N, stride_xn, stride_row,
    H: tl.constexpr, N_YES: tl.constexpr, N_IDS: tl.constexpr,  # constant per model and head: fewer
    EPS: tl.constexpr, NORM_OFFSET: tl.constexpr, SOFTCAP_VALUE: tl.constexpr,  # runtime args, faster launch
    LLAMA_NORM: tl.constexpr, SOFTCAP: tl.constexpr,
    ROUND_NORM: tl.constexpr, ROUND_WEIGHT: tl.constexpr, ROUND_PROD: tl.constexpr, ROUND_LOGIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < N_IDS
    ids = tl.load(ids_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    x_base = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn
    r_base = rows_ptr + ids[:, None] * stride_row

    sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_base + offs_h[None, :], mask=mask_n[:, None] & (offs_h[None, :] < H), other=0.0)
        x = x.to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    rstd = 1.0 / tl.sqrt(sum_sq / H + EPS)

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(x_base + offs_h[None, :], mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        x = x.to(tl.float32)
        w = tl.load(w_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32) + NORM_OFFSET
        normed = x * rstd[:, None]
        if LLAMA_NORM:  # cast to the input dtype, then times (offset + w) in the weight's dtype
            if ROUND_NORM:
                normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
            if ROUND_WEIGHT:
                w = w.to(w_ptr.dtype.element_ty).to(tl.float32)
            normed = normed * w[None, :]
            if ROUND_PROD:
                normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        else:  # times (offset + w) in fp32, then cast to the input dtype
            normed = normed * w[None, :]
            if ROUND_NORM:
                normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        r = tl.load(r_base + offs_h[None, :], mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        r = r.to(tl.float32)
        acc += tl.sum(normed[:, None, :] * r[None, :, :], axis=2)

    logits = acc
    if ROUND_LOGIT:
        logits = logits.to(rows_ptr.dtype.element_ty).to(tl.float32)
    if SOFTCAP:  # tanh(l / cap) * cap, rounded after each step like HF does in the model dtype
        logits = logits / SOFTCAP_VALUE
        if ROUND_LOGIT:
            logits = logits.to(rows_ptr.dtype.element_ty).to(tl.float32)
        logits = _tanh(logits)
        if ROUND_LOGIT:
            logits = logits.to(rows_ptr.dtype.element_ty).to(tl.float32)
        logits = logits * SOFTCAP_VALUE
        if ROUND_LOGIT:
            logits = logits.to(rows_ptr.dtype.element_ty).to(tl.float32)

    is_yes = (offs_k < N_YES)[None, :]
    is_no = ((offs_k >= N_YES) & mask_k)[None, :]
    yes = tl.where(is_yes, logits, float("-inf"))
    no = tl.where(is_no, logits, float("-inf"))
    yes_max = tl.max(yes, axis=1)
    no_max = tl.max(no, axis=1)
    lse_yes = yes_max + tl.log(tl.sum(tl.exp(yes - yes_max[:, None]), axis=1))
    lse_no = no_max + tl.log(tl.sum(tl.exp(no - no_max[:, None]), axis=1))
    tl.store(out_ptr + offs_n, lse_yes - lse_no, mask=mask_n)


def yes_no_head(hidden: torch.Tensor, norm_weight: torch.Tensor, out_weight: torch.Tensor, ids: torch.Tensor,
                n_yes: int, *, eps: float, norm_offset: float, softcap: float | None, llama_norm: bool,
                block_n: int | None = None, block_h: int | None = None, num_warps: int = 1) -> torch.Tensor:
    """Scores [N] float32 for pre-final-norm hidden [N, H]. `ids` (int32, on the device) holds the yes ids then
    the no ids as rows of `out_weight` [V, H] (the full output matrix, or rows gathered once beforehand).
    Default blocks were tuned on an H100 (bf16, H=4096, 6 ids): one row per program and 512-wide chunks for up
    to ~1000 rows (21 us, launch-bound, for 1 or 375 rows), four rows per program beyond."""
    n, h = hidden.shape
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    norm_weight = norm_weight.contiguous()
    if out_weight.stride(-1) != 1:
        out_weight = out_weight.contiguous()
    n_ids = ids.numel()
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    # HF's dtypes at each step (see cec.engine.heads): 16-bit results are rounded where the reference rounds them
    norm_dtype = hidden.dtype if not llama_norm else torch.promote_types(hidden.dtype, norm_weight.dtype)
    logit_dtype = torch.promote_types(norm_dtype, out_weight.dtype)
    block_k = max(2, triton.next_power_of_2(n_ids))
    block_n = block_n or (1 if n < 1024 else 4)
    block_h = block_h or min(512, max(64, 4096 // block_k), triton.next_power_of_2(h))
    grid = (triton.cdiv(n, block_n),)
    _yes_no_kernel[grid](
        hidden, norm_weight, out_weight, ids, out,
        n, hidden.stride(0), out_weight.stride(0),
        H=h, N_YES=n_yes, N_IDS=n_ids, EPS=float(eps), NORM_OFFSET=float(norm_offset),
        SOFTCAP_VALUE=float(softcap or 0.0),
        LLAMA_NORM=llama_norm, SOFTCAP=bool(softcap),
        ROUND_NORM=hidden.dtype != torch.float32,
        ROUND_WEIGHT=bool(norm_offset) and norm_weight.dtype != torch.float32,
        ROUND_PROD=norm_dtype != torch.float32,
        ROUND_LOGIT=logit_dtype != torch.float32,
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out
