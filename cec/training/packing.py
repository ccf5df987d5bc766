"""Packed shared-prefix sequences: one sequence holds a note's prefix and many questions, `[prefix | q1 | q2 | ...]`.

Positions restart at P for every question and a block mask lets each question token see the prefix and its own
question only, so each question is computed exactly as in its own `[prefix | q]` sequence, for P + sum(len q)
tokens instead of n * P + sum(len q). Text that all questions of a note start with (Fig. 3's "### Question: Is the
note above ... concept '") joins the prefix, as cec.engine.scorer does at inference. The loss is binary
cross-entropy on the yes/no score (cec.engine.heads: l_yes - l_no after the final norm) at each question's last
token; no full-vocabulary logits are built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cec.engine.scorer import common_prefix_len
from cec.errors import ConfigError


@dataclass
class Pack:
    ids: torch.Tensor  # [T] token ids: prefix then questions
    positions: torch.Tensor  # [T] prefix 0..P-1, each question P..P+L-1
    segments: torch.Tensor  # [T] 0 for the prefix, i + 1 for question i of the pack
    answers: torch.Tensor  # [n] index of each question's last token
    labels: torch.Tensor  # [n] float 0/1

    @property
    def tokens(self) -> int:
        return self.ids.numel()

    def mask(self) -> torch.Tensor:
        """[T, T] True where a query may see a key: the prefix, or its own question (causality by position)."""
        s = self.segments
        return (s.view(-1, 1) == s.view(1, -1)) | (s.view(1, -1) == 0)

    def to(self, device) -> "Pack":
        return Pack(*(t.to(device) for t in (self.ids, self.positions, self.segments, self.answers, self.labels)))


def make_pack(prefix: list[int], questions: list[list[int]], labels: list[int]) -> Pack:
    p = len(prefix)
    ids, pos, seg, ans = list(prefix), list(range(p)), [0] * p, []
    for i, q in enumerate(questions):
        ids += q
        pos += range(p, p + len(q))
        seg += [i + 1] * len(q)
        ans.append(len(ids) - 1)
    return Pack(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                torch.tensor(seg, dtype=torch.long), torch.tensor(ans, dtype=torch.long),
                torch.tensor(labels, dtype=torch.float32))


def pack_questions(prefix: list[int], questions: list[list[int]], labels: list[int], max_tokens: int,
                   share_question_prefix: bool = True) -> tuple[list[Pack], int]:
    """Packs of at most max_tokens tokens, questions in order; returns (packs, prefix tokens cut off).

    Questions that do not fit in one pack go to further packs, each restating the prefix. A prefix too long to
    leave room for the longest question is cut at its end (the note's tail), with the number of tokens cut
    returned so the caller can report it. A question too long for max_tokens is a ConfigError.
    """
    if not questions:
        return [], 0
    if any(len(q) == 0 for q in questions):
        raise ValueError("every question needs at least one token")
    shared = common_prefix_len(questions) if share_question_prefix and len(questions) > 1 else 0
    rest = [q[shared:] for q in questions]
    room = max_tokens - shared - max(len(q) for q in rest)
    if room < 1:
        raise ConfigError(f"a question of {shared + max(len(q) for q in rest)} tokens does not fit in "
                          f"--max-tokens {max_tokens}")
    cut = max(0, len(prefix) - room)
    full_prefix = list(prefix[: len(prefix) - cut]) + list(questions[0][:shared])
    packs, cur, cur_labels, used = [], [], [], len(full_prefix)
    for q, y in zip(rest, labels):
        if cur and used + len(q) > max_tokens:
            packs.append(make_pack(full_prefix, cur, cur_labels))
            cur, cur_labels, used = [], [], len(full_prefix)
        cur.append(q)
        cur_labels.append(y)
        used += len(q)
    packs.append(make_pack(full_prefix, cur, cur_labels))
    return packs, cut


def pack_scores(model, head, pack: Pack) -> torch.Tensor:
    """Yes/no scores [n] (float32, differentiable) of a pack's questions in one forward pass."""
    hidden = model(pack.ids.view(1, -1), positions=pack.positions, mask=pack.mask(), final_norm=False)[0]
    return head.scores(hidden[pack.answers])


def pack_loss(model, head, pack: Pack) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed binary cross-entropy of the pack's questions, their scores)."""
    scores = pack_scores(model, head, pack)
    return F.binary_cross_entropy_with_logits(scores, pack.labels.to(scores.device), reduction="sum"), scores
