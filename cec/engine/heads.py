"""The yes/no head: score = logsumexp(yes logits) - logsumexp(no logits) from pre-final-norm hidden states.

Only the answer rows of the output matrix are used, so no full-vocabulary logits are built. The PyTorch
reference reproduces HF's numerics in the model dtype (final RMSNorm, lm_head, soft-cap) and is the CPU path,
the training path (it has gradients) and the oracle of the Triton kernel in `kernels/yesno_head.py`, which
serves CUDA tensors. P(yes) = sigmoid(score). The final norm is the model's own (`model.rms_norm`), with the cast
rule of ModelConfig.llama_norm, so head scores and the model's logits round alike.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import Tensor

from cec.engine.model import rms_norm
from cec.errors import TokenizerError

YES_SPELLINGS = (" Yes", "Yes", " yes")
NO_SPELLINGS = (" No", "No", " no")


def answer_logits(normed: Tensor, rows: Tensor, softcap: float | None) -> Tensor:
    """Logits of the gathered answer rows, in the model dtype like lm_head (and the cap like HF), as float32."""
    dtype = torch.promote_types(normed.dtype, rows.dtype)
    logits = normed.to(dtype) @ rows.to(dtype).T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


def yes_no_scores_reference(hidden: Tensor, norm_weight: Tensor, rows: Tensor, n_yes: int, *, eps: float,
                            norm_offset: float, softcap: float | None, llama_norm: bool) -> Tensor:
    """Scores [N] float32 from hidden [N, H] and the gathered answer rows [n_yes + n_no, H] (yes rows first)."""
    logits = answer_logits(rms_norm(hidden, norm_weight, eps, norm_offset, llama_norm), rows, softcap)
    return torch.logsumexp(logits[:, :n_yes], -1) - torch.logsumexp(logits[:, n_yes:], -1)


def _interpret() -> bool:
    """CPU tensors go to the interpreted kernel only when asked by name: TRITON_INTERPRET alone (which kernel
    tests set for the whole process) leaves every other CPU caller on the reference."""
    return os.environ.get("CEC_TRITON_INTERPRET") == "1"


_KERNEL = []  # the imported kernel function, or None where Triton is missing; empty until first asked


def _kernel():
    """The Triton head, or None where Triton is missing. TRITON_INTERPRET must be set before the kernel module
    is imported for the interpreter to take CPU tensors, so CEC_TRITON_INTERPRET sets it first."""
    if not _KERNEL:
        if os.environ.get("CEC_TRITON_INTERPRET") == "1":
            os.environ["TRITON_INTERPRET"] = "1"
        try:
            from cec_kernels.yesno_head import yes_no_head
        except ImportError:
            yes_no_head = None
        _KERNEL.append(yes_no_head)
    return _KERNEL[0]


def use_kernel(hidden: Tensor, *weights: Tensor) -> bool:
    """The kernel serves CUDA tensors, and fp32 CPU tensors under the interpreter (whose 16-bit arithmetic is
    wrong), when no gradient is wanted: the kernel has no backward, so training goes through the reference."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, *weights)):
        return False
    if not (hidden.is_cuda or (_interpret() and hidden.dtype == torch.float32)):
        return False
    return _kernel() is not None


def yes_no_scores(hidden: Tensor, norm_weight: Tensor, out_weight: Tensor, yes_ids: Sequence[int],
                  no_ids: Sequence[int], *, eps: float, norm_offset: float, softcap: float | None,
                  llama_norm: bool) -> Tensor:
    """logsumexp over yes ids minus logsumexp over no ids of the logits of pre-final-norm `hidden` [N, H];
    `out_weight` [V, H] is lm_head's weight or the tied embedding. Returns [N] float32."""
    yes_ids, no_ids = list(yes_ids), list(no_ids)
    _check_ids(yes_ids, no_ids, out_weight.shape[0])
    if use_kernel(hidden, norm_weight, out_weight):
        ids = torch.tensor(yes_ids + no_ids, dtype=torch.int32, device=hidden.device)
        return _kernel()(hidden, norm_weight, out_weight, ids, len(yes_ids), eps=eps, norm_offset=norm_offset,
                         softcap=softcap, llama_norm=llama_norm)
    rows = out_weight[yes_ids + no_ids]
    return yes_no_scores_reference(hidden, norm_weight, rows, len(yes_ids), eps=eps, norm_offset=norm_offset,
                                   softcap=softcap, llama_norm=llama_norm)


class YesNoHead:
    """The head of one model and one pair of answer-id lists: the answer rows are gathered once."""

    def __init__(self, norm_weight: Tensor, out_weight: Tensor, yes_ids: Sequence[int], no_ids: Sequence[int],
                 *, eps: float, norm_offset: float, softcap: float | None, llama_norm: bool):
        yes_ids, no_ids = list(yes_ids), list(no_ids)
        _check_ids(yes_ids, no_ids, out_weight.shape[0])
        self.yes_ids, self.no_ids = yes_ids, no_ids
        self.norm_weight = norm_weight
        # a detached copy: it follows out_weight only if the head is re-made, and training (hidden with
        # gradients, frozen output rows) can backward through many steps without re-gathering
        self.rows = out_weight.detach()[yes_ids + no_ids].contiguous()
        self.row_ids = torch.arange(len(yes_ids) + len(no_ids), dtype=torch.int32, device=out_weight.device)
        self.eps, self.norm_offset, self.softcap, self.llama_norm = eps, norm_offset, softcap, llama_norm

    @classmethod
    def from_config(cls, config, norm_weight: Tensor, out_weight: Tensor, yes_ids: Sequence[int],
                    no_ids: Sequence[int]) -> "YesNoHead":
        """From a `cec.engine.config.ModelConfig`: its eps, norm offset, final soft-cap and norm cast rule, the ones
        the model's own final norm uses."""
        return cls(norm_weight, out_weight, yes_ids, no_ids, eps=config.rms_norm_eps,
                   norm_offset=config.norm_offset, softcap=config.final_softcap, llama_norm=config.llama_norm)

    def scores(self, hidden: Tensor) -> Tensor:
        """[N, H] pre-final-norm hidden states -> [N] float32 scores (any leading dims are flattened)."""
        lead = hidden.shape[:-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        kw = dict(eps=self.eps, norm_offset=self.norm_offset, softcap=self.softcap, llama_norm=self.llama_norm)
        if use_kernel(hidden, self.norm_weight, self.rows):
            out = _kernel()(hidden, self.norm_weight, self.rows, self.row_ids, len(self.yes_ids), **kw)
        else:
            out = yes_no_scores_reference(hidden, self.norm_weight, self.rows, len(self.yes_ids), **kw)
        return out.reshape(lead)

    def to(self, device) -> "YesNoHead":
        self.norm_weight, self.rows = self.norm_weight.to(device), self.rows.to(device)
        self.row_ids = self.row_ids.to(device)
        return self


def _check_ids(yes_ids: list[int], no_ids: list[int], vocab: int) -> None:
    if not yes_ids or not no_ids:
        raise TokenizerError("the yes/no head needs at least one token id for each answer")
    if set(yes_ids) & set(no_ids):
        raise TokenizerError(f"yes and no answers share token ids {sorted(set(yes_ids) & set(no_ids))}")
    bad = [i for i in yes_ids + no_ids if not 0 <= i < vocab]
    if bad:
        raise TokenizerError(f"answer token ids {bad} are outside the vocabulary of {vocab}")


def answer_token_ids(tokenizer_encode: Callable[[str, bool], list[int]], prompt: str,
                     answers: Sequence[str]) -> list[int]:
    """The token a model emits first for each answer spelling right after `prompt`: tokenize prompt + answer
    and take the first token that differs from the prompt's own tokens (a bare word tokenizes differently).
    Deduplicated, in the order of `answers`."""
    base = tokenizer_encode(prompt, True)
    ids: list[int] = []
    for answer in answers:
        full = tokenizer_encode(prompt + answer, True)
        i = 0
        while i < min(len(base), len(full)) and base[i] == full[i]:
            i += 1
        if i >= len(full):
            raise TokenizerError(f"answer {answer!r} adds no token after the prompt")
        if full[i] not in ids:
            ids.append(full[i])
    return ids
