"""One Transformer for Llama 3.x and Gemma 1/2/3, with HF module names and numerics.

Family differences are flags of ModelConfig (see config.py). Every forward first builds a ForwardPlan (positions,
RoPE, attention masks, the rows to keep, the cache or prefix it reads) that every layer reads. Three modes:
- plain: a whole sequence, causal (optionally with an extra block mask, for packed training);
- cache: incremental decoding and chunked prefill against a KVCache;
- prefix: questions [B, L] against one shared, read-only prefix (see scorer.py), by cascade attention (two
  partials merged) or by one FlexAttention call per layer (attention="flex").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cec.engine.attention import LayerMasks, QuestionLayout, attend, cascade_attend, flex_attend, position_mask
from cec.engine.cache import KVCache, PrefixView
from cec.engine.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, llama_norm: bool) -> torch.Tensor:
    """HF's RMSNorm; ModelConfig.llama_norm picks the cast rule. Llama: normalize in fp32, cast to the input
    dtype, then multiply by (offset + w) in the weight's dtype. Gemma: normalize and multiply by (offset + w) in
    fp32, then cast to the input dtype. The same arithmetic as HF's, in place on the buffers it makes itself
    (half the element-wise passes; F.rms_norm is slower than this on CPU)."""
    x32 = x.float()
    inv = x32.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    if llama_norm:
        w = weight + offset if offset else weight
        return w * (x32 * inv).to(x.dtype)
    return (x32 * inv).mul_(offset + weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float, llama_norm: bool):
        super().__init__()
        self.eps, self.offset, self.llama_norm = eps, offset, llama_norm
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.offset, self.llama_norm)


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1), written into x * cos half by half
    (the rotated copy is never built: a third of the element-wise passes)."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


@dataclass(frozen=True)
class Queries:
    """The query rows a layer computes: every token, or (the final layer, when asked) one row per sequence."""
    rows: torch.Tensor | None  # [B] the position kept in each sequence; None = every position
    rope: dict  # RoPE kind ("global", "local") -> (cos, sin) of these rows, broadcasting against q [B, H, Tq, D]
    masks: dict  # sliding window (None = full attention) -> LayerMasks of these rows

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> these rows: unchanged, or [B, 1, ...]."""
        if self.rows is None:
            return x
        return x[torch.arange(x.shape[0], device=x.device), self.rows].unsqueeze(1)

    def keep(self, rows: torch.Tensor, masks: dict | None = None) -> "Queries":
        """Every-token queries -> one row per sequence, rows [B]: RoPE [B, 1, 1, D], masks attn [B, 1, 1, S] and
        prefix [B, P], gathered from these tensors, so each value is the one the full forward uses.
        masks: the kept rows' masks, given where they are not gathered (flex block masks)."""
        b, t = rows.shape[0], next(iter(self.rope.values()))[0].shape[-2]
        sel = torch.arange(b, device=rows.device)
        rope = {kind: tuple(c.expand(b, 1, t, c.shape[-1])[sel, :, rows].unsqueeze(2) for c in cs)
                for kind, cs in self.rope.items()}
        if masks is not None:
            return Queries(rows, rope, masks)
        masks = {}
        for w, m in self.masks.items():
            if m.attn is None:  # causal by index: the keys are these t tokens
                attn = (torch.arange(t, device=rows.device).view(1, t) <= rows.view(b, 1)).view(b, 1, 1, t)
            else:
                attn = m.attn.expand(b, 1, t, m.attn.shape[-1])[sel, :, rows].unsqueeze(2)
            prefix = None if m.prefix is None else m.prefix.view(b, t, -1)[sel, rows]
            masks[w] = LayerMasks(attn, prefix, prefix_start=m.prefix_start)
        return Queries(rows, rope, masks)


@dataclass(frozen=True)
class ForwardPlan:
    """Everything one forward decides before its first layer; built by Transformer.plan, read by every layer."""
    positions: torch.Tensor  # [T] or [B, T] absolute positions of the input tokens
    key_positions: torch.Tensor  # [S] positions of the keys of the own attention: these tokens, or all cached
    rope: dict  # RoPE kind -> (cos, sin) of every input token (the keys): [T, D] or [B, 1, T, D]
    queries: Queries  # every layer but the final one
    final: Queries  # the final layer: `queries`, or one row per sequence
    cache: KVCache | None = None  # written: this call's K/V are appended
    prefix: PrefixView | None = None  # read only: the shared prefix of cascade attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.idx, self.nh, self.nkv, self.hd = idx, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        sliding = cfg.is_sliding(idx)
        self.window = cfg.sliding_window if sliding else None
        self.rope_kind = "local" if sliding and cfg.rope_local_theta is not None else "global"
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset, cfg.llama_norm)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_offset, cfg.llama_norm)

    def forward(self, x, plan: ForwardPlan, queries: Queries):
        """Every token of x gives K/V; only the `queries` rows give an output."""
        b, t, _ = x.shape
        cos, sin = plan.rope[self.rope_kind]
        cos_q, sin_q = queries.rope[self.rope_kind]
        masks = queries.masks[self.window]
        q = self.q_proj(queries.take(x))
        tq = q.shape[1]
        q = q.view(b, tq, self.nh, self.hd)
        k = self.k_proj(x).view(b, t, self.nkv, self.hd)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
        if plan.prefix is not None:
            pk, pv = plan.prefix.layer(self.idx)
            if masks.block is not None:
                o = flex_attend(q, k, v, pk, pv, self.scale, masks.block, self.softcap)
            else:
                o = cascade_attend(q, k, v, pk, pv, self.scale, masks, self.softcap)
        else:
            if plan.cache is not None:
                k, v = plan.cache.update(self.idx, k, v)
            o = attend(q, k, v, self.scale, masks.attn, self.softcap)
        return self.o_proj(o.transpose(1, 2).reshape(b, tq, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.activation == "gelu_tanh"

    def forward(self, x):
        g, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled():
            return self.down_proj(self.act(g) * up)
        # inference: in place where no backward needs the activation
        if self.gelu and not g.is_cuda:
            return self.down_proj(gelu_tanh_mul_(g, up))
        return self.down_proj(self.act(g).mul_(up))

    def act(self, g):
        return F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)


GELU_C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh_mul_(g: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(g) * up, written into g. The tanh form as x * sigmoid(2z) (0.5 * (1 + tanh z) = sigmoid(2z),
    z = sqrt(2/pi) * (x + 0.044715 x^3)): on CPU the vectorized sigmoid is much cheaper than the tanh kernel, and
    the five in-place passes beat F.gelu plus the multiply by about 30% at a question batch's shape (same error
    against fp64 as F.gelu's)."""
    t = g * g
    t.mul_(0.044715).add_(1.0).mul_(g).mul_(GELU_C)
    return g.mul_(t.sigmoid_()).mul_(up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, cfg.llama_norm)  # noqa: E731
        self.self_attn = Attention(cfg, idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.post_norms = cfg.post_norms
        if cfg.post_norms:  # Gemma 2/3: norms before and after both attention and MLP
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, h, plan: ForwardPlan, queries: Queries):
        a = self.self_attn(self.input_layernorm(h), plan, queries)
        h = queries.take(h)
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
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, cfg.llama_norm)


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

    def plan(self, input_ids, positions=None, mask=None, cache: KVCache | None = None,
             prefix: PrefixView | None = None, prefix_visible: torch.Tensor | None = None,
             last: torch.Tensor | None = None, attention: str = "cascade", trim: bool = True) -> ForwardPlan:
        """The plan of one forward over input_ids [B, T] (arguments as in forward); with a cache it reserves room
        for the new tokens. prefix: score B questions against this shared prefix; prefix_visible [B, P] bool
        (True = visible): the prefix keys each question may see; attention: how the questions attend to it,
        "cascade" (two partials merged) or "flex" (one FlexAttention call per layer). trim (cascade): a sliding
        window's layers read only the prefix slots its window reaches (shapes then vary with the note: off for
        fixed-shape compiled runs)."""
        b, t = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else (prefix.length if prefix is not None else 0)
            positions = torch.arange(start, start + t, device=input_ids.device)
        if attention not in ("cascade", "flex"):
            raise ValueError(f"attention must be 'cascade' or 'flex', not {attention!r}")
        if prefix is not None and attention == "flex":
            return self._flex_plan(positions, b, prefix, prefix_visible, last)
        k_pos = cache.begin(positions) if cache is not None else positions
        rope = self._rope(positions, self.dtype)
        # the keys are these tokens in order and nothing else may be hidden: SDPA's causal-by-index is the
        # position mask wherever no sliding window bites
        by_index = cache is None and prefix is None and mask is None and positions.dim() == 1
        masks = {}
        for w in self._windows():
            attn = None
            if not by_index or (w is not None and t > w):
                attn = position_mask(positions, k_pos, w)
                if mask is not None:
                    attn = attn & mask
                attn = attn.view(-1, 1, *attn.shape[-2:])
            pmask, start = None, 0
            if prefix is not None and trim and w is not None and not prefix.padded:
                # slots hold ascending positions: those before the earliest query's window are read by no query
                start = min(int(torch.searchsorted(prefix.positions, int(positions.min()) - w + 1)), prefix.length - 1)
            # padding slots of a padded prefix are hidden by position, as is what the window no longer reaches
            if prefix is not None and (prefix.padded or (w is not None and
                                       int(positions.max()) - int(prefix.positions[start:].min()) >= w)):
                pmask = position_mask(positions.expand(b, t).reshape(-1), prefix.positions[start:], w)
            if prefix_visible is not None:  # [B, P] per question -> [B*T, P] per question token
                hide = prefix_visible[:, start:].repeat_interleave(t, 0)
                pmask = hide if pmask is None else pmask & hide
            masks[w] = LayerMasks(attn, pmask, prefix_start=start)
        queries = Queries(None, rope, masks)
        final = queries if last is None else queries.keep(last)
        return ForwardPlan(positions, k_pos, rope, queries, final, cache, prefix)

    def _flex_plan(self, positions, b: int, prefix: PrefixView, prefix_visible, last) -> ForwardPlan:
        """The prefix-mode plan of attention="flex" for B questions at positions [T] or [B, T]: one block mask per
        sliding window (and per window for the kept rows) over the keys of QuestionLayout. Nothing is read back
        to the host."""
        windows = self._windows()
        layout = QuestionLayout.of(positions.expand(b, positions.shape[-1]), prefix.positions, prefix_visible)
        queries = Queries(None, self._rope(positions, self.dtype),
                          {w: LayerMasks(None, block=layout.block_mask(w)) for w in windows})
        final = queries
        if last is not None:
            kept = layout.keep(last)
            final = queries.keep(last, {w: LayerMasks(None, block=kept.block_mask(w)) for w in windows})
        return ForwardPlan(positions, layout.k_pos, queries.rope, queries, final, None, prefix)

    def _windows(self) -> set:
        """The sliding windows of the layers (None = full attention)."""
        cfg = self.config
        return {cfg.sliding_window if cfg.is_sliding(i) else None for i in range(cfg.num_layers)}

    def forward(self, input_ids, positions=None, mask=None, cache: KVCache | None = None, *,
                last: torch.Tensor | None = None, final_norm: bool = True, plan: ForwardPlan | None = None):
        """Hidden states [B, T, H] (after the final norm unless final_norm=False).

        positions: [T] or [B, T] absolute positions (default: continue the cache or the prefix).
        mask: extra bool mask [T, T] or [B, T, T] (True = may attend), e.g. the block mask of packed training.
        cache: append this call's K/V to the cache and attend to everything cached.
        last: [B] the one position per sequence whose hidden state is wanted: the final layer then runs its
        queries, output projection and MLP for that row only, and the result is [B, 1, H].
        plan: a plan from self.plan (how prefix scoring runs), instead of positions, mask, cache and last.
        """
        if plan is None:
            plan = self.plan(input_ids, positions, mask, cache, last=last)
        cfg = self.config
        h = self.model.embed_tokens(input_ids)
        if cfg.embed_scale:  # sqrt(hidden) rounded to the model dtype, as HF and gemma_pytorch do
            h = h * torch.tensor(cfg.hidden_size ** 0.5, dtype=h.dtype)
        final = cfg.num_layers - 1
        for i, layer in enumerate(self.model.layers):
            h = layer(h, plan, plan.final if i == final else plan.queries)
        if plan.cache is not None:
            plan.cache.commit()
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
