"""The installed commands (cec-code, cec-train, cec-evaluate, cec-serve), the scripts that wrap them, and the
README's Python API example, run against a tiny pipeline."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
COMMANDS = {"cec-code": "--note", "cec-train": "--stage", "cec-evaluate": "--test", "cec-serve": "--host"}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from tiny_train import save_tiny_model, tiny_concept_set

    d = tmp_path_factory.mktemp("commands")
    save_tiny_model(d / "model")
    tiny_concept_set().save(d / "concepts.json")
    (d / "cec_pipeline.json").write_text(json.dumps({"base_model": str(d / "model"),
                                                     "concept_set": str(d / "concepts.json"), "threshold": 0.5}))
    return d


def command(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed beside {sys.executable}")
        pytest.skip(f"{name} is not installed (pip install -e .)")
    return path


@pytest.mark.parametrize("name", COMMANDS)
def test_installed_commands_run(name):
    proc = subprocess.run([str(command(name)), "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {name} ") and COMMANDS[name] in proc.stdout


def test_cec_code_codes_a_note_and_errors_carry_its_name(pipe, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("Patient has fever and chills.\n")
    proc = subprocess.run([str(command("cec-code")), "--pipeline", str(pipe), "--note", str(note), "--format",
                           "json"], capture_output=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(json.loads(proc.stdout)["codes"]) == 5
    proc = subprocess.run([str(command("cec-code")), "--note", str(tmp_path / "missing.txt")], capture_output=True,
                          text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and re.fullmatch(r"cec-code: error: .*missing\.txt: no such file\n", proc.stderr)


@pytest.mark.parametrize("script", ["infer.py", "train.py", "scripts/evaluate.py"])
def test_the_scripts_still_run(script):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stderr


def test_the_readme_python_api_example_runs(pipe, tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S)[1]
    (tmp_path / "example.py").write_text(example)
    proc = subprocess.run([sys.executable, str(tmp_path / "example.py"), str(pipe)], capture_output=True,
                          text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(re.match(r"[A-E]\d [01]\.\d{3} predicted=(True|False) ", ln) for ln in lines)
