"""train.py --stage label --concept-answers predicted: questions built from the concept model's own answers as
inference builds them, the concept scores kept and reused, the option recorded; pseudo answers unchanged."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cec.cli import user_errors
from cec.coding import stages
from cec.coding.pipeline import CECPipeline, PipelineConfig, shown_concepts
from cec.data import write_notes
from cec.training.concept_answers import SCORES_FILE, PredictedAnswers
from cec.training.examples import ExampleOptions, build_examples, note_rng
from tiny_train import save_tiny_model, tiny_concept_set, tiny_notes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def random_probs(cs, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(len(cs.concepts), generator=g)


@pytest.mark.parametrize("sampling,threshold,layout", [("top", 0.5, "paper"), ("random", 0.3, "paper"),
                                                       ("top", 0.8, "paper"), ("top", 0.5, "compact-probs")])
def test_predicted_questions_show_what_inference_shows(sampling, threshold, layout):
    cs = tiny_concept_set()
    notes = tiny_notes(6)
    config = PipelineConfig(k=2, m=2, sampling=sampling, concept_threshold=threshold, seed=3)
    probs = {n["id"]: random_probs(cs, i) for i, n in enumerate(notes)}
    answers = PredictedAnswers(config, cs, probs)
    opts = ExampleOptions(k=2, m=2)
    for note in notes:
        for epoch in (0, 1):
            stage = stages.get("label", layout)
            ex = build_examples(stage, note, cs, seed=7, epoch=epoch, opts=opts, drawer=answers)
            p = probs[note["id"]]
            shown = shown_concepts(config, cs, p, f"{epoch}/{note['id']}")
            for question, label, code in zip(ex.questions, ex.labels, ex.keys):
                ids = shown[cs.codes.index(code)]
                shown_answers = [(cs.concepts[i].text, bool(p[i] >= threshold), float(p[i])) for i in ids]
                expected = stage.question(cs.descriptions[code], shown_answers)
                assert question == expected and label == int(code in note["labels"])
                if stage.shows_probabilities:  # "Yes (0.93)": the very probability the concept model gave
                    text, yes, prob = shown_answers[0]
                    assert f"- {text}: {'Yes' if yes else 'No'} ({prob:.2f})\n" in question
                own = [i for i in ids if i in cs.concept_ids(code)]
                if sampling == "top":  # the code's highest-scoring concepts, as inference shows them
                    assert sorted(own) == sorted(sorted(cs.concept_ids(code), key=lambda i: -float(p[i]))[:2])
                outside = [i for i in ids if i not in cs.concept_ids(code)]
                negatives = [i for i in range(len(cs.concepts)) if p[i] < threshold and i not in cs.concept_ids(code)]
                assert len(outside) == min(2, len(negatives)) and set(outside) <= set(negatives)
            # the codes asked stay the paper's: the true codes and the same sampled false codes
            pseudo = build_examples(stages.LABEL, note, cs, seed=7, epoch=epoch, opts=opts)
            assert sorted(ex.keys) == sorted(pseudo.keys)
            assert set(note["labels"]) <= set(ex.keys)


def paper_draw_label(stage, note, cs, rng, opts):
    """_draw_label as it was before --concept-answers (frozen copy): pseudo examples must stay bit-identical."""
    def sample(pool, n):
        return rng.sample(pool, min(max(n, 0), len(pool)))
    true = [c for c in cs.codes if c in set(note["labels"])]
    c_pos = {i for code in true for i in cs.concept_ids(code)}
    c_neg = sorted({i for code in cs.codes for i in cs.concept_ids(code)} - c_pos)
    false_pool = [c for c in cs.codes if c not in set(true)]
    false = sample(false_pool, min(len(false_pool), max(round(opts.false_ratio * len(true)), opts.min_false)))
    out = []
    for code, y in [(c, 1) for c in true] + [(c, 0) for c in false]:
        own = cs.concept_ids(code)
        other = [i for i in (c_neg if y else sorted(c_pos)) if i not in set(own)]
        chosen = sample(own, opts.k) + sample(other, opts.m)
        rng.shuffle(chosen)
        out.append((stage.question(cs.descriptions[code], [(cs.concepts[i].text, i in c_pos) for i in chosen]),
                    y, code))
    return out


@pytest.mark.parametrize("layout", [x for x in stages.LABEL_LAYOUTS if not stages.get("label", x).shows_probabilities])
def test_pseudo_answers_are_the_papers_unchanged(layout):
    cs, stage = tiny_concept_set(), stages.get("label", layout)
    for opts in (ExampleOptions(), ExampleOptions(k=1, m=3, false_ratio=2.0, min_false=1)):
        for note in tiny_notes(6) + [{"id": "empty", "text": "nothing", "labels": []}]:
            for seed, epoch in ((0, 0), (5, 2)):
                got = stage.draw(note, cs, note_rng(seed, epoch, note["id"]), opts)
                assert got == paper_draw_label(stage, note, cs, note_rng(seed, epoch, note["id"]), opts)


# -- the CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("predicted")
    save_tiny_model(d / "model", "gemma3")
    tiny_concept_set().save(d / "cs.json")
    write_notes(d / "train.jsonl", tiny_notes(3))
    train.main(common(d, d / "concept") + ["--stage", "concept", "--steps", "1"])
    shutil.copytree(d / "concept", d / "not_concept")  # the same weights, recorded as a label adapter
    meta = json.loads((d / "not_concept" / "cec_adapter.json").read_text())
    (d / "not_concept" / "cec_adapter.json").write_text(json.dumps({**meta, "stage": "label"}))
    return d


def common(files, out):
    return ["--data", str(files / "train.jsonl"), "--concepts", str(files / "cs.json"), "--model",
            str(files / "model"), "--out", str(out), "--lora-r", "2", "--max-questions", "5", "--no-progress",
            "--max-tokens", "1024", "--grad-accum", "1"]


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        with user_errors("train.py"):
            train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1]


def test_predicted_run_scores_once_records_the_option_and_resumes(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "label"
    a = common(files, out) + ["--stage", "label", "--steps", "2", "--concept-answers", "predicted",
                              "--concept-adapter", str(files / "concept"), "--label-sampling", "random",
                              "--label-layout", "compact-probs"]
    calls = []
    real = CECPipeline.concept_probs
    monkeypatch.setattr(CECPipeline, "concept_probs", lambda self, *x, **kw: calls.append(1) or real(self, *x, **kw))
    train.main(a + ["--stop-at", "1"])
    scores = (out / SCORES_FILE).read_text()
    records = [json.loads(line) for line in scores.splitlines()]
    assert len(calls) == 3 and sorted(r["id"] for r in records) == ["n0", "n1", "n2"]
    assert all(len(r["scores"]) == len(tiny_concept_set().concepts) for r in records)

    pseudo = common(files, out) + ["--stage", "label", "--steps", "2", "--resume"]
    code, line = run_main(pseudo, capsys)
    assert code == 2 and "--concept-answers predicted, this run has pseudo" in line

    other = tmp_path / "other_concept"  # other adapter bytes
    shutil.copytree(files / "concept", other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "revision": "other"}))
    code, line = run_main([x if x != str(files / "concept") else str(other) for x in a] + ["--resume"], capsys)
    assert code == 2 and "answers of another concept adapter" in line

    train.main(a + ["--resume"])  # every note's scores are in the run folder: nothing is scored again
    assert len(calls) == 3 and (out / SCORES_FILE).read_text() == scores
    meta = json.loads((out / "cec_adapter.json").read_text())
    assert meta["stage"] == "label" and meta["concept_answers"] == "predicted" and meta["sampling"] == "random"
    assert meta["concept_adapter"] == str((files / "concept").resolve()) and meta["concept_threshold"] == 0.5
    assert meta["prompts"] == "compact-probs"  # "Yes (0.93)": the pipeline follows the adapter's layout


def test_a_pseudo_label_run_records_its_answers(files, tmp_path):
    train.main(common(files, tmp_path / "run") + ["--stage", "label", "--steps", "1"])
    meta = json.loads((tmp_path / "run" / "cec_adapter.json").read_text())
    assert meta["concept_answers"] == "pseudo" and "concept_adapter" not in meta
    assert not (tmp_path / "run" / SCORES_FILE).exists()


def test_bad_concept_answers_input_is_one_line_and_exit_2(files, tmp_path, capsys):
    base = common(files, tmp_path / "o")
    cases = [
        (["--stage", "label", "--concept-answers", "predicted"], "--concept-answers predicted needs --concept-adapter"),
        (["--stage", "label", "--concept-answers", "predicted", "--concept-adapter", str(files / "not_concept")],
         "a label-stage adapter, given as the concept-stage adapter"),
        (["--stage", "label", "--concept-answers", "predicted", "--concept-adapter", str(tmp_path / "none")],
         "--concept-adapter"),
        (["--stage", "concept", "--concept-answers", "predicted", "--concept-adapter", str(files / "concept")],
         "--concept-answers is for --stage label, not --stage concept"),
        (["--stage", "direct", "--concept-adapter", str(files / "concept")], "--concept-adapter is for --stage label"),
        (["--stage", "label", "--concept-adapter", str(files / "concept")],
         "--concept-adapter is for --concept-answers predicted"),
        (["--stage", "label", "--concept-answers", "predicted", "--concept-adapter", str(files / "concept"),
          "--concept-threshold", "2"], "--concept-threshold must be in [0, 1]"),
        (["--stage", "label", "--label-layout", "compact-probs"],
         "--label-layout compact-probs shows the concept model's probabilities"),
    ]
    for extra, expected in cases:
        code, line = run_main(base + extra, capsys)
        assert code == 2 and line.startswith("train.py: error:") and expected in line, (extra, line)
    assert not (tmp_path / "o" / SCORES_FILE).exists()
