import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from cec.data import read_codes, read_notes
from cec.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_codiesp.py"
spec = importlib.util.spec_from_file_location("prepare_codiesp", SCRIPT)
prepare_codiesp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_codiesp)


def write_split(src: Path, split: str, docs: dict[str, tuple[str, str, list[str]]]):
    """docs: id -> (english text, spanish text, lower-case codes)."""
    (src / split / "text_files_en").mkdir(parents=True)
    (src / split / "text_files").mkdir(parents=True)
    rows = []
    for doc, (en, es, codes) in docs.items():
        (src / split / "text_files_en" / f"{doc}.txt").write_text(en, encoding="utf-8")
        (src / split / "text_files" / f"{doc}.txt").write_text(es, encoding="utf-8")
        rows += [f"{doc}\t{c}\n" for c in codes]
    (src / split / f"{split}D.tsv").write_text("".join(rows), encoding="utf-8")


@pytest.fixture
def release(tmp_path):
    src = tmp_path / "codiesp"
    write_split(src, "train", {
        "t1": ("Fever.\nCough.\n", "Fiebre.\nTos.\n", ["r50.9", "r05", "i10"]),
        "t2": ("Pain in the back.", "Dolor de espalda.", ["r52", "r50.9"]),
        "t3": ("Rash on the arm.", "Erupci\u00f3n en el brazo.", ["l29.9"]),
        "t4": ("Nothing notable.", "Nada.", []),
    })
    write_split(src, "dev", {
        "d1": ("Cough and pain.", "Tos y dolor.", ["r05", "r52", "z99.9"]),
        "d2": ("Headache.", "Cefalea.", ["r51"]),
    })
    return src


def test_top_codes_break_ties_by_first_appearance():
    pairs = [("a", "X"), ("a", "Y"), ("b", "Z"), ("b", "Y"), ("c", "Z")]
    assert prepare_codiesp.top_codes(pairs, 2) == ["Y", "Z"]
    assert prepare_codiesp.top_codes(pairs, 3) == ["Y", "Z", "X"]


def test_build(release, tmp_path):
    out = tmp_path / "out"
    summary = prepare_codiesp.main(["--src", str(release), "--out", str(out), "--top", "2"])
    # train counts: R50.9 x2, then R05, I10, R52, L29.9 x1 (R05 appears first)
    assert read_codes(out / "codes.txt") == ["R50.9", "R05"]
    train = read_notes(out / "train.jsonl")
    assert [n["id"] for n in train] == ["t1", "t2", "t3", "t4"]
    assert [n["labels"] for n in train] == [["R50.9", "R05"], ["R50.9"], [], []]
    assert train[0]["text"] == "Fever.\nCough."
    dev = read_notes(out / "dev.jsonl")
    assert [n["labels"] for n in dev] == [["R05"], []]
    assert not (out / "test.jsonl").exists()  # no test/ folder: skipped
    assert summary["splits"]["train"] == {"notes": 4, "notes_with_labels": 2, "positives": 3, "codes_seen": 2}


def test_spanish_and_given_codes(release, tmp_path):
    codes = tmp_path / "codes.tsv"
    codes.write_text("code\tdescription\nr52\tPain\nL29.9\tPruritus\n")
    out = tmp_path / "es"
    prepare_codiesp.main(["--src", str(release), "--out", str(out), "--lang", "es", "--codes", str(codes)])
    assert read_codes(out / "codes.txt") == ["R52", "L29.9"]
    train = read_notes(out / "train.jsonl")
    assert train[2] == {"id": "t3", "text": "Erupci\u00f3n en el brazo.", "labels": ["L29.9"]}
    assert [n["labels"] for n in read_notes(out / "dev.jsonl")] == [["R52"], []]


def test_errors(release, tmp_path):
    (release / "dev" / "devD.tsv").write_text("d1\tr05\nghost\tr52\n")
    with pytest.raises(DataError, match="'ghost' has no text file"):
        prepare_codiesp.main(["--src", str(release), "--out", str(tmp_path / "o")])
    (release / "dev" / "devD.tsv").write_text("d1 r05\n")
    with pytest.raises(DataError, match=r"devD.tsv:1: expected"):
        prepare_codiesp.main(["--src", str(release), "--out", str(tmp_path / "o")])
    with pytest.raises(DataError, match="none of the split folders"):
        prepare_codiesp.main(["--src", str(tmp_path), "--out", str(tmp_path / "o")])


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--src", str(tmp_path / "none"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"prepare_codiesp.py: error: {tmp_path / 'none'}: no such folder"]


def test_real_codiesp_d50(shared_dir, tmp_path):
    src = shared_dir / "data" / "codiesp"
    summary = prepare_codiesp.main(["--src", str(src), "--out", str(tmp_path)])
    assert summary["splits"]["train"]["positives"] == 1709
    assert summary["splits"]["train"]["notes_with_labels"] == 440
    assert summary["splits"]["train"]["notes"] == 500
    assert summary["splits"]["dev"]["positives"] == 721
    assert read_codes(tmp_path / "codes.txt") == read_codes(src / "codiesp50_codes.tsv")
