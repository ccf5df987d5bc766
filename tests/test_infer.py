"""infer.py end to end on a tiny random Gemma 3 with a tiny concept set: output formats, stdin, HTML, batch mode
with resume and rank shards, and bad input (run as a subprocess: one line on stderr, exit 2, no traceback)."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cec.errors import DataError

from cec.commands import infer  # infer.py's body; infer.py itself runs as a subprocess below

ROOT = Path(__file__).resolve().parents[1]

NOTE = "Patient has fever and chills. High blood pressure on lisinopril.\nChronic kidney disease stage four.\n"
CONTRACT_KEYS = {"note", "code_system", "threshold", "codes", "timing"}
CODE_KEYS = {"code", "description", "probability", "predicted", "evidence"}
N_CONCEPTS = 18  # distinct concepts of tiny_train.tiny_concept_set()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model folder, a tiny concept set, a pipeline folder without adapters and one with."""
    from tiny_train import random_lora_, save_tiny_model, tiny_concept_set

    from cec.engine.lora import inject_lora, save_adapter
    from cec.engine.weights import load_model

    d = tmp_path_factory.mktemp("infer")
    save_tiny_model(d / "model")
    cs = tiny_concept_set()
    cs.save(d / "concepts.json")
    config = {"base_model": str(d / "model"), "concept_set": str(d / "concepts.json"), "threshold": 0.5}
    (d / "plain").mkdir()
    (d / "plain" / "cec_pipeline.json").write_text(json.dumps(config))
    for stage, seed in (("concept", 1), ("label", 2)):
        model, _ = load_model(d / "model")
        lora = inject_lora(model, "all-linear", r=4, alpha=8)
        random_lora_(model, seed=seed, scale=0.2)
        save_adapter(model, d / "adapted" / stage, lora, meta={"concept_set_codes": cs.codes})
    (d / "adapted" / "cec_pipeline.json").write_text(json.dumps(
        config | {"concept_adapter": "concept", "label_adapter": "label"}))
    return d


pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *args):
    assert infer.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def code_json(capsys, tiny, *args, pipeline="plain"):
    return json.loads(run(capsys, "--pipeline", tiny / pipeline, "--format", "json", *args))


def cli(tiny, *args, stdin: bytes | None = None):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *map(str, args)], input=stdin,
                          capture_output=True, env=env, cwd=tiny, timeout=600)


def write_note(tmp_path, text=NOTE, name="note.txt"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# -- one note ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_doc(tiny, tmp_path_factory):
    """NOTE coded once by the plain pipeline, as JSON."""
    note = write_note(tmp_path_factory.mktemp("note"))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        assert infer.main(["--pipeline", str(tiny / "plain"), "--note", str(note), "--format", "json"]) == 0
    return json.loads(out.getvalue())


def test_json_output_follows_the_contract(plain_doc, tiny, tmp_path, capsys, monkeypatch):
    doc = plain_doc
    assert set(doc) == CONTRACT_KEYS
    assert doc["note"] == NOTE and doc["code_system"] == "icd9cm" and doc["threshold"] == 0.5
    assert sorted(c["code"] for c in doc["codes"]) == ["A1", "B2", "C3", "D4", "E5"]
    probs = [c["probability"] for c in doc["codes"]]
    assert probs == sorted(probs, reverse=True)
    assert any(c["predicted"] for c in doc["codes"])
    for c in doc["codes"]:  # evidence is on by default: spans on each predicted code, a sentence per concept
        assert set(c) == CODE_KEYS | ({"spans"} if c["predicted"] else set()) and 0 <= c["probability"] <= 1
        assert c["predicted"] == (c["probability"] >= 0.5)
        ev_keys = {"concept", "level", "probability", "role"} | ({"sentence"} if c["predicted"] else set())
        assert c["evidence"] and all(set(e) == ev_keys for e in c["evidence"])
        for span in c.get("spans", []):
            assert NOTE[span["start"]:span["end"]] == span["text"] and span["score"] > 0
    assert set(doc["timing"]) == {"prefix_tokens", "questions", "seconds", "evidence_seconds"}
    assert doc["timing"]["questions"] == N_CONCEPTS + 5  # every concept once, then every code once

    # --no-explain: the same codes and probabilities, without the evidence sentences
    bare = code_json(capsys, tiny, "--note", write_note(tmp_path), "--no-explain")
    assert [(c["code"], c["probability"]) for c in bare["codes"]] == [(c["code"], c["probability"]) for c in doc["codes"]]
    assert all(set(c) == CODE_KEYS for c in bare["codes"]) and set(bare["timing"]) == {"prefix_tokens", "questions", "seconds"}

    # --evidence-gain: the same codes and probabilities, the spans ranked by drop + gain (attribution's gain=True)
    asked, add_evidence = [], infer.add_evidence
    monkeypatch.setattr(infer, "add_evidence", lambda *a, **kw: asked.append(kw) or add_evidence(*a, **kw))
    gained = code_json(capsys, tiny, "--note", write_note(tmp_path), "--evidence-gain")
    assert [kw["gain"] for kw in asked] == [True]
    assert [(c["code"], c["probability"]) for c in gained["codes"]] == [(c["code"], c["probability"]) for c in doc["codes"]]
    assert all(("spans" in c) == c["predicted"] for c in gained["codes"])
    with pytest.raises(SystemExit) as e:  # an argparse error, like the other options that do not go together
        infer.main(["--pipeline", str(tiny / "plain"), "--note", str(write_note(tmp_path)), "--no-explain",
                    "--evidence-gain"])
    assert e.value.code == 2 and "does not go with --no-explain" in capsys.readouterr().err

    # the options override the pipeline folder's values
    mid = probs[2]
    doc = code_json(capsys, tiny, "--note", write_note(tmp_path), "--threshold", mid, "--k", 1)
    assert doc["threshold"] == mid
    assert [c["predicted"] for c in doc["codes"]] == [c["probability"] >= mid for c in doc["codes"]]
    assert all(len(c["evidence"]) <= 1 + 2 for c in doc["codes"])  # k own concepts plus m = 2 outside


def test_table_lists_predicted_codes_first_then_timing(plain_doc, tiny, tmp_path, capsys):
    doc = plain_doc
    third = doc["codes"][2]["probability"]
    lines = run(capsys, "--pipeline", tiny / "plain", "--note", write_note(tmp_path), "--threshold",
                third).splitlines()
    assert lines[0] == f"Predicted codes (icd9cm, threshold {third:g}):"
    codes = [re.match(r"  (\S+)\s+([01]\.\d{3})  (.+)", ln) for ln in lines[1:]]
    shown = [(m[1], float(m[2]), m[3]) for m in codes if m]
    assert [c for c, _, _ in shown] == [c["code"] for c in doc["codes"]]  # 3 predicted, then the other 2
    assert lines[7] == "Next most likely:"
    assert [ln.strip().startswith("evidence: ") for ln in lines[2:7:2]] == [True] * 3
    assert re.fullmatch(rf"5 codes, {N_CONCEPTS + 5} questions, \d+ note tokens: [\d.]+ s "
                        r"\(concepts [\d.]+ s, codes [\d.]+ s\), evidence [\d.]+ s", lines[-1])

    none = dict(doc, threshold=1.0, codes=[dict(c, predicted=False) for c in doc["codes"]])
    lines = infer.format_table(none, {"questions": 28, "prefix_tokens": 400, "seconds": 1.25}).splitlines()
    assert lines[0] == "No code reached the threshold (icd9cm, threshold 1). Most likely:"
    assert lines[1].startswith(f"  {doc['codes'][0]['code']}") and lines[-2].lstrip().startswith("evidence: ")
    assert re.fullmatch(r"5 codes, 28 questions, 400 note tokens: 1.2 s, evidence [\d.]+ s", lines[-1])
    bare = dict(none, timing={k: v for k, v in none["timing"].items() if k != "evidence_seconds"})
    assert infer.format_table(bare, {"questions": 28, "prefix_tokens": 400, "seconds": 1.25}).splitlines()[-1] \
        == "5 codes, 28 questions, 400 note tokens: 1.2 s"


def test_stdin_and_demo(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(NOTE.encode())))
    doc = code_json(capsys, tiny, "--note", "-")
    assert doc["note"] == NOTE and len(doc["codes"]) == 5

    demo = code_json(capsys, tiny, "--demo")
    assert demo["note"] == infer.EXAMPLE_NOTE.read_text()
    assert 250 <= len(demo["note"].split()) <= 400


def test_html_report_of_a_note_with_markup(tiny, tmp_path, capsys):
    note = NOTE + "<script>document.title='pwned'</script>\n"
    out = tmp_path / "sub" / "report.html"
    run(capsys, "--pipeline", tiny / "plain", "--note", write_note(tmp_path, note), "--html", out, "--threshold", 0)
    page = out.read_text()
    assert "<script" not in page and "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    assert "<mark" in page and "fever" in page


def test_adapters_from_the_pipeline_folder_change_the_scores(plain_doc, tiny, tmp_path, capsys):
    plain = plain_doc
    adapted = code_json(capsys, tiny, "--note", write_note(tmp_path), pipeline="adapted")
    probs = lambda d: {c["code"]: c["probability"] for c in d["codes"]}  # noqa: E731
    assert set(probs(plain)) == set(probs(adapted)) and probs(plain) != probs(adapted)
    # 'none' drops an adapter of the folder: the concept stage is then the base model's again
    both_none = code_json(capsys, tiny, "--note", write_note(tmp_path), "--concept-adapter", "none",
                          "--label-adapter", "none", pipeline="adapted")
    assert probs(both_none) == pytest.approx(probs(plain), abs=1e-6)


@pytest.mark.parametrize("layout", ["compact", "compact-probs"])
def test_label_layout_follows_the_adapter_and_scores_equal_naive(tiny, tmp_path, layout):
    """A label adapter trained with the compact layout (cec_adapter.json "prompts"; or compact with each answer's
    probability) makes the pipeline ask those code questions; its code probabilities equal naive full-prompt
    scoring of exactly that text."""
    import torch

    from cec.coding import prompts, stages
    from cec.coding.output import code_list
    from cec.engine.scorer import head_for, score_naive
    from cec.coding.pipeline import CECPipeline, shown_concepts

    folder = tmp_path / "compact"
    shutil.copytree(tiny / "adapted", folder)
    meta_path = folder / "label" / "cec_adapter.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"prompts": layout}))
    pipe = CECPipeline.load(folder, fold=False)
    assert pipe.layout == layout and CECPipeline.load(tiny / "adapted").layout == "paper"
    assert CECPipeline.load(folder, label_layout="paper").layout == "paper"
    result = pipe.code_note(NOTE, "n0")
    shown = shown_concepts(pipe.config, pipe.cs, result.concept_probs, "n0")
    assert result.shown == shown
    p = result.concept_probs.tolist()
    make_prefix, make_question = {"compact": (prompts.compact_label_prefix, prompts.compact_label_question),
                                  "compact-probs": (prompts.probs_label_prefix, prompts.probs_label_question)}[layout]
    texts = [make_question(pipe.cs.descriptions[c],
                           [(pipe.cs.concepts[i].text, p[i] >= pipe.config.concept_threshold, p[i]) for i in ids])
             for c, ids in zip(pipe.cs.codes, shown)]
    assert all(t.startswith("---\n### Concepts:\n- ") for t in texts)
    assert (f"({p[shown[0][0]]:.2f})" in texts[0]) == (layout == "compact-probs")
    prefix, questions = stages.encode(pipe.tokenizer, make_prefix(NOTE), texts)
    yes, no = stages.get("label", layout).answer_ids(pipe.tokenizer)
    naive = torch.sigmoid(score_naive(pipe.label_model, head_for(pipe.label_model, yes, no), prefix, questions))
    assert result.code_probs.tolist() == pytest.approx(naive.tolist(), abs=1e-5)
    got = {c["code"]: c["probability"] for c in code_list(result, pipe)}  # the JSON's: rounded to 6 digits
    assert [got[c] for c in pipe.cs.codes] == pytest.approx(naive.tolist(), abs=1e-5)


# -- batch ---------------------------------------------------------------------------------------------------
def write_notes(path, n=3):
    lines = []
    for i in range(n):
        note = {"id": f"n{i}", "text": f"note {i}: the patient has fever and chronic renal failure."}
        if i != 1:
            note["labels"] = ["E5"]
        lines.append(json.dumps(note))
    path.write_text("\n".join(lines) + "\n")
    return path


def read_lines(path):
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(ln) for ln in raw.decode().split("\n")[:-1]]


def scores(line):
    return {c["code"]: c["probability"] for c in line["codes"]}


@pytest.fixture(scope="module")
def batch(tiny, tmp_path_factory):
    """(notes JSONL, predictions JSONL) of one uninterrupted single-process batch run over 3 notes."""
    d = tmp_path_factory.mktemp("batch")
    notes, out = write_notes(d / "notes.jsonl"), d / "preds.jsonl"
    assert infer.main(["--pipeline", str(tiny / "plain"), "--notes", str(notes), "--out", str(out)]) == 0
    return notes, out


def test_batch_writes_one_line_per_note_in_input_order(batch):
    lines = read_lines(batch[1])
    assert [ln["id"] for ln in lines] == ["n0", "n1", "n2"]
    assert list(lines[0]) == ["id", "labels", "code_system", "threshold", "codes", "timing"]
    assert lines[0]["labels"] == ["E5"] and "labels" not in lines[1]  # copied when the input has them
    assert all(len(ln["codes"]) == 5 for ln in lines)
    assert all("evidence_seconds" in ln["timing"] for ln in lines)  # evidence is on in batch mode too


def test_batch_resumes_after_a_crash_mid_line(batch, tiny, tmp_path, capsys, monkeypatch):
    notes, full = batch
    out = tmp_path / "preds.jsonl"
    raw = full.read_bytes().split(b"\n")
    out.write_bytes(raw[0] + b"\n" + raw[1][: len(raw[1]) // 2])  # killed while writing the second line
    run(capsys, "--pipeline", tiny / "plain", "--notes", notes, "--out", out)
    first, again = read_lines(full), read_lines(out)
    assert [ln["id"] for ln in again] == ["n0", "n1", "n2"]  # no duplicate, none missing, no half line
    assert again[0] == first[0]  # the whole line was kept as it was
    for a, b in zip(again[1:], first[1:]):
        assert scores(a) == pytest.approx(scores(b), abs=1e-5)

    # complete: nothing to do, the model is not even loaded
    monkeypatch.setattr(infer, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model for no note"))
    before = out.read_bytes()
    run(capsys, "--pipeline", tiny / "plain", "--notes", notes, "--out", out)
    assert out.read_bytes() == before


def test_batch_ranks_code_their_shards_and_rank0_merges_in_input_order(batch, tiny, tmp_path, capsys,
                                                                      monkeypatch):
    notes, single = batch
    out = tmp_path / "preds.jsonl"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run(capsys, "--pipeline", tiny / "plain", "--notes", notes, "--out", out)
    assert [ln["id"] for ln in read_lines(Path(f"{out}.rank1"))] == ["n1"]
    assert Path(f"{out}.rank1.done").is_file() and not out.exists()
    monkeypatch.setenv("RANK", "0")
    run(capsys, "--pipeline", tiny / "plain", "--notes", notes, "--out", out)
    merged = read_lines(out)
    assert [ln["id"] for ln in merged] == ["n0", "n1", "n2"]
    assert [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]  # shards and markers removed
    for a, b in zip(merged, read_lines(single)):
        assert scores(a) == pytest.approx(scores(b), abs=1e-5)


def test_rank0_waits_for_the_other_ranks_marker(tmp_path):
    notes = [{"id": f"n{i}", "text": "x"} for i in range(3)]
    out = tmp_path / "preds.jsonl"
    Path(f"{out}.rank0").write_text("".join(json.dumps({"id": n["id"]}) + "\n" for n in notes[0::2]))
    Path(f"{out}.rank0.done").write_text(json.dumps({"token": infer.shard_token(["n0", "n2"])}))
    Path(f"{out}.rank1.done").write_text(json.dumps({"token": infer.shard_token(["stale"])}))  # another run's
    merger = threading.Thread(target=infer.merge_shards, args=(out, notes, 2), kwargs={"poll_s": 0.02})
    merger.start()
    time.sleep(0.3)
    assert merger.is_alive() and not out.exists()
    Path(f"{out}.rank1").write_text(json.dumps({"id": "n1"}) + "\n")
    Path(f"{out}.rank1.done").write_text(json.dumps({"token": infer.shard_token(["n1"])}))
    merger.join(10)
    assert not merger.is_alive()
    assert [ln["id"] for ln in read_lines(out)] == ["n0", "n1", "n2"]


def pred(note_id: str) -> bytes:
    """A whole prediction line as infer.py writes it (id first)."""
    return json.dumps({"id": note_id, "code_system": "icd9cm", "threshold": 0.5, "codes": [],
                       "timing": {}}).encode() + b"\n"


def test_completed_ids_cuts_only_a_partial_last_line(tmp_path):
    known = {"a", "b", "c"}
    path = tmp_path / "p.jsonl"
    path.write_bytes(pred("a") + pred("b") + b'{"id": "c", "co')
    assert infer.completed_ids(path, known) == {"a", "b"}
    assert path.read_bytes() == pred("a") + pred("b")
    path.write_bytes(pred("a") + b'{"id": "b", "codes": [\n')  # the newline landed, the JSON did not
    assert infer.completed_ids(path, known) == {"a"}
    assert path.read_bytes() == pred("a")
    path.write_bytes(pred("a") + pred("b")[:-1])  # whole but for its newline: coded again
    assert infer.completed_ids(path, known) == {"a"}
    assert path.read_bytes() == pred("a")
    path.write_bytes(pred("a") + b"garbage\n" + pred("b"))
    with pytest.raises(DataError, match=r"p.jsonl:2: not a prediction line"):
        infer.completed_ids(path, known)
    path.write_bytes(pred("a") + pred("zz"))
    with pytest.raises(DataError, match=r"p.jsonl:2: note 'zz' is not in the input"):
        infer.completed_ids(path, known)
    path.write_bytes(b"")
    assert infer.completed_ids(path, known) == set()


def fails(capsys, *args) -> str:
    """infer.main in-process on bad input: exit status 2 and the one line it printed."""
    with pytest.raises(SystemExit) as e:
        infer.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


NOT_OURS = {  # issue 16, bugs 1 and 2: none of these is an earlier run's output
    "one_line": b"keep this line\n",
    "two_lines": b"first line\nsecond line\n",
    "no_final_newline": b"a note to self, no newline",
    "ids_only": b'{"id": "n0"}\n{"id": "n1"}\n',
    "notes": b'{"id": "n0", "text": "fever"}\n',
    "blank_lines": b"\n\n",
}


@pytest.mark.parametrize("case", NOT_OURS)
def test_an_out_that_is_not_an_earlier_output_is_refused_and_left_as_it_is(batch, tiny, tmp_path, capsys,
                                                                           monkeypatch, case):
    out = tmp_path / "keep.txt"
    out.write_bytes(NOT_OURS[case])
    monkeypatch.setattr(infer, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    err = fails(capsys, "--pipeline", tiny / "plain", "--notes", batch[0], "--out", out)
    assert re.match(r"infer\.py: error: .*keep\.txt:1: not a prediction line of infer\.py", err), err
    assert out.read_bytes() == NOT_OURS[case]


def test_out_equal_to_notes_is_refused(batch, tiny, tmp_path, capsys):
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(batch[0].read_bytes())
    before = notes.read_bytes()
    for out in (notes, tmp_path / "." / "notes.jsonl"):
        err = fails(capsys, "--pipeline", tiny / "plain", "--notes", notes, "--out", out)
        assert "is the notes file itself" in err, err
    (tmp_path / "link.jsonl").symlink_to(notes)
    assert "is the notes file itself" in fails(capsys, "--pipeline", tiny / "plain", "--notes", notes, "--out",
                                               tmp_path / "link.jsonl")
    assert notes.read_bytes() == before


def unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot create files in: a read-only one, or /sys for root (which ignores modes)."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_html_outputs_are_checked_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    note = write_note(tmp_path)
    monkeypatch.setattr(infer, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    target = unwritable_folder(tmp_path) / "r.html"
    err = fails(capsys, "--pipeline", tiny / "plain", "--note", note, "--html", target)
    assert f"cannot write {target}" in err and ".tmp" not in err, err
    assert "is the note itself" in fails(capsys, "--pipeline", tiny / "plain", "--note", note, "--html", note)
    mine = tmp_path / "mine.html"
    mine.write_text("<html><body>my own page</body></html>")
    assert "is not a report of infer.py" in fails(capsys, "--pipeline", tiny / "plain", "--note", note, "--html",
                                                  mine)
    assert note.read_text() == NOTE and mine.read_text() == "<html><body>my own page</body></html>"


def test_an_html_write_error_names_the_users_path(tiny, tmp_path, capsys, monkeypatch):
    """A failure while writing (a full disk) names --html, not the temp file beside it."""
    def full_disk(src, dst):
        raise OSError(28, "No space left on device", str(src))

    monkeypatch.setattr(os, "replace", full_disk)
    out = tmp_path / "r.html"
    with pytest.raises(SystemExit) as e:
        infer.main(["--pipeline", str(tiny / "plain"), "--note", str(write_note(tmp_path)), "--html", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and [ln for ln in err if "error" in ln] == err[-1:], err
    assert err[-1] == f"infer.py: error: {out}: No space left on device", err
    assert not list(tmp_path.glob(".r.html*"))


def test_a_label_adapter_given_as_the_concept_adapter_is_refused(tiny, tmp_path, capsys):
    label = tmp_path / "label"
    shutil.copytree(tiny / "adapted" / "label", label)
    meta = label / "cec_adapter.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"stage": "label"}))
    err = cli(tiny, "--pipeline", tiny / "plain", "--note", write_note(tmp_path), "--concept-adapter", label)
    last_line_error(err, r"label: a label-stage adapter, given as the concept-stage adapter")


def test_list_codes_prints_the_code_set_its_system_and_language(tiny, tmp_path, capsys):
    lines = run(capsys, "--pipeline", tiny / "plain", "--list-codes").splitlines()
    assert lines[0] == "tiny: 5 codes of ICD-9-CM (icd9cm); notes: not recorded"
    assert lines[1:] == [f"{c}\t{d}" for c, d in [("A1", "Acute renal failure"), ("B2", "Chronic kidney disease"),
                                                  ("C3", "Essential hypertension"), ("D4", "Type two diabetes"),
                                                  ("E5", "Fever of unknown origin")]]
    folder = tmp_path / "lang"
    shutil.copytree(tiny / "plain", folder)
    config = json.loads((folder / "cec_pipeline.json").read_text())
    (folder / "cec_pipeline.json").write_text(json.dumps(config | {"note_language": "Spanish"}))
    doc = json.loads(run(capsys, "--pipeline", folder, "--list-codes", "--format", "json"))
    assert doc["note_language"] == "Spanish" and doc["code_system"] == "icd9cm" and len(doc["codes"]) == 5
    shipped = run(capsys, "--list-codes").splitlines()  # the default: no model is loaded for this
    assert shipped[0].startswith("codiesp-d50: 50 codes of ICD-10-CM (icd10cm); notes: English")
    assert len(shipped) == 51


def test_only_predicted_and_no_text_keep_the_output_small(batch, plain_doc, tiny, tmp_path, capsys):
    notes, full = batch
    out = tmp_path / "small.jsonl"
    mid = (plain_doc["codes"][1]["probability"] + plain_doc["codes"][2]["probability"]) / 2
    run(capsys, "--pipeline", tiny / "plain", "--notes", notes, "--out", out, "--only-predicted", "--no-text",
        "--threshold", mid)
    for line in read_lines(out):
        assert all(c["predicted"] and "description" not in c for c in line["codes"])
    doc = code_json(capsys, tiny, "--note", write_note(tmp_path), "--no-text", "--only-predicted", "--threshold", mid)
    assert "note" not in doc and [c["code"] for c in doc["codes"]] == [c["code"] for c in plain_doc["codes"][:2]]


def test_encoding_reads_notes_that_are_not_utf8(plain_doc, tiny, tmp_path, capsys):
    note = write_note(tmp_path, NOTE.replace("fever", "fi\u00e8vre").encode("latin-1"))
    doc = code_json(capsys, tiny, "--note", note, "--encoding", "latin-1")
    assert doc["note"] == NOTE.replace("fever", "fi\u00e8vre")
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(json.dumps({"id": "a", "text": NOTE}, ensure_ascii=False).encode("utf-16"))
    run(capsys, "--pipeline", tiny / "plain", "--notes", notes, "--out", tmp_path / "o.jsonl", "--encoding", "utf-16")
    line = read_lines(tmp_path / "o.jsonl")
    assert [ln["id"] for ln in line] == ["a"] and len(line[0]["codes"]) == 5
    assert "not valid utf-16" in fails(capsys, "--pipeline", tiny / "plain", "--note", write_note(tmp_path, b"abc"),
                                       "--encoding", "utf-16")


def test_a_note_cut_to_the_token_budget_says_how_much_was_kept(tiny, tmp_path, capsys):
    folder = tmp_path / "short"
    shutil.copytree(tiny / "plain", folder)
    config = json.loads((folder / "cec_pipeline.json").read_text())
    (folder / "cec_pipeline.json").write_text(json.dumps(config | {"max_note_tokens": 24}))
    note = write_note(tmp_path, NOTE * 4)
    doc = code_json(capsys, tiny, "--note", note, pipeline=folder)
    cut = doc["truncation"]
    assert set(cut) == {"note_tokens", "kept_tokens", "kept_percent"} and cut["kept_tokens"] < cut["note_tokens"]
    assert cut["kept_percent"] == round(100 * cut["kept_tokens"] / cut["note_tokens"], 1)
    table = run(capsys, "--pipeline", folder, "--note", note)
    assert f"kept {cut['kept_tokens']} of {cut['note_tokens']} tokens ({cut['kept_percent']}%)" in table


# -- bad input: one line on stderr, exit 2 -----------------------------------------------------------------------
BAD_NOTES = {  # name: (file bytes or None for missing, stdin bytes, expected message)
    "empty": (b"", None, r"note\.txt: the note is empty"),
    "whitespace": (b"  \n\t \r\n", None, r"note\.txt: the note is empty"),
    "binary": (b"\x89PNG\x00\x01\x02fever", None, r"note\.txt: binary file"),
    "missing": (None, None, r"note\.txt: no such file"),
    "stdin_empty": ("-", b" \n", r"<stdin>: the note is empty"),
    "stdin_binary": ("-", b"fever\x00", r"<stdin>: binary data"),
}


def assert_one_line_error(proc, pattern):
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.match(rf"infer\.py: error: .*{pattern}", err), err


@pytest.mark.parametrize("case", BAD_NOTES)
def test_bad_note_is_one_line_and_exit_2(tiny, tmp_path, case):
    content, stdin, pattern = BAD_NOTES[case]
    if content == "-":
        proc = cli(tiny, "--pipeline", tiny / "plain", "--note", "-", stdin=stdin)
    else:
        if content is not None:
            write_note(tmp_path, content)
        proc = cli(tiny, "--pipeline", tiny / "plain", "--note", tmp_path / "note.txt")
    assert_one_line_error(proc, pattern)


BAD_JSONL = {
    "malformed": ('{"id": "a", "text": "fever"}\n{"id": "b", "text": "x\n', r"notes\.jsonl:2: invalid JSON"),
    "empty_text": ('{"id": "a", "text": "fever"}\n\n{"id": "b", "text": " "}\n', r"notes\.jsonl:3: 'text' must be a non-empty string \(note 'b'\)"),
    "no_id": ('{"text": "fever"}\n', r"notes\.jsonl:1: missing key 'id'"),
    "not_object": ('["a", "fever"]\n', r"notes\.jsonl:1: expected a JSON object"),
    "duplicate": ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', r"notes\.jsonl:2: duplicate note id"),
    "no_notes": ("\n\n", r"notes\.jsonl: no notes"),
}


@pytest.mark.parametrize("case", BAD_JSONL)
def test_bad_notes_jsonl_names_file_and_line(tiny, tmp_path, case):
    content, pattern = BAD_JSONL[case]
    (tmp_path / "notes.jsonl").write_text(content)
    proc = cli(tiny, "--pipeline", tiny / "plain", "--notes", tmp_path / "notes.jsonl", "--out", tmp_path / "o.jsonl")
    assert_one_line_error(proc, pattern)
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_inputs_are_one_line(tiny, tmp_path):
    note = write_note(tmp_path)
    assert_one_line_error(cli(tiny, "--pipeline", tiny / "plain", "--notes", tmp_path / "none.jsonl",
                              "--out", tmp_path / "o.jsonl"), r"none\.jsonl: no such notes file")
    assert_one_line_error(cli(tiny, "--pipeline", tmp_path / "nowhere", "--note", note), r"not a pipeline folder")
    assert_one_line_error(cli(tiny, "--pipeline", tiny / "plain", "--note", note, "--concepts", "no-such-set"),
                          r"no concept set 'no-such-set'")
    assert_one_line_error(cli(tiny, "--pipeline", tiny / "plain", "--note", note, "--device", "gpu7"),
                          r"unknown device 'gpu7'")


def last_line_error(proc, pattern):
    """Errors found after the model loaded: the load is logged first, the error is the one last line."""
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [ln for ln in lines if "error" in ln] == lines[-1:], err
    assert re.match(rf"infer\.py: error: .*{pattern}", lines[-1]), err


def test_adapter_mismatches_are_one_line(tiny, tmp_path):
    from hf_tiny import hf_model, ours_from_hf

    from cec.engine.lora import inject_lora, save_adapter

    note = write_note(tmp_path)
    last_line_error(cli(tiny, "--pipeline", tiny / "plain", "--note", note, "--label-adapter", tmp_path / "nope"),
                    r"adapter folder not found")
    other = ours_from_hf(hf_model("llama"))  # another base model
    save_adapter(other, tmp_path / "llama_adapter", inject_lora(other, "all-linear", r=4, alpha=8))
    last_line_error(cli(tiny, "--pipeline", tiny / "plain", "--note", note, "--concept-adapter",
                        tmp_path / "llama_adapter"), r"adapter was trained for another base model")
    shutil.copytree(tiny / "adapted" / "label", tmp_path / "truncated")
    weights = tmp_path / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    last_line_error(cli(tiny, "--pipeline", tiny / "plain", "--note", note, "--label-adapter", tmp_path / "truncated"),
                    r"unreadable safetensors file")
    # the shipped tiny adapter was trained for codes A1..E5; this concept set has other codes
    from tiny_train import tiny_concept_set

    from cec.coding.concepts import ConceptSet

    cs = tiny_concept_set()
    z = lambda d: {"Z" + c: v for c, v in d.items()}  # noqa: E731
    ConceptSet("other", cs.code_system, ["Z" + c for c in cs.codes], z(cs.descriptions), z(cs.parents), cs.concepts,
               z(cs.parent_ids), z(cs.leaf_ids)).save(tmp_path / "other_codes.json")
    last_line_error(cli(tiny, "--pipeline", tiny / "adapted", "--note", note, "--concepts",
                        tmp_path / "other_codes.json"), r"trained for another code set")


def test_non_utf8_note_is_decoded_with_a_warning(tiny, tmp_path):
    note = write_note(tmp_path, b"Fever and chills, caf\xe9 au lait spots.\n")
    proc = cli(tiny, "--pipeline", tiny / "plain", "--note", note, "--format", "json")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert re.search(r"^infer\.py: warning: .*note\.txt: not valid UTF-8", err, re.M), err
    assert json.loads(proc.stdout)["note"] == "Fever and chills, caf\ufffd au lait spots.\n"


def test_help_documents_the_decoding():
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--help"], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "U+FFFD" in proc.stdout and "status 2" in proc.stdout
