"""Negation, history and family-member clauses kept from the model (cec.coding.negation) and how the pipeline,
its JSON and the evaluation's cache keys carry them."""
import json

import pytest
import torch

from cec.coding.negation import blank, blanked_spans
from cec.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def read(text):
    spans = blanked_spans(text)
    return blank(text, spans), [s.kind for s in spans]


@pytest.mark.parametrize("text, kept, gone, kinds", [
    ("Admitted with cough and no chest pain or dyspnea, but with abdominal pain.",
     ["cough", "but with abdominal pain"], ["chest pain", "dyspnea"], ["negated"]),
    ("Tuberculosis was ruled out. Sputum culture grew Klebsiella.", ["Sputum culture grew Klebsiella"],
     ["Tuberculosis"], ["negated"]),
    ("Hepatitis B serology was negative; CMV IgM positive.", ["CMV IgM positive"], ["Hepatitis"], ["negated"]),
    ("The stool culture was negative for Salmonella; ova seen.", ["ova seen"], ["Salmonella", "stool"], ["negated"]),
    ("His father died of a myocardial infarction. He reports palpitations.", ["He reports palpitations"],
     ["myocardial"], ["family"]),
    ("He is an ex-smoker with chronic bronchitis.", ["with chronic bronchitis"], ["smoker"], ["past"]),
    ("A 60-year-old woman without relevant medical history consulted for hematuria.",
     ["consulted for hematuria"], ["relevant"], ["negated"]),
    ("There was no change in the size of the liver mass.", ["no change in the size of the liver mass"], [], []),
    ("Known history of hypertension and type 2 diabetes.", ["hypertension", "type 2 diabetes"], [], []),
])
def test_clauses_a_coder_would_not_code_are_blanked(text, kept, gone, kinds):
    got, found = read(text)
    assert len(got) == len(text) and found == kinds
    assert all(k in got for k in kept) and not any(g in got for g in gone)
    for a, b in zip(got, text):  # blanking keeps every other character where it was
        assert a == b or a == " "


def test_a_scope_ends_at_the_clause_and_the_window():
    got, _ = read("No fever; productive cough.\nDenies chest pain.\nAbdominal pain.")
    assert "productive cough" in got and "Abdominal pain" in got and "chest" not in got and "fever" not in got
    long = "No " + " ".join(f"w{i}" for i in range(12)) + "."
    got, _ = read(long)
    assert "w5" not in got and "w6" in got  # six words at most (NegEx's window is five)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_train import save_tiny_model, tiny_concept_set

    d = tmp_path_factory.mktemp("neg")
    save_tiny_model(d / "model", vocab_size=600)
    tiny_concept_set().save(d / "concepts.json")
    (d / "cec_pipeline.json").write_text(json.dumps(
        {"base_model": str(d / "model"), "concept_set": str(d / "concepts.json"), "threshold": 0.0,
         "negation": "on"}))
    return d


NOTE = "Patient has chills.\nNo fever and no high blood pressure.\nHis mother had kidney injury."


def test_pipeline_reads_the_blanked_note_and_says_what_it_left_out(folder):
    from cec.coding.output import note_json
    from cec.coding.pipeline import CECPipeline

    on = CECPipeline.load(folder)
    off = CECPipeline.load(folder, negation="off")
    result = on.code_note(NOTE)
    blanked = on.readable(NOTE)
    assert len(blanked) == len(NOTE) and "fever" not in blanked and "kidney" not in blanked and "chills" in blanked
    assert torch.allclose(result.concept_probs, off.code_note(blanked).concept_probs, atol=1e-6)
    assert not torch.allclose(result.concept_probs, off.code_note(NOTE).concept_probs, atol=1e-4)
    doc = note_json(result, NOTE, on)
    assert doc["note"] == NOTE  # the note as given, never the blanked one
    assert [(d["kind"], d["text"]) for d in doc["not_read"]] == [
        ("negated", "No fever and no high blood pressure"), ("family", "His mother had kidney injury")]
    assert all(NOTE[d["start"]:d["end"]] == d["text"] for d in doc["not_read"])
    assert "not_read" not in note_json(off.code_note(NOTE), NOTE, off)


def test_evidence_spans_point_into_the_note_as_given(folder):
    from cec.coding.attribution import add_evidence
    from cec.coding.output import note_json
    from cec.coding.pipeline import CECPipeline

    pipe = CECPipeline.load(folder)
    result = pipe.code_note(NOTE)
    doc = add_evidence(note_json(result, NOTE, pipe), pipe, NOTE, result)
    spans = [s for c in doc["codes"] for s in c.get("spans", [])]
    assert all(NOTE[s["start"]:s["end"]] == s["text"] for s in spans)
    assert not any("mother" in s["text"] for s in spans)  # wholly blanked: nothing of it is read


def test_a_bad_negation_value_is_refused(folder, tmp_path):
    from cec.coding.pipeline import resolve_config

    with pytest.raises(ConfigError, match="negation"):
        resolve_config(folder, negation="maybe")
    (tmp_path / "cec_pipeline.json").write_text(json.dumps({"negation": "yes"}))
    with pytest.raises(DataError, match="negation"):
        resolve_config(tmp_path)


def test_cache_keys_change_with_negation_only_when_it_is_on(folder):
    from cec.evaluation.systems import CONCEPTS, System, fingerprints, resolve_setup

    systems = [System("direct", "direct")]
    on = fingerprints(resolve_setup(folder), systems, "cpu", None)
    setup = resolve_setup(folder)
    setup.config.negation = "off"
    off = fingerprints(setup, systems, "cpu", None)
    assert on[CONCEPTS] != off[CONCEPTS] and on["direct"] != off["direct"]


def test_report_lists_what_the_model_did_not_read(folder):
    from cec.coding.output import note_json
    from cec.coding.pipeline import CECPipeline
    from cec.coding.report import render_report

    pipe = CECPipeline.load(folder)
    page = render_report(note_json(pipe.code_note(NOTE), NOTE, pipe))
    assert "Not read by the model" in page and "His mother had kidney injury" in page
    off = CECPipeline.load(folder, negation="off")
    assert "Not read by the model" not in render_report(note_json(off.code_note(NOTE), NOTE, off))


@pytest.mark.parametrize("text, kept, gone", [
    # a backward "negative" stops at a positive finding; "with" starts new content
    ("IgM for parvovirus B19 are positive and IgG negative.", ["parvovirus B19 are positive"], ["IgG"]),
    ("Delivery at 37 weeks without complications, with an Apgar score of 9/10.", ["with an Apgar score"],
     ["complications"]),
    ("Denies chest pain with exertion.", ["with exertion"], ["chest pain"]),
    # the patient's own relations are not a relative's findings
    ("Jaundice, first daughter of young parents, healthy.", ["Jaundice"], []),
    ("Sociofunctional situation: lives with their parents. Asthma.", ["lives with their parents", "Asthma"], []),
    # "No 139" is sodium as the translation spells it, not a negation
    ("Ionogram: No 139, K 4.2, Cl 101. No fever.", ["No 139, K 4.2"], ["fever"]),
    # a reason ends a forward scope; a stopped treatment negates nothing; a relative's clause keeps its reason
    ("Metformin was stopped because of the reduced kidney function.", ["Metformin was stopped because of the "
     "reduced kidney function"], []),
    ("Biopsy was not possible because the compression exerted by the mass.", ["because the compression"],
     ["possible"]),
    ("Falls without loss of consciousness due to abnormal movements.", ["due to abnormal movements"],
     ["consciousness"]),
    ("Again, CAPD was stopped and HD was restarted.", ["CAPD was stopped and HD was restarted"], []),
    ("He stopped smoking in 2015.", [], ["smoking"]),
    ("He smokes; a brother died due to lung cancer.", ["He smokes"], ["lung cancer"]),
    # a two-word end ("aside from", "apart from") ends a scope both ways
    ("No fever aside from chills.", ["aside from chills"], ["fever"]),
    ("Anemia aside from thrombocytopenia was excluded.", ["Anemia aside from"], ["thrombocytopenia"]),
])
def test_scopes_found_over_reaching_on_training_notes(text, kept, gone):
    got, _ = read(text)
    assert all(k in got for k in kept) and not any(g in got for g in gone), got


def test_the_rules_are_in_the_cache_key_when_negation_is_on(monkeypatch):
    from cec.coding import negation

    assert len(negation.RULES) == 12
    before = negation.RULES
    monkeypatch.setattr(negation, "ENDS", negation.ENDS + ("meanwhile",))
    redone = negation.rules_hash()
    assert redone != before


def test_negation_gold_counts_blanked_gold_mentions_by_spanish_cue(shared_dir, tmp_path, capsys):
    """scripts/negation_gold.py on three CodiEsp dev notes: every mention is counted once, by kind."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "negation_gold.py"
    spec = importlib.util.spec_from_file_location("negation_gold", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.spanish_cue("Paciente sin fiebre ni tos.", [(14, 20)]) == "negated"
    assert mod.spanish_cue("Serología de VIH negativa.", [(13, 16)]) == "negated"
    assert mod.spanish_cue("Su madre tenía diabetes.", [(15, 23)]) == "family"
    assert mod.spanish_cue("Presenta fiebre alta.", [(9, 15)]) is None

    src = shared_dir / "data" / "codiesp"
    codes = [ln.split("\t")[0] for ln in (src / "codiesp50_codes.tsv").read_text().splitlines()[1:] if ln.strip()]
    gold = {}
    for ln in (src / "dev" / "devD.tsv").read_text().splitlines():
        nid, code = ln.split("\t")
        gold.setdefault(nid, []).append(code.upper())
    ids = sorted(gold)[:3]
    notes = tmp_path / "dev.jsonl"
    notes.write_text("".join(json.dumps({"id": i, "text": (src / "dev" / "text_files_en" / f"{i}.txt").read_text(),
                                         "labels": [c for c in gold[i] if c in codes]}) + "\n" for i in ids))
    codes_file = tmp_path / "codes.txt"
    codes_file.write_text("\n".join(codes) + "\n")
    out = mod.main(["--src", str(src), "--notes", str(notes), "--codes", str(codes_file)])
    assert out["notes"] == 3 and out["mentions"] > 0
    assert sum(out["blanked"].values()) + sum(out["cued_but_read"].values()) <= out["mentions"]
    assert out["mentions_with_spanish_cue"] >= sum(out["cued_but_read"].values())
    assert json.loads(capsys.readouterr().out) == out
    coder = tmp_path / "coder.jsonl"
    out = mod.main(["--src", str(src), "--notes", str(notes), "--codes", str(codes_file), "--coder-notes", str(coder)])
    written = [json.loads(line) for line in coder.read_text().splitlines()]
    given = [json.loads(line) for line in notes.read_text().splitlines()]
    assert [n["id"] for n in written] == ids and [n["text"] for n in written] == [n["text"] for n in given]
    taken = sum(len(n.get("blanked_labels", [])) for n in written)
    assert taken == out["coder_notes"]["labels_taken_out"] <= out["gold_pairs_all_mentions_blanked"]
    assert sum(map(len, (n["labels"] for n in written))) + taken == sum(map(len, (n["labels"] for n in given)))
    with pytest.raises(DataError, match="exists"):  # never over a file
        mod.main(["--src", str(src), "--notes", str(notes), "--codes", str(codes_file), "--coder-notes", str(coder)])
    capsys.readouterr()


def test_negation_gold_scores_the_bottleneck_with_and_without_left_out_gold_pairs(tmp_path):
    """negation_gold.without_pairs: the shipped pipeline's two-fold bottleneck over a score cache, against all gold
    and with the given gold pairs left out (no ../shared: notes and stage-1 scores made up here)."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np

    path = Path(__file__).resolve().parents[1] / "scripts" / "negation_gold.py"
    spec = importlib.util.spec_from_file_location("negation_gold", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import crossfit_eval  # scripts/ is on sys.path once negation_gold is loaded

    from cec.evaluation.score_cache import ScoreCache
    from cec.evaluation.systems import CONCEPTS, fingerprints, resolve_setup
    from tiny_train import made_up_stage1

    setup = resolve_setup(None)
    cs = setup.concept_set
    key = fingerprints(setup, crossfit_eval.LLM_SYSTEMS, "cpu", None)[CONCEPTS]
    rng = np.random.default_rng(0)
    notes, cache = [], ScoreCache(tmp_path / "scores.jsonl")
    for note, p in made_up_stage1(cs, 40, 6, rng):
        cache.put(CONCEPTS, key, note, p)
        notes.append(note)
    cache.close()
    args = SimpleNamespace(pipeline=None, cache=str(tmp_path / "scores.jsonl"), notes="dev.jsonl", fit_train=None)
    whole = mod.without_pairs(args, notes, set())
    assert whole["gold_pairs_left_out"] == 0
    assert whole["micro_auc_without"] == whole["micro_auc"] and whole["micro_f1_without"] == whole["micro_f1"]
    gold = [(n["id"], c) for n in notes for c in n["labels"]]
    dropped = set(gold[:5]) | {("n0", "not a code"), ("nobody", cs.codes[0])}  # pairs that are not gold count not
    part = mod.without_pairs(args, notes, dropped)
    assert part["gold_pairs_left_out"] == 5 and part["micro_auc"] == whole["micro_auc"]
    assert part["micro_f1_without"] != whole["micro_f1"]
    # fitted on coder labels: the same as on all gold when nothing is dropped, another fit when pairs are
    assert whole["fitted_on_coder_labels"] == {k: whole[k] for k in whole["fitted_on_coder_labels"]}
    assert part["fitted_on_coder_labels"]["micro_f1"] < part["micro_f1"]  # it learnt not to code those pairs
    # --fit-train: the bottleneck also fits on training notes of the cache (here: 30 of the notes, renamed, with
    # the codes they lack as labels: they pull the fit off, so the figures move)
    from cec.data import write_notes

    train = [n | {"id": "t" + n["id"], "labels": [c for c in cs.codes[:6] if c not in n["labels"]]}
             for n in notes[:30]]
    write_notes(tmp_path / "train.jsonl", train)
    with pytest.raises(DataError, match="only 0 notes"):
        mod.without_pairs(SimpleNamespace(**{**vars(args), "fit_train": str(tmp_path / "train.jsonl")}), notes, set())
    cache = ScoreCache(tmp_path / "scores.jsonl")
    for n, old in zip(train, notes):
        cache.put(CONCEPTS, key, n, cache.get(CONCEPTS, key, old))
    cache.close()
    more = mod.without_pairs(SimpleNamespace(**{**vars(args), "fit_train": str(tmp_path / "train.jsonl")}), notes, set())
    assert more["micro_auc"] != whole["micro_auc"]
    # a coder-notes training file: the gold fit reads labels + blanked_labels, the coder-label fit labels only
    coder = [n | {"labels": n["labels"][1:], "blanked_labels": n["labels"][:1]} for n in train]
    write_notes(tmp_path / "train_coder.jsonl", coder)
    both = mod.without_pairs(SimpleNamespace(**{**vars(args), "fit_train": str(tmp_path / "train_coder.jsonl")}),
                             notes, set())
    assert both["micro_auc"] == more["micro_auc"]
    assert both["fitted_on_coder_labels"] != more["fitted_on_coder_labels"]


# -- training on the notes as a pipeline with negation on reads them ------------------------------------------
def test_train_negation_on_blanks_the_training_notes_records_it_and_resume_keeps_it(tmp_path, capsys):
    """train.py --negation on: the notes it trains on are blanked as infer.py blanks them (same length, so
    offsets hold), cec_adapter.json records it, and a checkpoint resumes only with the same --negation."""
    import sys
    from pathlib import Path

    from cec.data import write_notes
    from test_predicted_answers import common, run_main
    from tiny_train import save_tiny_model, tiny_concept_set, tiny_notes

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train
    from cec.commands.train import parse_args, read_data

    save_tiny_model(tmp_path / "model", "gemma3")
    tiny_concept_set().save(tmp_path / "cs.json")
    notes = [{**n, "text": n["text"] + " denies chest pain."} for n in tiny_notes(3)]
    write_notes(tmp_path / "train.jsonl", notes)
    a = common(tmp_path, tmp_path / "run") + ["--stage", "concept", "--steps", "2"]
    _, read, _ = read_data(parse_args(a + ["--negation", "on"]))
    for before, after in zip(notes, read):
        assert after["text"] == blank(before["text"], blanked_spans(before["text"]))
        assert len(after["text"]) == len(before["text"]) and "chest pain" not in after["text"]
    _, plain, _ = read_data(parse_args(a))
    assert [n["text"] for n in plain] == [n["text"] for n in notes]  # the default: read as given

    train.main(a + ["--negation", "on", "--stop-at", "1"])
    code, line = run_main(a + ["--resume"], capsys)
    assert code == 2 and "trained with --negation on" in line
    train.main(a + ["--negation", "on", "--resume"])
    assert json.loads((tmp_path / "run" / "cec_adapter.json").read_text())["negation"] == "on"


def test_coder_notes_move_the_blanked_gold_codes_out_of_the_labels():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "negation_gold.py"
    spec = importlib.util.spec_from_file_location("negation_gold", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    notes = [{"id": "a", "text": "no fever. cough.", "labels": ["R50.9", "R05"]},
             {"id": "b", "text": "fever.", "labels": ["R50.9"]}]
    out = mod.coder_notes(notes, {("a", "R50.9"), ("b", "R05")})
    assert out == [{"id": "a", "text": "no fever. cough.", "labels": ["R05"], "blanked_labels": ["R50.9"]},
                   {"id": "b", "text": "fever.", "labels": ["R50.9"]}]
    assert notes[0]["labels"] == ["R50.9", "R05"]  # the notes given are not changed


def test_readable_notes_blank_copies_with_negation_on_and_pass_notes_through_with_off():
    from cec.coding.negation import blank, blanked_spans, readable_notes

    notes = [{"id": "a", "text": "No fever. Cough since Monday.", "labels": ["R05"]}]
    read = readable_notes(notes, "on")
    assert read[0]["text"] == blank(notes[0]["text"], blanked_spans(notes[0]["text"])) != notes[0]["text"]
    assert len(read[0]["text"]) == len(notes[0]["text"]) and read[0]["labels"] == ["R05"]
    assert notes[0]["text"] == "No fever. Cough since Monday."  # the given notes are not changed
    assert readable_notes(notes, "off") == notes
