"""One Transformer for Llama 3.x and Gemma 1/2/3, with HF module names and numerics.

Family differences are flags of ModelConfig (see config.py). Three ways to run attention:
- plain: a whole sequence, causal (optionally with an extra block mask, for packed training);
- cache: incremental decoding and chunked prefill against a KVCache;
- prefix: questions [B, L] against one shared prefix KVCache (cascade attention; see cache.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cec.engine.attention import attend, attend_with_lse, merge_partials, position_mask
from cec.engine.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: scale in fp32 by (1 + w), then cast
            return (h * (self.offset + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)  # Llama: cast first, then scale in the weight dtype


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if not scaling:
        return inv
    if scaling["rope_type"] == "linear":
        return inv / scaling["factor"]
    # llama3: divide low frequencies by factor, keep high ones, interpolate between
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class LayerMasks:
    attn: torch.Tensor | None  # plain/cache attention, or the suffix partial in prefix mode; None = causal
    prefix: torch.Tensor | None = None  # prefix partial [B*L, P]; None = every prefix key visible


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.idx, self.nh, self.nkv, self.hd = idx, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset)

    def forward(self, x, cos, sin, masks: LayerMasks, cache=None, prefix=None, rows=None):
        """rows [B]: only these positions (one per sequence) need an output; the others still give K/V."""
        b, t, _ = x.shape
        if rows is not None:
            masks, (cos_q, sin_q) = _select_rows(masks, rows, t, x.device), _rope_rows(cos, sin, rows)
            q = self.q_proj(x[torch.arange(b, device=x.device), rows].unsqueeze(1)).view(b, 1, self.nh, self.hd)
        else:
            cos_q, sin_q = cos, sin
            q = self.q_proj(x).view(b, t, self.nh, self.hd)
        tq = q.shape[1]
        k = self.k_proj(x).view(b, t, self.nkv, self.hd)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos_q + rotate_half(q) * sin_q
        k = k * cos + rotate_half(k) * sin
        t = tq
        if prefix is not None:
            # every question token against the one shared prefix: all B*L queries as one block, no K/V copies
            pk, pv = prefix.layer(self.idx)
            qf = q.transpose(0, 1).reshape(1, self.nh, b * t, self.hd)
            o_p, lse_p = attend_with_lse(qf, pk, pv, self.scale, masks.prefix, self.softcap)
            o_p = o_p.view(self.nh, b, t, self.hd).transpose(0, 1)
            lse_p = lse_p.view(self.nh, b, t).transpose(0, 1)
            o_s, lse_s = attend_with_lse(q, k, v, self.scale, masks.attn, self.softcap)
            o = merge_partials(o_p, lse_p, o_s, lse_s)
        else:
            if cache is not None:
                k, v = cache.update(self.idx, k, v)
            o = attend(q, k, v, self.scale, masks.attn, self.softcap)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.nh * self.hd))


def _select_rows(masks: LayerMasks, rows, t: int, device) -> LayerMasks:
    """The masks of one query row per sequence: attn [B, 1, 1, T], prefix [B, P]."""
    b = rows.shape[0]
    sel = torch.arange(b, device=device)
    if masks.attn is None:  # plain causal with aligned positions
        attn = torch.arange(t, device=device).view(1, t) <= rows.view(b, 1)
    elif masks.attn.dim() == 2:
        attn = masks.attn[rows]
    else:
        attn = masks.attn[sel, 0, rows]
    prefix = None if masks.prefix is None else masks.prefix[sel * t + rows]
    return LayerMasks(attn.view(b, 1, 1, t), prefix)


def _rope_rows(cos, sin, rows):
    if cos.dim() == 2:  # [T, D] shared by the batch
        return cos[rows][:, None, None], sin[rows][:, None, None]
    sel = torch.arange(rows.shape[0], device=rows.device)  # [B, 1, T, D]
    return cos[sel, :, rows].unsqueeze(2), sin[sel, :, rows].unsqueeze(2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.activation == "gelu_tanh"

    def forward(self, x):
        g = self.gate_proj(x)
        g = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down_proj(g * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)  # noqa: E731
        self.self_attn = Attention(cfg, idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.post_norms = cfg.post_norms
        if cfg.post_norms:  # Gemma 2/3: norms before and after both attention and MLP
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, h, cos, sin, masks, cache=None, prefix=None, rows=None):
        a = self.self_attn(self.input_layernorm(h), cos, sin, masks, cache, prefix, rows)
        if rows is not None:
            h = h[torch.arange(h.shape[0], device=h.device), rows].unsqueeze(1)
        if self.post_norms:
            h = h + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    """HF's `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class KVCache:
    """Per-layer K/V buffers [B, Hkv, max_len, D] with the absolute position of every cached token."""

    def __init__(self, cfg: ModelConfig, max_len: int, batch: int = 1, device=None, dtype=torch.float32):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.positions = torch.zeros(max_len, dtype=torch.long, device=device)
        self.length, self.max_len = 0, max_len
        self._pending = 0

    def layer(self, i):
        return self.k[i][:, :, : self.length], self.v[i][:, :, : self.length]

    def update(self, i, k, v):
        end = self.length + k.shape[2]
        self.k[i][:, :, self.length: end] = k
        self.v[i][:, :, self.length: end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]

    def begin(self, positions: torch.Tensor) -> torch.Tensor:
        """Reserve room for new tokens at `positions` [T]; returns the positions of all keys they see."""
        t = positions.shape[-1]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} > {self.max_len}")
        self.positions[self.length: self.length + t] = positions
        self._pending = t
        return self.positions[: self.length + t]

    def commit(self):
        self.length += self._pending
        self._pending = 0

    def truncate(self, length: int):
        self.length = length


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(self.config, max_len, batch, self.device, self.dtype)

    def _rope(self, positions, dtype):
        """(cos, sin) per layer kind, shaped to broadcast against q [B, H, T, D]."""
        cfg, out = self.config, {}
        kinds = {"global": (cfg.rope_theta, cfg.rope_scaling)}
        if cfg.rope_local_theta is not None:
            kinds["local"] = (cfg.rope_local_theta, None)
        for kind, (theta, scaling) in kinds.items():
            inv = rope_inv_freq(cfg.head_dim, theta, scaling, positions.device)
            freqs = positions.float().unsqueeze(-1) * inv
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            if positions.dim() == 2:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            out[kind] = (cos, sin)
        return out

    def _masks(self, positions, k_pos, mask, prefix, windows, batch, prefix_mask=None):
        """LayerMasks per distinct sliding window (None = full attention), built once per forward."""
        out = {}
        t = positions.shape[-1]
        aligned = k_pos is positions and positions.dim() == 1 and mask is None
        for w in windows:
            attn = None
            if not aligned or (w is not None and t > w) or prefix is not None:
                attn = position_mask(positions, k_pos, w)
                if attn.dim() == 3:
                    attn = attn.unsqueeze(1)
                if mask is not None:
                    attn = attn & (mask if mask.dim() == attn.dim() else mask.unsqueeze(1))
            pmask = None
            if prefix is not None and w is not None:
                p_pos = prefix.positions[: prefix.length]
                if int(positions.max()) - int(p_pos.min()) >= w:
                    q_flat = positions.reshape(-1) if positions.dim() == 2 else positions
                    pmask = position_mask(q_flat, p_pos, w)
                    if positions.dim() == 1 and batch > 1:
                        pmask = pmask.repeat(batch, 1)
            if prefix_mask is not None:  # [B, P] per question -> [B*T, P] per question token
                hide = prefix_mask.repeat_interleave(t, 0)
                pmask = hide if pmask is None else pmask & hide
            out[w] = LayerMasks(attn, pmask)
        return out

    def forward(self, input_ids, positions=None, mask=None, cache: KVCache | None = None,
                prefix: KVCache | None = None, final_norm: bool = True, last: torch.Tensor | None = None,
                prefix_mask: torch.Tensor | None = None):
        """Hidden states [B, T, H] (after the final norm unless final_norm=False).

        last: [B] the one position per sequence whose hidden state is wanted: the final layer then runs its
        queries, output projection and MLP for that row only, and the result is [B, 1, H].

        positions: [T] or [B, T] absolute positions (default: continue the cache or the prefix).
        mask: extra bool mask [T, T] or [B, T, T] (True = may attend), e.g. the block mask of packed training.
        cache: append this call's K/V to the cache and attend to everything cached.
        prefix: score questions against a shared prefix cache (read only); input_ids are [B, L] questions.
        prefix_mask: [B, prefix.length] bool, the prefix keys each question may see (True = visible).
        """
        cfg = self.config
        b, t = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else (prefix.length if prefix is not None else 0)
            positions = torch.arange(start, start + t, device=input_ids.device)
        k_pos = cache.begin(positions) if cache is not None else positions
        h = self.model.embed_tokens(input_ids)
        if cfg.embed_scale:  # sqrt(hidden) rounded to the model dtype, as HF and gemma_pytorch do
            h = h * torch.tensor(cfg.hidden_size ** 0.5, dtype=h.dtype)
        rope = self._rope(positions, h.dtype)
        windows = {cfg.sliding_window if cfg.is_sliding(i) else None for i in range(cfg.num_layers)}
        masks = self._masks(positions, k_pos, mask, prefix, windows, b, prefix_mask)
        final = cfg.num_layers - 1
        for i, layer in enumerate(self.model.layers):
            sliding = cfg.is_sliding(i)
            cos, sin = rope["local" if sliding and "local" in rope else "global"]
            h = layer(h, cos, sin, masks[cfg.sliding_window if sliding else None], cache, prefix,
                      last if i == final else None)
        if cache is not None:
            cache.commit()
        return self.model.norm(h) if final_norm else h

    def logits(self, hidden):
        out = self.lm_head(hidden)
        cap = self.config.final_softcap
        return torch.tanh(out / cap) * cap if cap else out

    @torch.no_grad()
    def prefill(self, ids: list[int] | torch.Tensor, max_len: int | None = None, chunk: int = 2048,
                cache: KVCache | None = None) -> tuple[KVCache, torch.Tensor]:
        """Encode a sequence into a KV cache in chunks; returns (cache, pre-norm hidden of the last token)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        if cache is None:
            cache = self.new_cache(max_len or ids.shape[1])
        last = None
        for s in range(0, ids.shape[1], chunk):
            last = self(ids[:, s: s + chunk], cache=cache, final_norm=False)[:, -1]
        return cache, last

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int = 256, eos_ids=None) -> list[int]:
        """Greedy decoding with the KV cache; returns the new tokens (without the stop token)."""
        eos = eos_ids if eos_ids is not None else self.config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        cache, h = self.prefill(ids, max_len=len(ids) + max_new_tokens)
        out = []
        for _ in range(max_new_tokens):
            nxt = int(self.logits(self.model.norm(h)).argmax(-1))
            if nxt in eos:
                break
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            h = self(torch.tensor([[nxt]], device=self.device), cache=cache, final_norm=False)[:, -1]
        return out
