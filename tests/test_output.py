"""The output layer (cec.coding.output): a NoteResult's plain data shaped as the JSON contract, rounded there."""
import json
from types import SimpleNamespace

import torch

from cec.coding.output import code_list, format_table, note_json, shaped, timing_json
from cec.coding.pipeline import NoteResult, PipelineConfig
from tiny_train import CODES, tiny_concept_set

CS = tiny_concept_set()


def pipeline(threshold=0.5):
    return SimpleNamespace(cs=CS, config=PipelineConfig(threshold=threshold, k=2), bottleneck=None)


def result(code_probs, shown=None, truncation=None, threshold=0.5):
    concept_p = torch.linspace(0.1, 0.9, len(CS.concepts))
    shown = shown or [CS.concept_ids(c)[:2] + [0] for c in CS.codes]
    timing = {"prefix_tokens": 120, "questions": 30, "seconds": 1.23456, "concept_seconds": 0.5004,
              "label_seconds": 0.73416}
    p = torch.tensor(code_probs, dtype=torch.float64)  # as the linear stage 2 gives them
    return NoteResult("n1", p, [x >= threshold for x in p.tolist()], concept_p, shown, timing, truncation)


def test_note_json_is_the_contract_rounded_and_sorted():
    probs = [0.1234567891, 0.49999999, 0.5000000001, 0.9, 0.0000004]
    doc = note_json(result(probs), "the note", pipeline())
    assert list(doc) == ["note", "code_system", "threshold", "codes", "timing"]
    assert doc["timing"] == {"prefix_tokens": 120, "questions": 30, "seconds": 1.235}
    codes = doc["codes"]
    assert [c["probability"] for c in codes] == [0.9, 0.5, 0.5, 0.123457, 0.0]  # rounded, most probable first
    by_code = {c["code"]: c for c in codes}
    names = list(CODES)
    # predicted compares the unrounded probability: 0.49999999 rounds to 0.5 but is under the threshold
    assert by_code[names[1]]["predicted"] is False and by_code[names[2]]["predicted"] is True
    assert [c["code"] for c in codes[1:3]] == [names[1], names[2]]  # equal once rounded: in the set's order
    assert list(codes[0]) == ["code", "description", "probability", "predicted", "evidence"]
    assert codes[0]["description"] == CODES[names[3]][0]
    for c in codes:
        ev = c["evidence"]
        assert [e["probability"] for e in ev] == sorted((e["probability"] for e in ev), reverse=True)
        assert {e["role"] for e in ev} <= {"own", "outside"} and all(len(e) == 4 for e in ev)
    json.dumps(doc)  # plain JSON types only


def test_note_json_options_and_truncation():
    cut = {"note_tokens": 4000, "kept_tokens": 3000, "kept_percent": 75.0}
    r = result([0.9, 0.1, 0.2, 0.3, 0.6], truncation=cut)
    doc = note_json(r, "the note", pipeline(), note=False, descriptions=False, only_predicted=True)
    assert "note" not in doc and doc["truncation"] == cut
    assert [c["code"] for c in doc["codes"]] == [list(CODES)[0], list(CODES)[4]]
    assert all("description" not in c for c in doc["codes"])
    assert code_list(r, pipeline())[0]["description"] == CODES[list(CODES)[0]][0]


def test_timing_json_rounds_seconds_only():
    assert timing_json({"prefix_tokens": 7, "seconds": 0.04996, "label_seconds": 2.0004}) == \
        {"prefix_tokens": 7, "seconds": 0.05, "label_seconds": 2.0}


def test_shaped_is_a_view_of_the_full_contract_and_the_table_quotes_the_top_span():
    full = note_json(result([0.9, 0.1, 0.2, 0.3, 0.6]), "Fever since Monday. " + "long words " * 20, pipeline())
    top = full["codes"][0]
    top["spans"] = [{"start": 0, "end": 19, "text": "Fever since Monday.", "score": 1.5},
                    {"start": 20, "end": 240, "text": "long words " * 20, "score": 0.5}]
    view = shaped(full, note=False, descriptions=False, only_predicted=True)
    assert list(view) == ["code_system", "threshold", "codes", "timing"] and "note" in full
    assert [c["code"] for c in view["codes"]] == [c["code"] for c in full["codes"] if c["predicted"]]
    assert view["codes"][0]["spans"] == top["spans"] and "description" in top  # the full doc is unchanged
    lines = format_table(full, full["timing"]).splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(f"  {top['code']} "))
    assert lines[i + 1].strip().startswith("evidence: ")
    assert lines[i + 2].strip() == 'in the note: "Fever since Monday."'
    second = full["codes"][1]
    second["spans"] = top["spans"][::-1]  # a long sentence is cut to one line
    line = format_table(full, full["timing"]).splitlines()[i + 5].strip()
    assert line.startswith('in the note: "long words long') and line.endswith('..."') and len(line) < 110
