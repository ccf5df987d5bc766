"""cec.cli's runtime options: --device, --dtype and --threads on every command, one default rule, a bad value is
one clear line."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cec.cli import add_runtime_args, runtime
from cec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def parse(*argv, **kw):
    p = argparse.ArgumentParser(prog="prog")
    add_runtime_args(p, **kw)
    return p.parse_args(list(argv))


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_cuda_when_available_else_cpu_with_its_dtype(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime(parse()) == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime(parse()) == (torch.device("cuda"), torch.bfloat16)
    assert runtime(parse("--device", "cpu")) == (torch.device("cpu"), torch.float32)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun, the GPU of the local rank
    assert runtime(parse()) == (torch.device("cuda:1"), torch.bfloat16)
    assert runtime(parse("--device", "cuda:0")) == (torch.device("cuda:0"), torch.bfloat16)


def test_explicit_dtype_and_threads(threads):
    assert runtime(parse("--device", "cpu", "--dtype", "bfloat16")) == (torch.device("cpu"), torch.bfloat16)
    assert runtime(parse("--dtype", "float16", "--threads", "1"))[1] == torch.float16
    assert torch.get_num_threads() == 1


def test_bad_values_are_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^unknown device 'gpu7' \(cpu, cuda, cuda:N, \.\.\.\)$"):
        runtime(parse("--device", "gpu7"))
    with pytest.raises(ConfigError, match=r"^--device cuda:1: no CUDA device is available$"):
        runtime(parse("--device", "cuda:1"))
    for argv, message in ((["--threads", "0"], "--threads: must be at least 1, got 0"),
                          (["--threads", "x"], "--threads: not an integer: 'x'"),
                          (["--dtype", "float16"], "--dtype: invalid choice: 'float16'")):
        with pytest.raises(SystemExit) as e:
            parse(*argv, dtypes=("float32", "bfloat16"))
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_every_command_takes_the_runtime_options():
    import infer
    import train
    from cec.commands import evaluate
    from cec.serve import parse_args as serve_args

    runtime_args = ["--device", "cpu", "--dtype", "float32", "--threads", "2"]
    parsed = [
        infer.parse_args(["--demo", *runtime_args]),
        train.parse_args(["--stage", "concept", "--data", "d", "--concepts", "c", "--out", "o", *runtime_args]),
        evaluate.parse_args(["--test", "t", "--dev", "d", "--out", "o", *runtime_args]),
        serve_args(runtime_args),
    ]
    for args in parsed:
        assert (args.device, args.dtype, args.threads) == ("cpu", "float32", 2)
    defaults = [infer.parse_args(["--demo"]), evaluate.parse_args(["--test", "t", "--dev", "d", "--out", "o"]),
                train.parse_args(["--stage", "concept", "--data", "d", "--concepts", "c", "--out", "o"])]
    for args in defaults:
        assert (args.device, args.dtype, args.threads) == (None, "auto", None)


@pytest.mark.parametrize("script", ["infer.py", "train.py", "scripts/evaluate.py"])
def test_a_bad_threads_value_is_a_usage_error(script):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--threads", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--threads: must be at least 1, got 0" in proc.stderr.strip().splitlines()[-1]
