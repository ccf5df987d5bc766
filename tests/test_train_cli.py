"""train.py end to end on a tiny model: a run, its adapter, --resume; bad input is one line and exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cec.cli import user_errors
from cec.data import write_notes
from cec.engine.lora import load_adapter
from cec.engine.weights import load_model
from tiny_train import save_tiny_model, tiny_concept_set, tiny_notes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_cli")
    save_tiny_model(d / "model", "gemma3")
    tiny_concept_set().save(d / "cs.json")
    write_notes(d / "train.jsonl", tiny_notes(4))
    write_notes(d / "dev.jsonl", tiny_notes(2))
    return d


def args(files, out, *extra):
    return ["--data", str(files / "train.jsonl"), "--concepts", str(files / "cs.json"), "--model",
            str(files / "model"), "--out", str(out), "--lora-r", "2", "--max-questions", "5", "--no-progress",
            "--max-tokens", "1024", *extra]


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        with user_errors("train.py"):
            train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1]


@pytest.mark.parametrize("stage", ["concept", "label", "direct"])
def test_each_stage_trains_an_adapter_that_loads(files, tmp_path, stage):
    train.main(["--stage", stage, *args(files, tmp_path / "run", "--steps", "2", "--grad-accum", "1",
                                        "--dev", str(files / "dev.jsonl"))])
    out = tmp_path / "run"
    cfg = json.loads((out / "adapter_config.json").read_text())
    meta = json.loads((out / "cec_adapter.json").read_text())
    assert meta["stage"] == stage and meta["concept_set"] == "tiny"
    if stage == "label":  # the paper's label-stage defaults
        assert cfg["lora_alpha"] == 128 and sorted(cfg["target_modules"]) == ["k_proj", "v_proj"]
    else:
        assert cfg["lora_alpha"] == 32 and len(cfg["target_modules"]) == 7 and cfg["lora_dropout"] == 0.05
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2] and "dev_auc" in log[-1]
    model, _ = load_model(str(files / "model"))
    load_adapter(model, out)


def test_init_adapter_continues_from_its_weights_in_the_compact_layout(files, tmp_path):
    import torch

    from cec.engine.lora import lora_state_dict

    train.main(["--stage", "label", *args(files, tmp_path / "paper", "--steps", "1", "--grad-accum", "1")])
    train.main(["--stage", "label", *args(files, tmp_path / "compact", "--steps", "1", "--grad-accum", "1",
                                          "--lr", "0", "--label-layout", "compact",
                                          "--init-adapter", str(tmp_path / "paper"))])
    meta = json.loads((tmp_path / "compact" / "cec_adapter.json").read_text())
    assert meta["prompts"] == "compact" and meta["init_adapter"] == str(tmp_path / "paper")
    weights = []
    for run in ("paper", "compact"):
        model, _ = load_model(str(files / "model"))
        load_adapter(model, tmp_path / run)
        weights.append(lora_state_dict(model))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # lr 0: the init, unchanged


def test_resume_continues_and_an_existing_run_needs_resume(files, tmp_path, capsys):
    a = args(files, tmp_path / "run", "--stage", "concept", "--steps", "3", "--grad-accum", "1")
    train.main(a + ["--stop-at", "2"])
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    code, line = run_main(a, capsys)
    assert code == 2 and "already holds a run; pass --resume" in line
    train.main(a + ["--resume"])
    log = [json.loads(ln) for ln in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]


def test_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys):
    base = ["--stage", "concept", "--concepts", str(files / "cs.json"), "--model", str(files / "model"),
            "--out", str(tmp_path / "o")]
    code, line = run_main(base + ["--data", str(tmp_path / "missing.jsonl")], capsys)
    assert code == 2 and "missing.jsonl" in line and line.startswith("train.py: error:")
    (tmp_path / "empty_text.jsonl").write_text(json.dumps({"id": "a", "text": " ", "labels": []}) + "\n")
    code, line = run_main(base + ["--data", str(tmp_path / "empty_text.jsonl")], capsys)
    assert code == 2 and "'text' must be a non-empty string" in line
    (tmp_path / "unknown.jsonl").write_text(json.dumps({"id": "a", "text": "x", "labels": ["Q99"]}) + "\n")
    code, line = run_main(base + ["--data", str(tmp_path / "unknown.jsonl")], capsys)
    assert code == 2 and "'Q99' is not in concept set" in line
    code, line = run_main(base + ["--data", str(files / "train.jsonl"), "--lora-dropout", "1.5"], capsys)
    assert code == 2 and "--lora-dropout" in line
    code, line = run_main([*base[:2], "--concepts", "no-such-set", *base[4:], "--data", str(files / "train.jsonl")],
                          capsys)
    assert code == 2 and "no-such-set" in line
    code, line = run_main(base + ["--data", str(files / "train.jsonl"), "--device", "gpu7"], capsys)
    assert code == 2 and line == "train.py: error: unknown device 'gpu7' (cpu, cuda, cuda:N, ...)"
    code, line = run_main(base + ["--data", str(files / "train.jsonl"), "--threads", "0"], capsys)
    assert code == 2 and line.endswith("error: argument --threads: must be at least 1, got 0")


def test_help_documents_every_option_and_the_script_runs_as_a_program():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    parser_options = {s for a in train_parser_actions() for s in a.option_strings}
    for option in parser_options:
        assert option in proc.stdout
    assert all(a.help for a in train_parser_actions())
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--stage", "concept", "--data", "x.jsonl",
                           "--concepts", "tiny", "--out", "o"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def train_parser_actions():
    import argparse

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, argv=None, namespace=None):
        captured["parser"] = self
        return real(self, argv, namespace)

    argparse.ArgumentParser.parse_args = grab
    try:
        train.parse_args(["--stage", "concept", "--data", "d", "--concepts", "c", "--out", "o"])
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["parser"]._actions
