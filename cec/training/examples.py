"""Training examples with pseudo-labels, as the paper builds them (Sec. 3.3, 3.4, App. C); one prefix per note.

What each stage asks and how its pseudo-labels are drawn is the stage's (cec.coding.stages.Stage.draw), or for
label questions with the concept model's answers cec.training.concept_answers', for concept questions with hard
negatives cec.training.hard_negatives'; here a note's examples are put together, shuffled and capped.

Deterministic: each note draws from its own random.Random seeded by (seed, epoch, note id), so the examples of
a note do not depend on the order of notes, the process (DDP rank) building them, or on the other notes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from cec.coding.stages import Stage
from cec.errors import DataError


@dataclass
class ExampleOptions:
    neg_ratio: float | None = 1.0  # negatives per positive (concept, direct; None = every negative, direct only)
    min_negatives: int = 5  # at least this many negatives per note (a note may have no true code)
    k: int = 5  # label stage: concepts of the asked code's set
    m: int = 2  # label stage: concepts of the opposite pseudo set
    false_ratio: float = 1.0  # label stage: false codes asked per true code
    min_false: int = 2  # label stage: at least this many false codes per note
    max_questions: int | None = None  # a random subset of at most this many questions per note


@dataclass
class NoteExamples:
    note_id: str
    prefix: str
    questions: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # 1 = yes, 0 = no
    keys: list[str] = field(default_factory=list)  # what each question asks about: "c<concept id>" or a code

    def __len__(self) -> int:
        return len(self.questions)


def check_labels(notes: list[dict], concept_set, drop_unknown: bool = False) -> list[dict]:
    """Notes whose labels all belong to the concept set; an unknown code is a DataError (or dropped)."""
    out = []
    for note in notes:
        unknown = [c for c in note["labels"] if c not in concept_set]
        if unknown and not drop_unknown:
            raise DataError(f"note {note['id']!r}: code {unknown[0]!r} is not in concept set {concept_set.name!r}"
                            f"{f' ({len(unknown)} such codes)' if len(unknown) > 1 else ''}; "
                            "filter the labels or pass --drop-unknown-codes")
        out.append({**note, "labels": [c for c in note["labels"] if c in concept_set]} if unknown else note)
    return out


def note_rng(seed: int, epoch: int, note_id: str) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{note_id}")  # str seeds hash with sha512: stable across runs


def build_examples(stage: Stage, note: dict, concept_set, seed: int = 0, epoch: int = 0,
                   opts: ExampleOptions | None = None, drawer=None) -> NoteExamples:
    """The examples of one note for one stage, in a shuffled order; the same (seed, epoch, note) gives the same.
    drawer: draws them instead of the stage, from what it knows of the note: a label stage's questions with the
    concept model's answers (cec.training.concept_answers.PredictedAnswers), or a concept stage's with hard
    negatives (cec.training.hard_negatives.HardNegatives)."""
    opts = opts or ExampleOptions()
    rng = note_rng(seed, epoch, note["id"])
    if drawer is not None:
        items = drawer.draw(stage, note, rng, opts, epoch)
    else:
        items = stage.draw(note, concept_set, rng, opts)
    order = list(range(len(items)))
    rng.shuffle(order)
    if opts.max_questions is not None:
        order = order[: opts.max_questions]
    return NoteExamples(note["id"], stage.prefix(note["text"]), [items[i][0] for i in order],
                        [items[i][1] for i in order], [items[i][2] for i in order])
