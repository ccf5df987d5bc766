"""Training examples with pseudo-labels, as the paper builds them (Sec. 3.3, 3.4, App. C); one prefix per note.

- concept (Fig. 3): the concepts of the note's true codes (C_y for each true y) are pseudo-positive; negatives
  are sampled from the concepts of its negative codes that are not positive, `neg_ratio` per positive.
- label (Fig. 4): for each true code l and for sampled false codes: k concepts of C_l, plus m concepts from the
  opposite pseudo set (C_- when l is true, C_+ when false), each with its pseudo answer (Yes when the concept is
  in C_+, the union of the true codes' sets); the answer to the question is whether l is true.
- direct (Table 2's baseline): one question per code description, true codes and sampled negative codes.

Deterministic: each note draws from its own random.Random seeded by (seed, epoch, note id), so the examples of
a note do not depend on the order of notes, the process (DDP rank) building them, or on the other notes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from cec.coding import prompts
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
    label_layout: str = "paper"  # label stage: "paper" (Fig. 4 verbatim) or "compact" (cec.coding.prompts)


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


def _sample(rng: random.Random, pool: list, n: int) -> list:
    return rng.sample(pool, min(max(n, 0), len(pool)))


def _n_negatives(n_pos: int, pool: int, opts: ExampleOptions) -> int:
    if opts.neg_ratio is None:
        return pool
    return min(pool, max(round(opts.neg_ratio * n_pos), opts.min_negatives))


def concept_examples(note: dict, cs, rng: random.Random, opts: ExampleOptions) -> NoteExamples:
    pos = list(dict.fromkeys(i for code in note["labels"] for i in cs.concept_ids(code)))
    pos_set = set(pos)
    pool = sorted({i for code in cs.codes if code not in note["labels"] for i in cs.concept_ids(code)} - pos_set)
    neg = _sample(rng, pool, _n_negatives(len(pos), len(pool), opts))
    items = [(i, 1) for i in pos] + [(i, 0) for i in neg]
    ex = NoteExamples(note["id"], prompts.concept_prefix(note["text"]))
    for i, y in items:
        ex.questions.append(prompts.concept_question(cs.concepts[i].text))
        ex.labels.append(y)
        ex.keys.append(f"c{i}")
    return ex


def label_examples(note: dict, cs, rng: random.Random, opts: ExampleOptions) -> NoteExamples:
    true = [c for c in cs.codes if c in set(note["labels"])]
    c_pos = {i for code in true for i in cs.concept_ids(code)}
    c_neg = sorted({i for code in cs.codes for i in cs.concept_ids(code)} - c_pos)
    false_pool = [c for c in cs.codes if c not in set(true)]
    n_false = min(len(false_pool), max(round(opts.false_ratio * len(true)), opts.min_false))
    false = _sample(rng, false_pool, n_false)
    ex = NoteExamples(note["id"], prompts.label_prefix(note["text"], opts.label_layout))
    for code, y in [(c, 1) for c in true] + [(c, 0) for c in false]:
        own = cs.concept_ids(code)
        other = [i for i in (c_neg if y else sorted(c_pos)) if i not in set(own)]
        chosen = _sample(rng, own, opts.k) + _sample(rng, other, opts.m)
        rng.shuffle(chosen)
        answers = [(cs.concepts[i].text, i in c_pos) for i in chosen]
        ex.questions.append(prompts.label_question(cs.descriptions[code], answers, opts.label_layout))
        ex.labels.append(y)
        ex.keys.append(code)
    return ex


def direct_examples(note: dict, cs, rng: random.Random, opts: ExampleOptions) -> NoteExamples:
    true = [c for c in cs.codes if c in set(note["labels"])]
    pool = [c for c in cs.codes if c not in set(true)]
    neg = _sample(rng, pool, _n_negatives(len(true), len(pool), opts))
    ex = NoteExamples(note["id"], prompts.direct_prefix(note["text"]))
    for code, y in [(c, 1) for c in true] + [(c, 0) for c in neg]:
        ex.questions.append(prompts.direct_question(cs.descriptions[code]))
        ex.labels.append(y)
        ex.keys.append(code)
    return ex


BUILDERS = {"concept": concept_examples, "label": label_examples, "direct": direct_examples}


def build_examples(stage: str, note: dict, concept_set, seed: int = 0, epoch: int = 0,
                   opts: ExampleOptions | None = None) -> NoteExamples:
    """The examples of one note for one stage, in a shuffled order; the same (seed, epoch, note) gives the same."""
    if stage not in BUILDERS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(BUILDERS)}")
    opts = opts or ExampleOptions()
    rng = note_rng(seed, epoch, note["id"])
    ex = BUILDERS[stage](note, concept_set, rng, opts)
    order = list(range(len(ex)))
    rng.shuffle(order)
    if opts.max_questions is not None:
        order = order[: opts.max_questions]
    ex.questions = [ex.questions[i] for i in order]
    ex.labels = [ex.labels[i] for i in order]
    ex.keys = [ex.keys[i] for i in order]
    return ex
