"""A stage of CEC: one kind of yes/no question about a note, asked by one model (paper Sec. 3.3-3.4, Table 2).

- concept (Fig. 3): is concept c relevant to the note? Stage 1 of inference.
- label (Fig. 4): does the patient have code y, given the answers about some concepts? Stage 2. One Stage per
  prompt layout: "paper" (Fig. 4 verbatim), "compact" and "compact-probs" (compact, each answer with the
  concept model's probability; cec.coding.prompts).
- direct (Table 2's baseline): does the note report code y? No concepts.

A Stage is what the trainer, the pipeline and the evaluation need of it: its prefix (instruction + note, shared
by every question about one note) and its questions (texts: cec.coding.prompts), the ids of its yes/no answers,
its fixed prompt text (what a score cache's fingerprint hashes), its LoRA defaults (paper App. A) and how its
training examples are drawn from a labelled note (`draw`, as the paper builds them, Sec. 3.3-3.4, App. C):

- concept: the concepts of the note's true codes (C_y for each true y) are pseudo-positive; negatives are
  sampled from the concepts of its negative codes that are not positive, `neg_ratio` per positive.
- label: for each true code l and for sampled false codes (`label_codes`): k concepts of C_l, plus m concepts
  from the opposite pseudo set (C_- when l is true, C_+ when false), each with its pseudo answer (Yes when the
  concept is in C_+, the union of the true codes' sets); the answer to the question is whether l is true.
  (cec.training.concept_answers asks the same codes with the concept model's own answers instead.)
- direct: one question per code description, true codes and sampled negative codes.

Token ids are built one way (`encode`): the prefix with BOS, each question without; the model sees prefix_ids +
question_ids[i] and answers at the question's last token (cec.engine.heads). Training and inference both build
them here, so they agree token for token. Adding a stage or a layout is one more Stage below.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from cec.coding import prompts
from cec.engine.heads import answer_token_ids

NAMES = ("concept", "label", "direct")


@dataclass(frozen=True)
class TrainDefaults:
    """train.py's defaults for a stage (paper App. A), where its flags are not given."""
    r: int = 32
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = "all-linear"
    steps: int = 500


@dataclass(frozen=True)
class Stage:
    name: str  # one of NAMES
    layout: str  # prompt layout: "paper", or for the label stage also "compact" and "compact-probs"
    make_prefix: Callable[[str], str]  # note -> prefix text
    make_question: Callable[[str, Sequence[tuple]], str]  # (subject, shown concept answers) -> text
    texts: tuple[str, ...]  # every fixed string of its prompts
    train_defaults: TrainDefaults
    builder: Callable  # (stage, note, concept set, rng, options) -> [(question text, label, key)]
    shows_concepts: bool = False  # its questions carry concept answers (the label stage)
    shows_probabilities: bool = False  # and each answer's P(yes): only the concept model's answers have one
    sample_subject: str = "disease"  # what the sample prompt that answer_ids reads asks about
    yes_answers: tuple[str, ...] = prompts.YES_ANSWERS
    no_answers: tuple[str, ...] = prompts.NO_ANSWERS

    def prefix(self, note: str) -> str:
        return self.make_prefix(note)

    def question(self, subject: str, shown: Sequence[tuple] = ()) -> str:
        """The text after the prefix: subject is a concept (concept stage) or a code description; shown the
        (concept, answered yes[, P(yes)]) items a label question lists (the probability from the concept model,
        shown by the compact-probs layout only)."""
        if shown and not self.shows_concepts:
            raise ValueError(f"a {self.name} question shows no concepts")
        return self.make_question(subject, shown)

    def draw(self, note: dict, cs, rng: random.Random, opts) -> list[tuple[str, int, str]]:
        """The training questions of a labelled note, each (question text, 1 = yes / 0 = no, what it asks about:
        "c<concept id>" or a code); opts: cec.training.examples.ExampleOptions."""
        return self.builder(self, note, cs, rng, opts)

    def answer_ids(self, tokenizer) -> tuple[list[int], list[int]]:
        """(yes ids, no ids) of the answer spellings, read after a sample prompt of this stage the way the model
        sees it (cec.engine.heads.answer_token_ids)."""
        prompt = self.prefix("note") + self.question(self.sample_subject,
                                                     [("concept", True, 0.9)] if self.shows_concepts else ())
        return (answer_token_ids(tokenizer.encode, prompt, self.yes_answers),
                answer_token_ids(tokenizer.encode, prompt, self.no_answers))


def prefix_ids(tokenizer, prefix: str) -> list[int]:
    return tokenizer.encode(prefix, add_bos=True)


def question_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.encode(question, add_bos=False)


def encode(tokenizer, prefix: str, questions: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(prefix ids with BOS, [question ids without BOS]); the model sees prefix_ids + question_ids[i]."""
    return prefix_ids(tokenizer, prefix), [question_ids(tokenizer, q) for q in questions]


# -- drawing training examples ----------------------------------------------------------------------------
def _sample(rng: random.Random, pool: list, n: int) -> list:
    return rng.sample(pool, min(max(n, 0), len(pool)))


def _n_negatives(n_pos: int, pool: int, opts) -> int:
    if opts.neg_ratio is None:
        return pool
    return min(pool, max(round(opts.neg_ratio * n_pos), opts.min_negatives))


def draw_concept(stage: Stage, note: dict, cs, rng: random.Random, opts,
                 hard: Sequence[tuple[float, Sequence[Sequence[int]]]] = ()) -> list[tuple[str, int, str]]:
    """The concept stage's examples; hard: further negatives (cec.training.hard_negatives), each (how many per
    positive, candidate concept ids in groups, the hardest group first): drawn after the random ones, from
    candidates that are neither positive nor drawn yet, a group emptied before the next, random within one."""
    pos = list(dict.fromkeys(i for code in note["labels"] for i in cs.concept_ids(code)))
    pos_set = set(pos)
    pool = sorted({i for code in cs.codes if code not in note["labels"] for i in cs.concept_ids(code)} - pos_set)
    neg = _sample(rng, pool, _n_negatives(len(pos), len(pool), opts))
    for ratio, groups in hard:
        want, taken = round(ratio * len(pos)), pos_set | set(neg)
        for group in groups:
            fresh = sorted(set(group) - taken)
            picked = _sample(rng, fresh, want)
            neg += picked
            taken |= set(picked)
            want -= len(picked)
    items = [(i, 1) for i in pos] + [(i, 0) for i in neg]
    return [(stage.question(cs.concepts[i].text), y, f"c{i}") for i, y in items]


def label_codes(note: dict, cs, rng: random.Random, opts) -> list[tuple[str, int]]:
    """The codes a label-stage note is asked about, each (code, 1 = true): its true codes, then sampled false
    codes (opts.false_ratio per true code, at least opts.min_false)."""
    true = [c for c in cs.codes if c in set(note["labels"])]
    false_pool = [c for c in cs.codes if c not in set(true)]
    n_false = min(len(false_pool), max(round(opts.false_ratio * len(true)), opts.min_false))
    return [(c, 1) for c in true] + [(c, 0) for c in _sample(rng, false_pool, n_false)]


def _draw_label(stage: Stage, note: dict, cs, rng: random.Random, opts) -> list[tuple[str, int, str]]:
    c_pos = {i for code in note["labels"] if code in cs for i in cs.concept_ids(code)}
    c_neg = sorted({i for code in cs.codes for i in cs.concept_ids(code)} - c_pos)
    out = []
    for code, y in label_codes(note, cs, rng, opts):
        own = cs.concept_ids(code)
        other = [i for i in (c_neg if y else sorted(c_pos)) if i not in set(own)]
        chosen = _sample(rng, own, opts.k) + _sample(rng, other, opts.m)
        rng.shuffle(chosen)
        answers = [(cs.concepts[i].text, i in c_pos) for i in chosen]
        out.append((stage.question(cs.descriptions[code], answers), y, code))
    return out


def _draw_direct(stage: Stage, note: dict, cs, rng: random.Random, opts) -> list[tuple[str, int, str]]:
    true = [c for c in cs.codes if c in set(note["labels"])]
    pool = [c for c in cs.codes if c not in set(true)]
    neg = _sample(rng, pool, _n_negatives(len(true), len(pool), opts))
    items = [(c, 1) for c in true] + [(c, 0) for c in neg]
    return [(stage.question(cs.descriptions[code]), y, code) for code, y in items]


# -- the stages -------------------------------------------------------------------------------------------
CONCEPT = Stage("concept", "paper", prompts.concept_prefix, lambda concept, shown: prompts.concept_question(concept),
                (prompts.CONCEPT_INSTRUCTION, prompts.CONCEPT_QUESTION), TrainDefaults(steps=500), draw_concept,
                sample_subject="concept")
LABEL = Stage("label", "paper", prompts.label_prefix, prompts.label_question,
              (prompts.LABEL_INSTRUCTION, prompts.LABEL_CONCEPTS_INTRO, prompts.LABEL_CONCEPT_LINE,
               prompts.LABEL_QUESTION),
              TrainDefaults(alpha=128.0, targets="k_proj,v_proj", steps=2000), _draw_label, shows_concepts=True)
LABEL_COMPACT = Stage("label", "compact", prompts.compact_label_prefix, prompts.compact_label_question,
                      (prompts.LABEL_INSTRUCTION, prompts.LABEL_COMPACT_GUIDE, prompts.LABEL_COMPACT_CONCEPT_LINE,
                       prompts.LABEL_COMPACT_QUESTION),
                      LABEL.train_defaults, _draw_label, shows_concepts=True)
# compact, each answer with the concept model's probability ("Yes (0.93)"): predicted answers only
LABEL_PROBS = Stage("label", "compact-probs", prompts.probs_label_prefix, prompts.probs_label_question,
                    (prompts.LABEL_INSTRUCTION, prompts.LABEL_PROBS_GUIDE, prompts.LABEL_COMPACT_CONCEPT_LINE,
                     prompts.LABEL_PROBS_ANSWER, prompts.LABEL_COMPACT_QUESTION),
                    LABEL.train_defaults, _draw_label, shows_concepts=True, shows_probabilities=True)
DIRECT = Stage("direct", "paper", prompts.direct_prefix,
               lambda description, shown: prompts.direct_question(description),
               (prompts.DIRECT_INSTRUCTION, prompts.DIRECT_QUESTION), TrainDefaults(steps=100), _draw_direct)

STAGES = {(s.name, s.layout): s for s in (CONCEPT, LABEL, LABEL_COMPACT, LABEL_PROBS, DIRECT)}
LAYOUTS = {name: tuple(layout for n, layout in STAGES if n == name) for name in NAMES}
LABEL_LAYOUTS = LAYOUTS["label"]


def get(name: str, layout: str = "paper") -> Stage:
    """The stage `name` in prompt layout `layout` (a ValueError names the choices)."""
    if name not in NAMES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(NAMES)}")
    if (name, layout) not in STAGES:
        raise ValueError(f"unknown {name} layout {layout!r}; expected one of {', '.join(LAYOUTS[name])}")
    return STAGES[(name, layout)]
