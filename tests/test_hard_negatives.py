"""train.py --stage concept --related-negatives / --confused-negatives: harder negatives drawn on top of the
paper's random ones, the closest relatives in the ICD tree first and the scoring adapter's own false positives;
with none asked for, the paper's examples unchanged."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cec.coding import stages
from cec.coding.concepts import Concept, ConceptSet
from cec.data import write_notes
from cec.training.concept_answers import SCORES_FILE
from cec.training.examples import ExampleOptions, build_examples, note_rng
from cec.training.hard_negatives import HardNegatives
from test_predicted_answers import common, files, run_main  # noqa: F401 (files: a fixture)
from tiny_train import tiny_concept_set, tiny_notes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

# real ICD-10-CM codes: R59.0 and R59.9 share the category R59; R50.9 and R52 the block R50-R69 with them;
# R05 only the chapter (18); I10 and E11.9 are in other chapters
ICD10 = ["R59.9", "R59.0", "R50.9", "R52", "R05", "I10", "E11.9"]


def icd10_concept_set(per_code: int = 3) -> ConceptSet:
    concepts = [Concept(i * per_code + j, f"{code} concept {j}", "leaf") for i, code in enumerate(ICD10)
                for j in range(per_code)]
    ids = {code: [i * per_code + j for j in range(per_code)] for i, code in enumerate(ICD10)}
    return ConceptSet("icd10-test", "icd10cm", ICD10, {c: f"description of {c}" for c in ICD10},
                      {c: (c[:3], c[:3]) for c in ICD10}, concepts, {c: [] for c in ICD10}, ids)


def asked(cs, ex):
    return [(int(k[1:]), y) for k, y in zip(ex.keys, ex.labels)]


def test_related_concepts_come_closest_relative_first():
    cs = icd10_concept_set()
    hard = HardNegatives(cs, related_ratio=1.0)
    groups = hard.related({"id": "n", "labels": ["R59.9"]})
    assert groups == [cs.concept_ids("R59.0"), cs.concept_ids("R50.9") + cs.concept_ids("R52"),
                      cs.concept_ids("R05")]  # category, block, chapter; I10 and E11.9 are not related
    assert hard.related({"id": "n", "labels": ["I10"]}) == []  # no other code of its chapter
    assert hard.related({"id": "n", "labels": []}) == []


def test_related_negatives_fill_the_closest_group_first():
    cs = icd10_concept_set()
    note = {"id": "n1", "text": "lymph nodes", "labels": ["R59.9"]}
    opts = ExampleOptions(neg_ratio=0.0, min_negatives=0)
    for ratio, expected_groups in ((1.0, 1), (2.0, 2)):  # 3 positives: 3 or 6 related negatives
        ex = build_examples(stages.CONCEPT, note, cs, seed=1, opts=opts, drawer=HardNegatives(cs, ratio))
        neg = [i for i, y in asked(cs, ex) if y == 0]
        assert len(neg) == round(3 * ratio) and len(set(neg)) == len(neg)
        if expected_groups == 1:
            assert set(neg) == set(cs.concept_ids("R59.0"))
        else:
            assert set(cs.concept_ids("R59.0")) < set(neg)
            assert set(neg) - set(cs.concept_ids("R59.0")) <= set(cs.concept_ids("R50.9") + cs.concept_ids("R52"))
        assert {i for i, y in asked(cs, ex) if y == 1} == set(cs.concept_ids("R59.9"))


def test_confused_negatives_are_the_scorers_yes_answers_never_a_positive():
    cs = tiny_concept_set()
    note = {"id": "n1", "text": "acute renal failure, on lisinopril", "labels": ["A1", "C3"]}
    pos = {i for c in note["labels"] for i in cs.concept_ids(c)}
    p = torch.zeros(len(cs.concepts))
    yes = [i for i in range(len(cs.concepts)) if i not in pos][:3] + sorted(pos)[:2]  # 3 false, 2 true Yes
    p[yes] = 0.9
    hard = HardNegatives(cs, confused_ratio=10.0, probs={"n1": p})
    ex = build_examples(stages.CONCEPT, note, cs, seed=0, opts=ExampleOptions(neg_ratio=0.0, min_negatives=0),
                        drawer=hard)
    neg = {i for i, y in asked(cs, ex) if y == 0}
    assert neg == set(yes[:3])  # every false Yes (fewer than asked for), no positive, nothing else
    with pytest.raises(KeyError, match="no concept scores"):
        hard.draw(stages.CONCEPT, {**note, "id": "unscored"}, note_rng(0, 0, "x"), ExampleOptions(), 0)
    with pytest.raises(ValueError, match="probabilities"):
        HardNegatives(cs, confused_ratio=1.0)


def test_hard_negatives_come_on_top_of_the_papers_random_ones():
    cs = icd10_concept_set()
    probs = {f"n{i}": torch.rand(len(cs.concepts), generator=torch.Generator().manual_seed(i)) for i in range(4)}
    notes = [{"id": f"n{i}", "text": "x", "labels": [ICD10[i], ICD10[i + 2]]} for i in range(4)]
    opts = ExampleOptions(neg_ratio=1.0, min_negatives=1)
    for note in notes:
        paper = build_examples(stages.CONCEPT, note, cs, seed=2, opts=opts)
        none = build_examples(stages.CONCEPT, note, cs, seed=2, opts=opts, drawer=HardNegatives(cs))
        assert none == paper  # no hard negatives asked for: bit-identical to the paper's draw
        hard = build_examples(stages.CONCEPT, note, cs, seed=2, opts=opts,
                              drawer=HardNegatives(cs, 0.5, 0.5, probs))
        assert set(zip(paper.keys, paper.labels)) < set(zip(hard.keys, hard.labels))
        assert len(hard) > len(paper) and len(set(hard.keys)) == len(hard.keys)


# -- the CLI (files: test_predicted_answers' tiny model, concept set, notes and concept adapter) -------------
def test_confused_run_scores_once_records_the_option_and_resumes(files, tmp_path, capsys):
    out = tmp_path / "run"
    write_notes(tmp_path / "dev.jsonl", [{**n, "id": "dev-" + n["id"]} for n in tiny_notes(2)])
    a = common(files, out) + ["--stage", "concept", "--steps", "2", "--confused-negatives", "1",
                              "--confused-from", str(files / "concept"), "--related-negatives", "0.5",
                              "--dev", str(tmp_path / "dev.jsonl"), "--eval-every", "1"]  # dev: unscored
    train.main(a + ["--stop-at", "1"])
    scores = (out / SCORES_FILE).read_text()
    assert sorted(json.loads(line)["id"] for line in scores.splitlines()) == ["n0", "n1", "n2"]
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("dev_loss" in r for r in logged)
    changed = [x if x != "0.5" else "1" for x in a] + ["--resume"]
    code, line = run_main(changed, capsys)
    assert code == 2 and "other hard negatives" in line
    train.main(a + ["--resume"])
    assert (out / SCORES_FILE).read_text() == scores  # every note scored once
    meta = json.loads((out / "cec_adapter.json").read_text())["hard_negatives"]
    assert meta["related"] == 0.5 and meta["confused"] == 1.0 and len(meta["confused_from_sha256"]) == 64


def test_a_plain_concept_run_records_no_hard_negatives_and_resumes_an_older_checkpoint(files, tmp_path):
    out = tmp_path / "run"
    a = common(files, out) + ["--stage", "concept", "--steps", "2"]
    train.main(a + ["--stop-at", "1"])
    (checkpoint,) = (out / "checkpoints").iterdir()
    meta_file = checkpoint / "cec_adapter.json"
    meta = json.loads(meta_file.read_text())
    assert meta["hard_negatives"] == {"related": 0.0, "confused": 0.0}
    del meta["hard_negatives"]  # a checkpoint written before hard negatives existed
    meta_file.write_text(json.dumps(meta))
    train.main(a + ["--resume"])
    assert not (out / SCORES_FILE).exists()


def test_bad_hard_negative_input_is_one_line_and_exit_2(files, tmp_path, capsys):
    base = common(files, tmp_path / "o")
    cases = [
        (["--stage", "label", "--related-negatives", "1"], "--related-negatives is for --stage concept"),
        (["--stage", "direct", "--confused-from", str(files / "concept")], "--confused-from is for --stage concept"),
        (["--stage", "concept", "--confused-negatives", "1"], "go together"),
        (["--stage", "concept", "--confused-from", str(files / "concept")], "go together"),
        (["--stage", "concept", "--confused-negatives", "1", "--confused-from", str(tmp_path / "none")],
         "no such folder"),
        (["--stage", "concept", "--related-negatives", "-1"], "must not be negative"),
    ]
    for extra, expected in cases:
        code, line = run_main(base + extra, capsys)
        assert code == 2 and line.startswith("train.py: error:") and expected in line, (extra, line)
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
