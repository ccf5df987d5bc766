"""prepare_mimic4 on tiny tables in the MIMIC-IV and MIMIC-IV-Note schemas; every note text here is invented."""
import csv
import gzip
import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cec.data import read_codes, read_notes
from cec.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_mimic4.py"
spec = importlib.util.spec_from_file_location("prepare_mimic4", SCRIPT)
prepare_mimic4 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_mimic4)

NOTE_COLUMNS = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
DIAG_COLUMNS = ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"]
PROC_COLUMNS = ["subject_id", "hadm_id", "seq_num", "chartdate", "icd_code", "icd_version"]

NOTES = [  # (hadm, note_seq, text)
    (20000021, 1, "Discharge Diagnosis:\nsepsis, zorbic 12 fever\n"),
    (20000022, 2, "Addendum: invented plimber resolved."),
    (20000022, 1, "Brief Hospital Course:\nInvented course."),
    (20000022, 1, "Brief Hospital Course:\nInvented course."),  # an exact repeat
    (20000023, 1, "Invented note 23."),
    (20000024, 1, "Invented note 24."),
    (20000025, 1, "Invented note of an admission without codes."),
    (20000031, 1, "Invented ICD-9 note 31 with ___ de-identified."),
    (20000032, 1, "Invented note 32."),
    (20000033, 1, "Invented note 33."),
    (20000034, 1, "Invented note 34."),
    (20000035, 1, "Invented note 35, coded in both versions."),
    (20000099, 1, "Invented note of an admission in no split."),
    (20000036, 1, "   "),  # empty text: dropped
]
DIAGNOSES = [  # (hadm, seq, code, version); ICD-9 and ICD-10 rows mixed in one table, as in MIMIC-IV
    (20000021, 1, "A419", 10), (20000021, 2, "I10", 10), (20000021, 3, "E119", 10), (20000021, 4, "I10", 10),
    (20000022, 1, "I10", 10), (20000022, 2, "Z3A38", 10),
    (20000023, 1, "A419", 10), (20000023, 2, "I10", 10),
    (20000024, 1, "E119", 10), (20000024, 2, "I10", 10),
    (20000026, 1, "I10", 10),  # an admission without a note
    (20000031, 1, "0389", 9), (20000031, 2, "4019", 9), (20000031, 3, "V5861", 9), (20000031, 4, "E8490", 9),
    (20000032, 1, "4019", 9), (20000032, 2, "0389", 9),
    (20000033, 1, "4019", 9),
    (20000034, 1, "0389", 9), (20000034, 2, "E8490", 9),
    (20000035, 1, "4019", 9), (20000035, 2, "I10", 10),
    (20000099, 1, "4019", 9),
]
PROCEDURES = [
    (20000021, 1, "0DTJ4ZZ", 10), (20000022, 1, "02HV33Z", 10), (20000024, 1, "0DTJ4ZZ", 10),
    (20000031, 1, "0040", 9), (20000031, 2, "3893", 9), (20000032, 1, "0040", 9), (20000033, 1, "9604", 9),
]
SPLITS = {"10": [(20000021, "train"), (20000022, "train"), (20000025, "train"), (20000023, "val"),
                 (20000035, "val"), (20000024, "test"), (20000026, "test")],
          "9": [(20000031, "train"), (20000032, "train"), (20000033, "val"), (20000034, "test"), (20000035, "test"),
                (20000036, "test")]}


def write_csv(path: Path, columns, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # minimal quoting, as PhysioNet's files: icd_code 0040 unquoted
        writer.writerow(columns)
        writer.writerows(rows)


def write_mimic4(root: Path, gz=False, layout=True) -> tuple[Path, Path]:
    """(MIMIC-IV folder, MIMIC-IV-Note folder); layout: PhysioNet's hosp/ and note/ subfolders."""
    mimic, note = root / "mimiciv", root / "mimic-iv-note"
    ext = ".csv.gz" if gz else ".csv"
    hosp, notes = (mimic / "hosp", note / "note") if layout else (mimic, note)
    write_csv(notes / f"discharge{ext}", NOTE_COLUMNS,
              [(f"{h % 1000}-DS-{i}", h % 1000, h, "DS", q, "2180-01-01 00:00:00", "", t)
               for i, (h, q, t) in enumerate(NOTES)])
    write_csv(hosp / f"diagnoses_icd{ext}", DIAG_COLUMNS, [(h % 1000, h, q, c, v) for h, q, c, v in DIAGNOSES])
    write_csv(hosp / f"procedures_icd{ext}", PROC_COLUMNS,
              [(h % 1000, h, q, "2180-01-01", c, v) for h, q, c, v in PROCEDURES])
    return mimic, note


def write_splits(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for version, rows in SPLITS.items():
        (folder / f"mimiciv_icd{version}_split.csv").write_text(
            "hadm_id,split\n" + "".join(f"{h},{s}\n" for h, s in rows))
    return folder


@pytest.fixture
def inputs(tmp_path):
    mimic, note = write_mimic4(tmp_path)
    splits = write_splits(tmp_path / "splits")
    return ["--mimic", str(mimic), "--note", str(note), "--splits", str(splits), "--out", str(tmp_path / "out")]


def ids_and_labels(path: Path):
    return [(n["id"], n["labels"]) for n in read_notes(path)]


def test_full_sets(inputs, tmp_path, caplog):
    summary = prepare_mimic4.main([*inputs, "--sets", "icd10-full", "icd9-full", "--min-count", "2"])
    out = tmp_path / "out"
    # ICD-10: codes of >= 2 admissions; PCS without a dot, ICD-10-CM dotted after 3, I10 without a trailing dot
    assert read_codes(out / "mimic4-icd10-full" / "codes.txt") == ["0DTJ4ZZ", "A41.9", "E11.9", "I10"]
    train = read_notes(out / "mimic4-icd10-full" / "train.jsonl")
    assert [(n["id"], n["labels"]) for n in train] == [  # 20000025 has no code: dropped
        ("20000021", ["0DTJ4ZZ", "A41.9", "E11.9", "I10"]), ("20000022", ["I10"])]
    assert train[0]["text"] == "Discharge Diagnosis:\nsepsis, zorbic 12 fever"  # raw by default
    assert train[1]["text"] == "Brief Hospital Course:\nInvented course.\n\nAddendum: invented plimber resolved."
    assert ids_and_labels(out / "mimic4-icd10-full" / "dev.jsonl") == [("20000023", ["A41.9", "I10"]),
                                                                      ("20000035", ["I10"])]
    assert ids_and_labels(out / "mimic4-icd10-full" / "test.jsonl") == [("20000024", ["0DTJ4ZZ", "E11.9", "I10"])]
    # ICD-9: leading zeros kept (038.9, 00.40), E codes dotted after 4; only version-9 rows (20000035's I10 is not)
    assert read_codes(out / "mimic4-icd9-full" / "codes.txt") == ["00.40", "038.9", "401.9", "E849.0"]
    assert ids_and_labels(out / "mimic4-icd9-full" / "train.jsonl") == [
        ("20000031", ["00.40", "038.9", "401.9", "E849.0"]), ("20000032", ["00.40", "038.9", "401.9"])]
    assert ids_and_labels(out / "mimic4-icd9-full" / "dev.jsonl") == [("20000033", ["401.9"])]
    assert ids_and_labels(out / "mimic4-icd9-full" / "test.jsonl") == [("20000034", ["038.9", "E849.0"]),
                                                                     ("20000035", ["401.9"])]
    assert summary == {
        "mimic4-icd10-full": {"codes": 4, "train": 2, "dev": 2, "test": 1, "missing_notes": 1, "no_labels": 1},
        "mimic4-icd9-full": {"codes": 4, "train": 2, "dev": 1, "test": 2, "missing_notes": 1, "no_labels": 0}}
    assert "mimic4-icd10-full: 1 admissions without a discharge summary, skipped" in caplog.text
    assert not (out / "mimic4-icd10-50").exists()


def test_top50_counts_all_splits_or_train(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mimic4, "TOP", 2)  # two codes out of six make the ranking visible
    out = tmp_path / "out" / "mimic4-icd10-50"
    prepare_mimic4.main([*inputs, "--sets", "icd10-50"])
    # all splits: I10 in 5 admissions, then 0DTJ4ZZ, A41.9, E11.9 in 2 each: the tie goes to the first code
    assert read_codes(out / "codes.txt") == ["I10", "0DTJ4ZZ"]
    assert ids_and_labels(out / "test.jsonl") == [("20000024", ["I10", "0DTJ4ZZ"])]
    prepare_mimic4.main([*inputs, "--sets", "icd10-50", "--top50-from", "train"])
    # train only (20000021, 20000022): I10 twice, then five codes once; 02HV33Z sorts first
    assert read_codes(out / "codes.txt") == ["I10", "02HV33Z"]
    assert ids_and_labels(out / "train.jsonl") == [("20000021", ["I10"]), ("20000022", ["I10", "02HV33Z"])]


def test_edin_text_gzip_and_flat_folders_as_a_subprocess(tmp_path):
    mimic, note = write_mimic4(tmp_path / "raw", gz=True, layout=False)
    splits = write_splits(tmp_path / "splits")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mimic", str(mimic), "--note", str(note), "--splits",
                           str(splits), "--out", str(tmp_path / "out"), "--sets", "icd9-50", "--text", "edin"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"mimic4-icd9-50": {"codes": 7' in proc.stdout  # every ICD-9 code of the split's notes
    assert read_codes(tmp_path / "out" / "mimic4-icd9-50" / "codes.txt") == [  # by admissions, then by code
        "401.9", "038.9", "00.40", "E849.0", "38.93", "96.04", "V58.61"]
    notes = read_notes(tmp_path / "out" / "mimic4-icd9-50" / "train.jsonl")
    assert notes[0]["text"] == "invented icd note with de identified"  # lower, ___ and numbers gone


def test_inputs_unchanged_and_a_failed_rerun_keeps_the_outputs(inputs, tmp_path):
    def digests(folder: Path):
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = digests(tmp_path)
    args = [*inputs[:-1], str(tmp_path / "mimiciv"), "--min-count", "2"]  # --out is the MIMIC-IV folder itself
    prepare_mimic4.main(args)
    after = digests(tmp_path)
    assert {p: d for p, d in after.items() if p in before} == before
    outputs = {p: d for p, d in after.items() if p not in before}
    assert len(outputs) == 16  # four sets, three splits and codes.txt each
    # a re-run that fails on its last table: nothing is rewritten
    with open(tmp_path / "mimiciv" / "hosp" / "procedures_icd.csv", "a") as f:
        f.write("21,20000021,3,2180-01-01,0DTJ4Z,10\n")
    with pytest.raises(DataError, match=r"procedures_icd\.csv:9: not an ICD-10-PCS code: '0DTJ4Z'"):
        prepare_mimic4.main(args)
    assert {p: d for p, d in digests(tmp_path).items() if p in outputs} == outputs


def run_cli(tmp_path, *args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path)


def break_table(tmp_path, name, data: bytes):
    (tmp_path / "mimiciv" / "hosp" / name).write_bytes(data)


BAD = {  # name -> (how to break the inputs, the error line's pattern, whether the error comes before any log line)
    "missing-file": (lambda t: (t / "mimiciv" / "hosp" / "procedures_icd.csv").unlink(),
                     r"mimiciv: no procedures_icd\.csv or procedures_icd\.csv\.gz, nor in hosp/", True),
    "missing-column": (lambda t: break_table(t, "diagnoses_icd.csv",
                                             b"subject_id,hadm_id,seq_num,icd_code\n1,2,1,I10\n"),
                       r"diagnoses_icd\.csv: missing column\(s\) ICD_VERSION \(the header has SUBJECT_ID", True),
    "empty-file": (lambda t: (t / "mimic-iv-note" / "note" / "discharge.csv").write_bytes(b""),
                   r"discharge\.csv: empty file, expected a CSV header with NOTE_ID, HADM_ID, NOTE_SEQ, TEXT", True),
    "empty-gzip": (lambda t: [(t / "mimiciv" / "hosp" / "diagnoses_icd.csv").unlink(),
                              break_table(t, "diagnoses_icd.csv.gz", gzip.compress(b""))],
                   r"diagnoses_icd\.csv\.gz: empty file", True),
    "missing-split": (lambda t: (t / "splits" / "mimiciv_icd9_split.csv").unlink(),
                      r"mimiciv_icd9_split\.csv: missing split file", True),
    "split-names-note-ids": (lambda t: (t / "splits" / "mimiciv_icd10_split.csv").write_text("_id,split\n1,train\n"),
                             r"mimiciv_icd10_split\.csv: expected the header hadm_id,split", True),
    "out-under-a-file": (lambda t: (t / "out").write_text("x"), r"cannot write .*out is a file, not a folder", True),
    "icd-version": (lambda t: break_table(t, "diagnoses_icd.csv", b"subject_id,hadm_id,seq_num,icd_code,icd_version\n"
                                          b"21,20000021,1,A419,11\n"),
                    r"diagnoses_icd\.csv:2: icd_version must be 9 or 10, got '11'", False),
    "bad-code": (lambda t: break_table(t, "diagnoses_icd.csv", b"subject_id,hadm_id,seq_num,icd_code,icd_version\n"
                                       b"31,20000031,1,40X9,9\n"),
                 r"diagnoses_icd\.csv:2: not an ICD-9-CM code: '40X9'", False),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, name):
    mimic, note = write_mimic4(tmp_path)
    splits = write_splits(tmp_path / "splits")
    breaks, pattern, first = BAD[name]
    breaks(tmp_path)
    proc = run_cli(tmp_path, "--mimic", mimic, "--note", note, "--splits", splits, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert [ln for ln in lines if "error" in ln.lower()] == lines[-1:], proc.stderr
    assert lines[-1].startswith("prepare_mimic4.py: error: ") and re.search(pattern, lines[-1]), lines
    if first:  # found before the long reads: the one line is all there is
        assert len(lines) == 1, proc.stderr
    assert not (tmp_path / "out" / "mimic4-icd10-full" / "train.jsonl").exists()


def test_no_note_with_a_frequent_code(inputs):
    with pytest.raises(DataError, match="mimic4-icd10-full train: none of its 3 admissions has a note with a code"):
        prepare_mimic4.main([*inputs, "--sets", "icd10-full"])  # Edin et al.'s 10: no code is that frequent here


def test_public_split_files(shared_dir):
    counts = {"10": {"train": 89099, "dev": 13378, "test": 19802}, "9": {"train": 154542, "dev": 21980, "test": 32804}}
    ids = {}
    for version, want in counts.items():
        splits = prepare_mimic4.read_edin_split(shared_dir / "data" / "mimic4" / f"mimiciv_icd{version}_split.csv")
        assert {s: len(v) for s, v in splits.items()} == want
        ids[version] = {h for v in splits.values() for h in v}
    assert len(ids["10"] & ids["9"]) == 7  # admissions coded in both versions are in both sets
