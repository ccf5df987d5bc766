"""Training examples: pseudo-labels as the paper defines them, deterministic given a seed."""
import re

import pytest

from cec.coding import prompts, stages
from cec.errors import DataError
from cec.training.examples import ExampleOptions, build_examples, check_labels, note_rng
from tiny_train import tiny_concept_set, tiny_notes

CS = tiny_concept_set()
NOTE = {"id": "n1", "text": "acute renal failure, on lisinopril", "labels": ["A1", "C3"]}


def concept_of(question: str) -> str:
    return question.split("concept '")[1].split("'?")[0]


def test_concept_stage_positives_and_negatives():
    ex = build_examples(stages.CONCEPT, NOTE, CS, seed=0, opts=ExampleOptions(neg_ratio=0.5, min_negatives=1))
    pos_texts = {CS.concepts[i].text for code in NOTE["labels"] for i in CS.concept_ids(code)}
    asked = [(concept_of(q), y) for q, y in zip(ex.questions, ex.labels)]
    assert {c for c, y in asked if y == 1} == pos_texts  # every concept of every true code
    negatives = [c for c, y in asked if y == 0]
    assert len(negatives) == round(0.5 * len(pos_texts)) and not set(negatives) & pos_texts
    neg_pool = {CS.concepts[i].text for code in ("B2", "D4", "E5") for i in CS.concept_ids(code)}
    assert set(negatives) <= neg_pool
    assert ex.prefix == prompts.concept_prefix(NOTE["text"])
    assert all(q == prompts.concept_question(concept_of(q)) for q in ex.questions)


def test_shared_concept_of_a_true_code_is_never_a_negative():
    # "kidney injury" belongs to A1 (true) and B2 (false): it is positive only
    ex = build_examples(stages.CONCEPT, NOTE, CS, seed=3, opts=ExampleOptions(neg_ratio=None))
    assert [y for q, y in zip(ex.questions, ex.labels) if concept_of(q) == "kidney injury"] == [1]


def test_label_stage_follows_the_paper():
    opts = ExampleOptions(k=2, m=1, false_ratio=1.0, min_false=1)
    ex = build_examples(stages.LABEL, NOTE, CS, seed=1, opts=opts)
    c_pos = {CS.concepts[i].text for code in NOTE["labels"] for i in CS.concept_ids(code)}
    assert sorted(ex.keys[i] for i, y in enumerate(ex.labels) if y) == ["A1", "C3"]
    assert sum(1 - y for y in ex.labels) == 2
    for q, y, code in zip(ex.questions, ex.labels, ex.keys):
        lines = q.split("\n")
        pairs = [(lines[i].split("'")[1], lines[i + 1].removeprefix("Answer: "))
                 for i in range(len(lines) - 1) if lines[i].startswith("Question: Does the patient contain")]
        own = {CS.concepts[i].text for i in CS.concept_ids(code)}
        from_own = [c for c, _ in pairs if c in own]
        others = [c for c, _ in pairs if c not in own]
        assert len(from_own) == min(2, len(own)) and len(others) == 1
        assert all(a == ("Yes" if c in c_pos else "No") for c, a in pairs)  # pseudo answers
        assert all((c in c_pos) != bool(y) for c in others)  # the opposite pseudo set
        assert f"the disease '{CS.descriptions[code]}'?" in q and q.endswith("### Response:")


def test_direct_stage_asks_every_code_when_ratio_is_none():
    ex = build_examples(stages.DIRECT, NOTE, CS, seed=0, opts=ExampleOptions(neg_ratio=None))
    assert sorted(ex.keys) == sorted(CS.codes)
    assert {k for k, y in zip(ex.keys, ex.labels) if y} == {"A1", "C3"}


@pytest.mark.parametrize("stage", [s for s in stages.STAGES.values() if not s.shows_probabilities],
                         ids=lambda s: f"{s.name}-{s.layout}")  # compact-probs draws predicted answers only
def test_deterministic_per_seed_epoch_and_note(stage):
    notes = tiny_notes()
    a = [build_examples(stage, n, CS, seed=7, epoch=1) for n in notes]
    b = [build_examples(stage, n, CS, seed=7, epoch=1) for n in reversed(notes)][::-1]
    assert [(e.questions, e.labels) for e in a] == [(e.questions, e.labels) for e in b]
    c = [build_examples(stage, n, CS, seed=8, epoch=1) for n in notes]
    assert [e.questions for e in a] != [e.questions for e in c]


def test_note_without_codes_still_gets_negatives_and_max_questions_caps():
    ex = build_examples(stages.CONCEPT, {"id": "z", "text": "t", "labels": []}, CS,
                        opts=ExampleOptions(min_negatives=3))
    assert ex.labels == [0, 0, 0]
    ex = build_examples(stages.CONCEPT, NOTE, CS, opts=ExampleOptions(max_questions=4))
    assert len(ex) == 4


def test_unknown_codes_are_an_error_or_dropped():
    notes = [{"id": "x", "text": "t", "labels": ["A1", "ZZZ"]}]
    with pytest.raises(DataError, match="'ZZZ' is not in concept set"):
        check_labels(notes, CS)
    assert check_labels(notes, CS, drop_unknown=True)[0]["labels"] == ["A1"]


def test_compact_label_layout_carries_the_same_answers():
    note = {"id": "n1", "text": "the note", "labels": ["A1"]}
    paper = build_examples(stages.LABEL, note, CS, seed=3, opts=ExampleOptions(k=3, m=2))
    compact = build_examples(stages.LABEL_COMPACT, note, CS, seed=3, opts=ExampleOptions(k=3, m=2))
    assert compact.labels == paper.labels and compact.keys == paper.keys
    assert compact.prefix.startswith(paper.prefix) and len(compact.prefix) > len(paper.prefix)
    for p, c in zip(paper.questions, compact.questions):
        shown = re.findall(r"contain '(.*?)'\?\nAnswer: (Yes|No)", p)
        assert re.findall(r"^- (.*): (Yes|No)$", c, re.M) == shown  # same concepts, answers and order
        assert len(c) < len(p) / 2
