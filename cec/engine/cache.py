"""The KV cache (decoding, chunked prefill) and the read-only view of it that questions are scored against.

Buffers are [B, Hkv, max_len, D] per layer, with the absolute position of every cached token, so attention
masks (causal, sliding window) are built from positions, never from buffer offsets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cec.engine.config import ModelConfig

FAR = 1 << 40  # the position of a buffer slot past the cached tokens: after every query, so no query sees it


@dataclass(frozen=True)
class PrefixView:
    """The first `length` cached tokens, frozen: a shared prefix that many questions read and none extends.
    Every question of a batch attends to these one K/V tensors (never copied per question). The tensors may span
    more slots than `length` (padded, for a fixed shape): those slots are at position FAR, hidden by position."""
    k: tuple[torch.Tensor, ...]  # per layer [1, Hkv, P, D]
    v: tuple[torch.Tensor, ...]
    positions: torch.Tensor  # [P]
    length: int  # the cached tokens, the first `length` of the P slots

    @property
    def padded(self) -> bool:
        return self.positions.shape[0] != self.length

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]


class KVCache:
    """Per-layer K/V buffers [B, Hkv, max_len, D] with the absolute position of every cached token.

    A forward reserves room with begin() (when its plan is built), writes each layer's K/V with update(), and
    commit() makes the new tokens part of the cache once every layer has run."""

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

    def as_prefix(self, whole: bool = False) -> PrefixView:
        """What is cached so far, as a read-only prefix (views of the buffers, no copy). whole: views of the whole
        buffers, so that the prefix has the buffer's shape whatever the cached length (the slots past it at FAR)."""
        n = self.length
        if whole:
            positions = torch.cat([self.positions[:n], self.positions.new_full((self.max_len - n,), FAR)])
            return PrefixView(tuple(self.k), tuple(self.v), positions, n)
        return PrefixView(tuple(k[:, :, :n] for k in self.k), tuple(v[:, :, :n] for v in self.v),
                          self.positions[:n], n)
