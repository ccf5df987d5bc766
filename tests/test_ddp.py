"""torchrun with 2 CPU processes (gloo) trains the same adapter as one process over the same notes per step."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cec.data import write_notes
from tiny_train import save_tiny_model, tiny_concept_set, tiny_notes

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py")] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "train.py")]
    proc = subprocess.run(cmd + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_processes_match_one(tmp_path):
    model = save_tiny_model(tmp_path / "model", "llama")
    tiny_concept_set().save(tmp_path / "cs.json")
    write_notes(tmp_path / "train.jsonl", tiny_notes(6))
    common = ["--stage", "concept", "--data", "train.jsonl", "--concepts", "cs.json", "--model", str(model),
              "--steps", "2", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--lr", "5e-3",
              "--warmup", "0",
              "--max-tokens", "512", "--max-questions", "6", "--no-progress"]
    run(common + ["--out", "one", "--grad-accum", "2"], tmp_path)
    run(common + ["--out", "two", "--grad-accum", "1"], tmp_path, nproc=2)
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert set(one) == set(two)
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)
    for k in one:
        assert (one[k] - two[k]).abs().max().item() < 1e-5, k
    log_one = (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()
    log_two = (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()
    assert len(log_one) == len(log_two) == 2  # rank 0 alone writes the log
