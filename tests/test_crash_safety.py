"""Crash safety: real processes killed with SIGKILL resume to the same result; a non-finite loss stops training
and keeps the last good checkpoint; every file the tool writes is written whole or not at all."""
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import soak_batch as soak  # noqa: E402


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    from cec.data import write_notes

    d = tmp_path_factory.mktemp("crash")
    pipe = soak.write_tiny_pipeline(d / "pipe", max_note_tokens=128)
    write_notes(d / "train.jsonl", soak.generate_notes(8, seed=1))
    write_notes(d / "notes.jsonl", soak.generate_notes(24, seed=2))
    return SimpleNamespace(root=d, pipe=pipe, model=pipe / "model", concepts=pipe / "concepts.json",
                           train=d / "train.jsonl", notes=d / "notes.jsonl")


ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


pytestmark = pytest.mark.usefixtures("one_thread")


def command(script, *args):
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run(script, *args, timeout=300):
    return subprocess.run(command(script, *args), capture_output=True, env=ENV, timeout=timeout)


def start(log: Path, script, *args) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen(command(script, *args), env=ENV, stdout=subprocess.DEVNULL, stderr=err)


def kill_when(proc: subprocess.Popen, ready, what: str, log: Path, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as ready() holds; fail if it finished first (the test would prove nothing)."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (status {proc.returncode}) before {what}: {log.read_text()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL


def log_steps(run_dir: Path) -> list[int]:
    path = run_dir / "train_log.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written right now
    return steps


# ---------------------------------------------------------------------------------------------------------
# Training killed mid-way
# ---------------------------------------------------------------------------------------------------------
def train_args(kit, out, *extra):
    # dropout on: the resumed run must restore the RNG state as well as the weights, optimizer and data order
    return ["--stage", "concept", "--data", kit.train, "--concepts", kit.concepts, "--model", kit.model,
            "--out", out, "--steps", 20, "--save-every", 3, "--grad-accum", 1, "--lora-r", 2, "--lora-dropout", 0.1,
            "--max-questions", 6, "--max-tokens", 512, "--no-progress", *extra]


def test_training_killed_with_sigkill_resumes_to_the_same_adapter(kit, tmp_path):
    from safetensors.torch import load_file

    from cec.training.checkpoint import latest_checkpoints

    full = tmp_path / "full"
    proc = run("train.py", *train_args(kit, full))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]

    out = tmp_path / "killed"
    child = start(tmp_path / "killed.log", "train.py", *train_args(kit, out))

    def between_checkpoints():  # a checkpoint is on disk and the run has gone past it
        found = latest_checkpoints(out)
        return found and max(log_steps(out) or [0]) > int(found[-1].name.split("-")[1]) + 1

    kill_when(child, between_checkpoints, "a checkpoint and a step after it", tmp_path / "killed.log")
    last = latest_checkpoints(out)[-1]
    lost = [s for s in log_steps(out) if s > int(last.name.split("-")[1])]
    assert lost, "the kill should land after some uncheckpointed steps"
    assert not (out / "adapter_model.safetensors").exists()

    proc = run("train.py", *train_args(kit, out, "--resume"))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert f"resumed from {last}" in proc.stderr.decode()
    expected, got = load_file(full / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=0, atol=1e-6), key
    assert log_steps(out) == list(range(1, 21))  # each step logged once, the lost ones redone
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_a_log_line_torn_by_a_crash_is_dropped_on_resume(kit, tmp_path):
    import train

    out = tmp_path / "run"
    args = [str(a) for a in train_args(kit, out)]
    args[args.index("--steps") + 1] = "4"
    train.main(args + ["--stop-at", "2"])
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.69')  # killed while writing step 3's line
    train.main(args + ["--resume"])
    assert log_steps(out) == [1, 2, 3, 4]
    assert all(json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines())


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(kit, tmp_path):
    """A learning rate of 1e30 makes step 1's update overflow the model: step 2's loss is not finite."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = run("train.py", "--stage", "concept", "--data", kit.train, "--concepts", kit.concepts, "--model", kit.model,
               "--out", out, "--steps", 5, "--save-every", 1, "--grad-accum", 1, "--lora-r", 2, "--lr", 1e30,
               "--warmup", 0, "--max-grad-norm", 0, "--max-questions", 4, "--no-progress")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert re.match(r"train\.py: error: loss (nan|inf) / gradient norm \S+ at step 2: stopped; last good checkpoint: "
                    r".*step-000001$", last), err
    checkpoint = out / "checkpoints" / "step-000001"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "adapter_model.safetensors").values())
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a diverged run
    assert log_steps(out) == [1]


# ---------------------------------------------------------------------------------------------------------
# Batch coding killed mid-way
# ---------------------------------------------------------------------------------------------------------
def read_predictions(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), "a half-written last line"
    return [json.loads(line) for line in raw.decode("utf-8").split("\n")[:-1]]


def test_batch_coding_killed_with_sigkill_resumes_with_every_note_once(kit, tmp_path):
    full = tmp_path / "full.jsonl"
    proc = run("infer.py", "--pipeline", kit.pipe, "--notes", kit.notes, "--out", full)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ids = [json.loads(ln)["id"] for ln in kit.notes.read_text().splitlines()]

    out = tmp_path / "preds.jsonl"
    child = start(tmp_path / "killed.log", "infer.py", "--pipeline", kit.pipe, "--notes", kit.notes, "--out", out)
    kill_when(child, lambda: out.is_file() and out.read_bytes().count(b"\n") >= 6, "6 coded notes",
              tmp_path / "killed.log")
    coded = out.read_bytes().count(b"\n")
    assert 6 <= coded < len(ids)

    proc = run("infer.py", "--pipeline", kit.pipe, "--notes", kit.notes, "--out", out)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    got, expected = read_predictions(out), read_predictions(full)
    assert [p["id"] for p in got] == ids  # none missing, none twice, in input order
    for a, b in zip(got, expected):
        assert {c["code"]: c["probability"] for c in a["codes"]} == pytest.approx(
            {c["code"]: c["probability"] for c in b["codes"]}, abs=1e-5)
    assert {p.name for p in tmp_path.iterdir()} == {"full.jsonl", "preds.jsonl", "killed.log"}


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------
def write_with(name, kit, path: Path):
    """Write `path` (a file or, for adapters and checkpoints, a folder) with writer `name`; content depends on
    the call count so a second write differs from the first."""
    write_with.calls = getattr(write_with, "calls", 0) + 1
    n = write_with.calls
    if name == "atomic_write_text":
        from cec.io import atomic_write_text
        atomic_write_text(path, f"version {n}\n")
    elif name == "write_notes":
        from cec.data import write_notes
        write_notes(path, [{"id": "a", "text": f"version {n}", "labels": []}])
    elif name == "write_codes":
        from cec.data import write_codes
        write_codes(path, [f"A{n}", "B"])
    elif name == "concept_set":
        cs = soak.tiny_concept_set()
        cs.name = f"version {n}"
        cs.save(path)
    elif name == "pipeline_config":
        from cec.coding.pipeline import PipelineConfig
        PipelineConfig(threshold=n / 100).save(path)
    elif name == "report":
        from cec.coding.report import write_report
        write_report(path, {"note": f"Fever, version {n}.", "code_system": "icd10cm", "threshold": 0.5, "codes": [],
                            "timing": {"prefix_tokens": 1, "questions": 1, "seconds": 0.1}})
    elif name == "tokenizer":
        tok = soak.tiny_tokenizer(300 + n)
        tok.save(path)
    elif name == "adapter":
        from cec.engine.lora import inject_lora, save_adapter
        from cec.engine.weights import load_model
        model, _ = load_model(kit.model)
        cfg = inject_lora(model, ["q_proj"], r=n, alpha=4)
        save_adapter(model, path, cfg)
    elif name == "merged_batch_output":
        import infer
        ids = ["a", "b"] if path.exists() else ["a"]  # a merge keeps the lines already in OUT: add a note
        path.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{path}.rank0").write_text("".join(json.dumps({"id": i, "version": n}) + "\n" for i in ids))
        Path(f"{path}.rank0.done").write_text(json.dumps({"token": infer.shard_token(ids)}))
        infer.merge_shards(path, [{"id": i, "text": "x"} for i in ids], 1, poll_s=0.01)
    else:
        raise ValueError(name)


WRITERS = {  # writer: the files it leaves (relative to its target path; "" = the path itself)
    "atomic_write_text": [""], "write_notes": [""], "write_codes": [""], "concept_set": [""],
    "pipeline_config": ["cec_pipeline.json"], "report": [""],
    "tokenizer": ["tokenizer.json", "tokenizer_config.json"],
    "adapter": ["adapter_model.safetensors", "adapter_config.json", "cec_adapter.json"],
    "merged_batch_output": [""],
}


def temp_files(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


@pytest.mark.parametrize("writer", WRITERS)
def test_a_failed_rename_leaves_the_old_file_intact_and_no_temp_file(kit, tmp_path, monkeypatch, writer):
    target = tmp_path / "out" / "target"
    write_with(writer, kit, target)
    written = [target / rel if rel else target for rel in WRITERS[writer]]
    before = {p: p.read_bytes() for p in written}

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device (injected)", str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        write_with(writer, kit, target)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in written} == before  # every old file whole
    assert not temp_files(tmp_path / "out")
    write_with(writer, kit, target)  # and the next write goes through
    assert {p: p.read_bytes() for p in written} != before


def test_a_failed_checkpoint_rename_keeps_the_previous_checkpoint(kit, tmp_path, monkeypatch):
    import train
    from cec.training.checkpoint import latest_checkpoints
    from cec.training.trainer import Trainer

    out = tmp_path / "run"
    args = [str(a) for a in train_args(kit, out)]
    args[args.index("--steps") + 1] = "8"
    args[args.index("--save-every") + 1] = "4"
    real_save = Trainer.save_checkpoint

    def save_then_fail(self):
        if self.step == 8:
            monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(28, "disk full", str(d))))
        return real_save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        train.main(args)
    monkeypatch.undo()
    assert [p.name for p in latest_checkpoints(out)] == ["step-000004"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]  # no half checkpoint
    train.main(args + ["--resume"])  # and the run finishes from it
    assert (out / "adapter_model.safetensors").is_file()


# Every place that writes a file outside cec.io, and why it is safe. A new raw write fails this test: use
# cec.io.atomic_write_* (or add it here with the reason it cannot leave a half-written file behind).
RAW_WRITES = {
    ("cec/io.py", "atomic_write_bytes"): "the temp file that os.replace then renames",
    ("cec/io.py", "append"): "AppendJsonl: one os.write per line; readers skip a torn last line",
    ("cec/training/checkpoint.py", "write_checkpoint"): "trainer_state.pt inside an atomic_folder",
    ("cec/engine/weights.py", "_write_safetensors"): "inside the atomic_folder convert_gguf builds",
    ("cec/commands/infer.py", "completed_ids"): "truncates a torn last line of its own format in place",
}


def raw_writes(path: Path) -> list[tuple[str, int, str]]:
    """(enclosing function, line, call) of each call in `path` that writes a file without cec.io."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call):
                call = ast.unparse(child.func)
                mode = next((ast.literal_eval(a) for a in child.args[1:2] if isinstance(a, ast.Constant)), None)
                mode = next((ast.literal_eval(k.value) for k in child.keywords
                             if k.arg == "mode" and isinstance(k.value, ast.Constant)), mode)  # torch.compile(mode=x)
                writing_mode = isinstance(mode, str) and bool(set(mode) & set("wax+"))
                writes = (
                    (call in ("open", "io.open", "gzip.open", "os.fdopen") and writing_mode)
                    or (call == "os.open" and ast.unparse(child.args[0]) != "os.devnull")
                    or call in ("torch.save", "save_file", "shutil.copy", "shutil.copyfile",
                                "shutil.copy2", "np.save", "os.truncate")
                    or call.endswith((".write_text", ".write_bytes", ".truncate"))
                    or (call.endswith(".open") and writing_mode))
                if writes:
                    found.append((name, child.lineno, call))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_every_raw_file_write_is_known_to_be_crash_safe():
    sources = [*sorted((ROOT / "cec").rglob("*.py")), ROOT / "infer.py", ROOT / "train.py",
               *sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "kernels").glob("*.py"))]
    unknown = []
    for path in sources:
        rel = str(path.relative_to(ROOT))
        for func, line, call in raw_writes(path):
            if (rel, func) not in RAW_WRITES:
                unknown.append(f"{rel}:{line} {call}() in {func}")
    assert not unknown, "writes that bypass cec.io (use atomic_write_*): " + "; ".join(unknown)
    seen = {(str(p.relative_to(ROOT)), f) for p in sources for f, _, _ in raw_writes(p)}
    assert set(RAW_WRITES) <= seen, f"stale entries: {set(RAW_WRITES) - seen}"  # the scan sees what it lists


# ---------------------------------------------------------------------------------------------------------
# The soak script (scripts/soak_batch.py; its 1,000-note figures are reported, not asserted here)
# ---------------------------------------------------------------------------------------------------------
def test_soak_script_codes_generated_notes_and_reports_memory_and_speed(kit, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak_batch.py"), "-n", "12", "--mark", "4",
                           "--pipeline", str(kit.pipe), "--workdir", str(tmp_path)], capture_output=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and result["lines_ok"] and result["coded"] == 12 and result["mark"] >= 4
    assert 0 < result["peak_rss_mb_at_mark"] <= result["peak_rss_mb_at_end"] * 1.01
    assert result["notes_per_s"] > 0
    assert len((tmp_path / "preds.jsonl").read_text().splitlines()) == 12
