"""scripts/evaluate.py and cec.evaluation.systems on a tiny random model, a tiny concept set and invented notes."""
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cec.evaluation import metrics, score_cache, systems as evaluation

from cec.coding import stages
from cec.cli import user_errors
from cec.data import write_notes
from cec.coding.pipeline import PIPELINE_FILE, CECPipeline, PipelineConfig, shown_concepts

from tiny_train import CODES, random_lora_, save_tiny_model, tiny_concept_set, tiny_notes, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
evaluate_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate_script)

ALL_SYSTEMS = ["cec-k3", "cec-k4", "cec-k5", "cec-k6", "leaf", "direct", "direct-ft", "tfidf"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A pipeline folder (tiny llama, concept/label/direct adapters) and train/dev/test notes."""
    from cec.engine.lora import inject_lora, save_adapter
    from cec.coding.pipeline import share_base
    from cec.engine.weights import load_model

    root = tmp_path_factory.mktemp("evaluate")
    save_tiny_model(root / "model", "llama")
    cs = tiny_concept_set()
    cs.save(root / "concepts.json")
    pipe = root / "pipeline"
    model, _ = load_model(root / "model")
    for seed, stage in enumerate(("concept", "label", "direct")):
        twin = share_base(model)
        config = inject_lora(twin, r=4, alpha=8)
        random_lora_(twin, seed=seed, scale=0.3)
        save_adapter(twin, pipe / stage, config, meta={"concept_set_codes": cs.codes})
    PipelineConfig(base_model=str(root / "model"), concept_set=str(root / "concepts.json"), concept_adapter="concept",
                   label_adapter="label", k=4, max_note_tokens=10_000).save(pipe)
    raw = json.loads((pipe / PIPELINE_FILE).read_text())
    (pipe / PIPELINE_FILE).write_text(json.dumps({**raw, "direct_adapter": "direct"}))
    notes = tiny_notes(14)
    write_notes(root / "train.jsonl", notes[:8])
    write_notes(root / "dev.jsonl", notes[8:11])
    write_notes(root / "test.jsonl", notes[11:])
    return SimpleNamespace(root=root, pipe=pipe, cs=cs, notes=notes)


def run_cli(work, out: Path, *extra) -> dict:
    r = work.root
    evaluate_script.main(["--test", str(r / "test.jsonl"), "--dev", str(r / "dev.jsonl"), "--train",
                          str(r / "train.jsonl"), "--pipeline", str(work.pipe), "--out", str(out / "table.md"),
                          "--json", str(out / "results.json"), *extra])
    return json.loads((out / "results.json").read_text())


def count_concept_calls(monkeypatch) -> list:
    calls = []
    real = CECPipeline.concept_probs

    def counting(pipe, text, concept_ids=None):
        calls.append(text)
        return real(pipe, text, concept_ids)

    monkeypatch.setattr(CECPipeline, "concept_probs", counting)
    return calls


def cached_scores(path: Path, system: str, notes: list[dict]) -> np.ndarray:
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["system"] == system:
            rows[(r["id"], r["text"])] = r["scores"]
    return np.array([rows[(n["id"], score_cache.text_hash(n["text"]))] for n in notes])


def test_end_to_end_metrics_once_per_note_and_resume(work, tmp_path, monkeypatch):
    out = tmp_path / "out"
    dev, test = work.notes[8:11], work.notes[11:]

    # a quick run of two systems on the first 2 notes of each split: stage 1 once per note
    calls = count_concept_calls(monkeypatch)
    run_cli(work, out, "--max-notes", "2", "--systems", "cec-k3", "direct")
    assert sorted(calls) == sorted(n["text"] for n in dev[:2] + test[:2])

    # every system on every note: stage 1 once per new note, shared by k = 3..6 and leaf; the old notes reuse
    # their cached concept probabilities for the systems they lack
    calls.clear()
    payload = run_cli(work, out)
    assert sorted(calls) == sorted([dev[2]["text"], test[2]["text"]])
    assert [r["system"] for r in payload["systems"]] == ALL_SYSTEMS
    assert payload["setup"]["test_notes"] == 3 and payload["setup"]["dev_notes"] == 3

    # metrics are cec.evaluation.metrics on the cached scores: threshold tuned on dev, applied to test
    codes = work.cs.codes
    y_dev = metrics.label_matrix([n["labels"] for n in dev], codes)
    y_test = metrics.label_matrix([n["labels"] for n in test], codes)
    cache = out / "results.scores.jsonl"
    for r in payload["systems"]:
        dev_s, test_s = cached_scores(cache, r["system"], dev), cached_scores(cache, r["system"], test)
        assert dev_s.shape == (3, len(codes)) and test_s.shape == (3, len(codes))
        threshold = metrics.tune_threshold(y_dev, dev_s)
        want = metrics.evaluate(y_test, test_s, threshold)
        assert r["threshold"] == threshold
        for key in ("micro_f1", "macro_f1", "macro_f1_caml", "micro_auc", "macro_auc", "p_at_5",
                    "auc_labels_skipped"):
            if isinstance(want[key], float) and math.isnan(want[key]):
                assert r[key] is None
            else:
                assert r[key] == pytest.approx(want[key], abs=1e-12), (r["system"], key)
    by_key = {r["system"]: r for r in payload["systems"]}
    assert by_key["direct"]["micro_auc"] != by_key["direct-ft"]["micro_auc"]  # the adapter is applied
    assert by_key["tfidf"]["C"] in (0.1, 1.0, 10.0, 100.0, 1000.0)

    # the table names every system, in the paper's columns, and says which macro-F1 it is
    table = (out / "table.md").read_text()
    assert "| Models | AUC Macro | AUC Micro | F1 Macro | F1 Micro | P@5 | Threshold |" in table
    for name in ("TF-IDF + LR", "Direct coding w/o FT", "Direct coding w. FT", "Leaf concepts", "| CEC |",
                 "C+ = 3, C- = 2", "C+ = 4, C- = 2", "C+ = 5, C- = 2", "C+ = 6, C- = 2", "CEC - model (C+ = 4)"):
        assert name in table, name
    assert "mean of per-label F1" in table
    row = next(line for line in table.splitlines() if line.startswith("| Direct coding w. FT"))
    assert f"{by_key['direct-ft']['macro_f1']:.3f}" in row and f"{by_key['direct-ft']['micro_auc']:.3f}" in row

    # a re-run loads no model and computes nothing: every score comes from the cache
    class NoModels:
        def __init__(self, *a, **k):
            raise AssertionError("the model was loaded although every score is cached")

    monkeypatch.setattr(CECPipeline, "load", NoModels)
    monkeypatch.setattr("cec.evaluation.baselines.tfidf_logreg", NoModels)
    again = run_cli(work, out)
    assert again["systems"] == payload["systems"]


def test_evaluation_scores_are_what_infer_computes_and_direct_uses_the_base_model(work, tmp_path):
    """The evaluation's CEC scores of a note are CECPipeline.code_note's (infer.py's) probabilities; direct w/o FT
    runs the bare base model (no LoRA, no concept adapter), direct-ft the direct adapter."""
    from cec.engine.lora import lora_layers
    from cec.engine.scorer import head_for, score_naive
    from cec.engine.weights import load_model

    setup = evaluation.resolve_setup(work.pipe)
    systems, _ = evaluation.parse_systems(["cec-k4", "leaf", "direct", "direct-ft"], 4, True, False)
    note = work.notes[1]
    evaluator = evaluation.Evaluator(setup, systems, score_cache.ScoreCache(tmp_path / "s.jsonl"))
    scores = evaluator.scores([note], "test")
    want = CECPipeline.load(work.pipe).code_note(note["text"], note["id"])  # what infer.py computes
    assert scores["cec-k4"][0].tolist() == pytest.approx(want.code_probs.tolist(), abs=2e-6)
    assert not np.allclose(scores["leaf"][0], scores["cec-k4"][0])

    pipe = evaluator.pipe
    base, ft_model = pipe.direct_scorers[False].model, pipe.direct_scorers[True].model
    assert not lora_layers(base) and not lora_layers(ft_model)  # adapters folded into private copies
    bare, _ = load_model(work.root / "model")
    assert all(torch.equal(v, bare.state_dict()[k]) for k, v in base.state_dict().items())
    changed = [k for k, v in ft_model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)
    yes, no = stages.DIRECT.answer_ids(pipe.tokenizer)
    prefix = stages.prefix_ids(pipe.tokenizer, stages.DIRECT.prefix(note["text"]))
    naive = torch.sigmoid(score_naive(base, head_for(base, yes, no), prefix, pipe.direct_questions))
    torch.testing.assert_close(torch.tensor(scores["direct"][0], dtype=torch.float32), naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe.direct_probs(note["text"]), naive, atol=1e-5, rtol=1e-5)
    assert not np.allclose(scores["direct-ft"][0], scores["direct"][0])
    with pytest.raises(ValueError, match="not loaded"):
        CECPipeline.load(work.pipe).direct_probs(note["text"])


def test_concept_mean_is_stage_one_alone_and_stores_what_crossfit_fits_on(work, tmp_path, monkeypatch):
    """concept-mean: each code the mean of its own concepts' stage-1 probabilities, with those probabilities in
    the cache (under CONCEPTS, as the CEC systems store them); no code question is asked."""
    setup = evaluation.resolve_setup(work.pipe)
    systems, _ = evaluation.parse_systems(["concept-mean"], 4, True, False)
    note = work.notes[2]
    cache = score_cache.ScoreCache(tmp_path / "s.jsonl")
    evaluator = evaluation.Evaluator(setup, systems, cache)
    with monkeypatch.context() as mp:
        mp.setattr(CECPipeline, "code_probs", lambda *a, **k: pytest.fail("concept-mean asked a code question"))
        scores = evaluator.scores([note], "test")["concept-mean"][0]
    cp = CECPipeline.load(work.pipe).concept_probs(note["text"])
    want = [cp[work.cs.concept_ids(c)].mean().item() for c in work.cs.codes]
    assert scores.tolist() == pytest.approx(want, abs=2e-6)
    stored = cache.get(evaluation.CONCEPTS, evaluator.keys[evaluation.CONCEPTS], note)
    assert stored == pytest.approx(cp.tolist(), abs=1e-6)
    assert evaluator.keys["concept-mean"] != evaluator.keys[evaluation.CONCEPTS]


def test_shipped_pipeline_is_evaluated_with_its_label_llm_and_direct_adapter(capsys):
    """The shipped pipeline's stage 2 is linear: its CEC systems still ask its label LLM (its own layout), and
    direct-ft gets direct_adapter from cec_pipeline.json; no warning about a threshold evaluation does not use."""
    setup = evaluation.resolve_setup()
    assert setup.config.label_stage == "llm" and setup.config.label_layout == "compact"
    assert all(setup.adapters[stage] is not None and setup.adapter_hashes[stage] for stage in setup.adapters)
    assert setup.adapters["direct"].name == "direct"
    assert capsys.readouterr().err == ""


def test_leaf_view_shows_only_leaf_concepts():
    cs = tiny_concept_set()
    leaf = evaluation.leaf_view(cs)
    assert all(leaf.concept_ids(c) == cs.leaf_ids[c] for c in cs.codes)
    leaf_universe = {i for c in cs.codes for i in cs.leaf_ids[c]}
    config = PipelineConfig(k=2, m=2)
    concept_p = torch.linspace(0.05, 0.95, len(cs.concepts))
    positive = concept_p >= 0.5
    shown = shown_concepts(config, leaf, concept_p, "n0", 2)
    assert len(shown) == len(cs.codes)
    for code, ids in zip(cs.codes, shown):
        own = [i for i in ids if i in cs.leaf_ids[code]]
        outside = [i for i in ids if i not in cs.leaf_ids[code]]
        assert sorted(own) == sorted(sorted(cs.leaf_ids[code], key=lambda i: -float(concept_p[i]))[:2])
        assert len(outside) == 2 and all(i in leaf_universe and not positive[i] for i in outside)
    # the label questions show them with their predicted answers, about the view's code descriptions
    tok = tiny_tokenizer()
    pipe = SimpleNamespace(config=config, tokenizer=tok, cs=cs, stages={"label": stages.LABEL})
    questions = CECPipeline.label_question_ids(pipe, concept_p, shown, leaf)
    for code, ids, q in zip(cs.codes, shown, questions):
        answers = [(cs.concepts[i].text, bool(positive[i])) for i in ids]
        assert q == stages.question_ids(tok, stages.LABEL.question(CODES[code][0], answers))


def test_fingerprints_follow_what_each_system_depends_on(work):
    systems, _ = evaluation.parse_systems(None, 4, True, True)
    setup = evaluation.resolve_setup(work.pipe)
    keys = evaluation.fingerprints(setup, systems, "cpu", None)
    other = evaluation.resolve_setup(work.pipe, label_adapter=str(work.pipe / "direct"))
    changed = evaluation.fingerprints(other, systems, "cpu", None)
    assert changed[evaluation.CONCEPTS] == keys[evaluation.CONCEPTS]
    assert changed["direct"] == keys["direct"] and changed["direct-ft"] == keys["direct-ft"]
    assert all(changed[s] != keys[s] for s in ("cec-k3", "cec-k6", "leaf"))
    assert len({keys[s] for s in ("cec-k3", "cec-k4", "cec-k5", "cec-k6", "leaf")}) == 5
    assert evaluation.fingerprints(setup, systems, "cpu", torch.bfloat16)["direct"] != keys["direct"]


def test_torn_cache_line_is_skipped(tmp_path):
    path = tmp_path / "c.scores.jsonl"
    note = {"id": "a", "text": "some note"}
    cache = score_cache.ScoreCache(path)
    cache.put("direct", "k1", note, [0.25, 0.5])
    cache.close()
    with open(path, "a") as f:
        f.write('{"system": "direct", "key": "k1", "id": "b", "sco')
    cache = score_cache.ScoreCache(path)
    assert cache.skipped == 1 and cache.get("direct", "k1", note) == [0.25, 0.5]
    cache.put("direct", "k1", {"id": "c", "text": "x"}, [1.0, 0.0])
    cache.close()
    cache = score_cache.ScoreCache(path)
    assert cache.get("direct", "k1", {"id": "c", "text": "x"}) == [1.0, 0.0] and cache.skipped == 1
    assert cache.get("direct", "k2", note) is None and cache.get("direct", "k1", {"id": "a", "text": "new"}) is None


@pytest.mark.parametrize("extra, message", [
    (["--systems", "cec-k4", "bogus"], "unknown system 'bogus'"),
    (["--systems", "tfidf", "--no-train"], "system tfidf needs --train"),
    (["--max-notes", "0"], "--max-notes must be at least 1"),
    (["--bad-test"], "label 'Z9' is not in the code set"),
    (["--missing-test"], "no such notes file"),
])
def test_bad_input_is_one_line_and_exit_2(work, tmp_path, capsys, extra, message):
    r = work.root
    test = r / "test.jsonl"
    if "--bad-test" in extra:
        test = tmp_path / "bad.jsonl"
        write_notes(test, [{"id": "x", "text": "a note", "labels": ["Z9"]}])
    if "--missing-test" in extra:
        test = tmp_path / "absent.jsonl"
    argv = ["--test", str(test), "--dev", str(r / "dev.jsonl"), "--pipeline", str(work.pipe),
            "--out", str(tmp_path / "t.md")]
    if "--no-train" not in extra:
        argv += ["--train", str(r / "train.jsonl")]
    argv += [a for a in extra if a not in ("--bad-test", "--missing-test", "--no-train")]
    with pytest.raises(SystemExit) as e, user_errors("evaluate.py"):
        evaluate_script.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "t.md").exists()
