"""Hard negatives for the concept stage (`train.py --stage concept --related-negatives R --confused-negatives R`,
issue 15 item 3).

The paper samples a note's negative concepts at random from the concepts of its false codes (App. C); most of
them are easy (a fracture's concepts for a note about fever). Two pools of harder ones, each drawn `ratio` per
positive concept on top of the random ones (cec.coding.stages.draw_concept):

- related: the concepts of false codes that share an ICD ancestor with one of the note's true codes, the
  closest first: same category (R59.0 for a note coded R59.9), then same block (R52 for R50.9), then same chapter.
- confused: the concepts a concept adapter (the current model) answers Yes to on the note (P >= threshold) though
  no true code of the note has them: its own false positives, scored as inference scores the note
  (cec.training.concept_answers.score_notes).
"""
from __future__ import annotations

import random

import torch

from cec.coding import icd, stages
from cec.errors import DataError


class HardNegatives:
    """Draws a note's concept-stage examples with related and confused negatives added."""

    def __init__(self, cs, related_ratio: float = 0.0, confused_ratio: float = 0.0,
                 probs: dict[str, torch.Tensor] | None = None, threshold: float = 0.5):
        if confused_ratio and probs is None:
            raise ValueError("confused negatives need the concept model's probabilities")
        self.cs, self.related_ratio, self.confused_ratio = cs, related_ratio, confused_ratio
        self.probs, self.threshold = probs or {}, threshold
        hierarchy = icd.code_system(cs.code_system) if related_ratio else None
        # code -> {ancestor: its depth below the root}; a deeper shared ancestor is a closer relative
        self.ancestors = {code: {a: len(up) - 1 - d for d, a in enumerate(up)}
                          for code in cs.codes for up in [self._ancestors(hierarchy, code)]}

    @staticmethod
    def _ancestors(hierarchy, code: str) -> list[str]:
        """Nearest first; a code the code system does not know (a set's own code) has no relatives."""
        if hierarchy is None:
            return []
        try:
            return hierarchy.ancestors(code)
        except DataError:
            return []

    def related(self, note: dict) -> list[list[int]]:
        """Concept ids of the false codes related to the note's true codes, in groups by the depth of the
        deepest ancestor they share with one of them, deepest first (category, block, chapter for ICD-10-CM)."""
        labels = set(note["labels"])
        true = [c for c in self.cs.codes if c in labels]
        shared = {a: depth for c in true for a, depth in self.ancestors[c].items()}
        groups: dict[int, list[int]] = {}
        for code in self.cs.codes:
            if code in true:
                continue
            depths = [d for a, d in self.ancestors[code].items() if a in shared]
            if depths:
                groups.setdefault(max(depths), []).extend(self.cs.concept_ids(code))
        return [groups[d] for d in sorted(groups, reverse=True)]

    def confused(self, note: dict) -> list[int]:
        """The concepts the scoring adapter answers Yes to on the note (draw_concept drops the note's own)."""
        if note["id"] not in self.probs:
            raise KeyError(f"note {note['id']!r} has no concept scores")
        return torch.nonzero(self.probs[note["id"]] >= self.threshold).flatten().tolist()

    def draw(self, stage: stages.Stage, note: dict, rng: random.Random, opts, epoch: int
             ) -> list[tuple[str, int, str]]:
        hard = []
        if self.related_ratio:
            hard.append((self.related_ratio, self.related(note)))
        if self.confused_ratio:
            hard.append((self.confused_ratio, [self.confused(note)]))
        return stages.draw_concept(stage, note, self.cs, rng, opts, hard)
