"""prepare_mimic3 on tiny CSVs in MIMIC-III's schema; every note text here is invented (no MIMIC text)."""
import csv
import gzip
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from cec.data import read_codes, read_notes
from cec.errors import DataError
from cec.coding.icd import mimic_code

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_mimic3.py"
spec = importlib.util.spec_from_file_location("prepare_mimic3", SCRIPT)
prepare_mimic3 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_mimic3)

NOTE_COLUMNS = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME", "CATEGORY",
                "DESCRIPTION", "CGID", "ISERROR", "TEXT"]
CODE_COLUMNS = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"]

NOTES = [  # (row_id, subject, hadm, chartdate, category, description, text)
    (7, 1, 100, "2100-01-09", "Discharge summary", "Addendum", "Addendum: the zorbic rash, resolved."),
    (3, 1, 100, "2100-01-08", "Discharge summary", "Report",
     'Admission Date: 2100-01-01\nChief Complaint:\n"quoted" fever, chills\n\nDischarge Diagnosis:\nzorbic fever 2'),
    (9, 1, 100, "2100-01-10", "Discharge summary", "Addendum", "Second addendum 42."),
    (4, 1, 100, "2100-01-02", "Radiology", "CHEST X-RAY", "Invented radiology text, not a discharge summary."),
    (5, 2, 200, "2100-02-05", "Discharge summary", "Report", "Brief Hospital Course:\nInvented course of plimber."),
    (6, 3, 300, "2100-03-05", "Nursing", "Nursing note", "Invented nursing text."),
    (8, 4, 400, "2100-04-05", "Discharge summary", "Report", "History of Present Illness:\nInvented story."),
    (10, 6, 600, "2100-06-05", "Discharge summary", "Report", "Invented note of an admission without codes."),
]
DIAGNOSES = [  # (subject, hadm, seq, code)
    (1, 100, 2, "V5861"), (1, 100, 1, "4019"), (1, 100, 3, "E8790"), (1, 100, 4, ""),
    (2, 200, 1, "0389"), (2, 200, 2, "486"), (2, 200, 3, "4019"),
    (4, 400, 1, "7908"),
]
PROCEDURES = [(1, 100, 1, "0407"), (1, 100, 2, "3893"), (2, 200, 1, "9604"), (4, 400, 1, "0407")]


def write_csv(path: Path, columns, rows):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        writer.writerow(columns)
        writer.writerows(rows)


def write_mimic(folder: Path, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".csv.gz" if gz else ".csv"
    write_csv(folder / f"NOTEEVENTS{ext}", NOTE_COLUMNS,
              [(r, s, h, d, "", "", cat, desc, "", "", t) for r, s, h, d, cat, desc, t in NOTES])
    write_csv(folder / f"DIAGNOSES_ICD{ext}", CODE_COLUMNS,
              [(i, s, h, q, c) for i, (s, h, q, c) in enumerate(DIAGNOSES)])
    write_csv(folder / f"PROCEDURES_ICD{ext}", CODE_COLUMNS,
              [(i, s, h, q, c) for i, (s, h, q, c) in enumerate(PROCEDURES)])


def write_splits(folder: Path):
    (folder / "caml").mkdir(parents=True)
    (folder / "kept_rare50").mkdir()
    for name, ids in {"50": {"train": [100, 300], "dev": [200], "test": [400]},
                      "full": {"train": [100, 300], "dev": [200], "test": [400]}}.items():
        for split, hadms in ids.items():
            (folder / "caml" / f"{split}_{name}_hadm_ids.csv").write_text("".join(f"{h}\n" for h in hadms))
    (folder / "top50_codes.txt").write_text("401.9\n38.93\n038.9\n96.04\n")
    (folder / "rare50_codes.txt").write_text("40.7\n790.8\nV58.61\n")
    rare = {"train": "subject_id,hadm_id,labels\n1,100,40.7;V58.61;40.7\n",
            "dev": "subject_id,hadm_id,labels\n4,400,790.8;40.7\n",
            "test": "subject_id,hadm_id,labels\n2,200,790.8\n"}  # 790.8 is not among 200's codes
    for split, text in rare.items():
        (folder / "kept_rare50" / f"rare50_{split}.csv").write_text(text)
    (folder / "mimiciii_clean_split.csv").write_text("hadm_id,split\n100,train\n200,val\n300,train\n400,test\n"
                                                     "600,train\n")


@pytest.fixture
def inputs(tmp_path):
    write_mimic(tmp_path / "mimic")
    write_splits(tmp_path / "splits")
    return tmp_path


def run(inputs, *extra):
    return prepare_mimic3.main(["--mimic", str(inputs / "mimic"), "--splits", str(inputs / "splits"),
                                "--out", str(inputs / "out"), *extra])


@pytest.mark.parametrize("code, is_diag, dotted, caml", [
    ("4019", True, "401.9", "401.9"), ("V5861", True, "V58.61", "V58.61"), ("E8790", True, "E879.0", "E879.0"),
    ("0389", True, "038.9", "038.9"), ("486", True, "486", "486"), ("E849", True, "E849", "E849"),
    ("3893", False, "38.93", "38.93"), ("0407", False, "04.07", "40.7"), ("966", False, "96.6", "96.6"),
    ("0001", False, "00.01", "1"),
])
def test_reformat_code(code, is_diag, dotted, caml):
    assert mimic_code(code, 9, is_diag) == dotted
    assert prepare_mimic3.caml_reformat_code(code, is_diag) == caml


def test_build_caml_and_kept_sets(inputs, caplog):
    summary = run(inputs, "--sets", "50", "rare50", "full")
    out = inputs / "out"

    train50 = read_notes(out / "mimic3-50" / "train.jsonl")
    assert [n["id"] for n in train50] == ["100"]  # 300 has no discharge summary
    note = train50[0]
    assert note["labels"] == ["401.9", "38.93"]  # code-list order
    # report first, then the addenda by date; other categories left out
    assert note["text"] == ('Admission Date: 2100-01-01\nChief Complaint:\n"quoted" fever, chills\n\n'
                            "Discharge Diagnosis:\nzorbic fever 2\n\nAddendum: the zorbic rash, resolved."
                            "\n\nSecond addendum 42.")
    assert [n["labels"] for n in read_notes(out / "mimic3-50" / "dev.jsonl")] == [["401.9", "038.9", "96.04"]]
    assert [n["labels"] for n in read_notes(out / "mimic3-50" / "test.jsonl")] == [[]]
    assert read_codes(out / "mimic3-50" / "codes.txt") == ["401.9", "38.93", "038.9", "96.04"]

    full_codes = read_codes(out / "mimic3-full" / "codes.txt")
    assert full_codes == sorted(["401.9", "V58.61", "E879.0", "04.07", "38.93", "038.9", "486", "96.04", "790.8"])
    assert read_notes(out / "mimic3-full" / "train.jsonl")[0]["labels"] == ["04.07", "38.93", "401.9", "E879.0",
                                                                           "V58.61"]

    rare_train = read_notes(out / "mimic3-rare50" / "train.jsonl")
    assert rare_train[0]["labels"] == ["40.7", "V58.61"]  # as published, repeats dropped
    assert read_notes(out / "mimic3-rare50" / "dev.jsonl")[0]["labels"] == ["40.7", "790.8"]
    assert read_codes(out / "mimic3-rare50" / "codes.txt") == ["40.7", "790.8", "V58.61"]

    assert summary["mimic3-50"] == {"codes": 4, "train": 1, "dev": 1, "test": 1, "missing_notes": 1,
                                    "empty_labels": 1, "labels_not_in_tables": 0}
    assert summary["mimic3-rare50"]["labels_not_in_tables"] == 1
    assert "1 published labels not among the admission's codes" in caplog.text


def test_clean_set(inputs, caplog):
    summary = run(inputs, "--sets", "clean", "--min-count", "2", "--text", "edin")
    out = inputs / "out" / "mimic3-clean"
    # codes of at least 2 admissions of the split with a note: 401.9 (100, 200) and 04.07 (100, 400)
    assert read_codes(out / "codes.txt") == ["04.07", "401.9"]
    train = read_notes(out / "train.jsonl")
    assert [(n["id"], n["labels"]) for n in train] == [("100", ["04.07", "401.9"])]  # 300 no note, 600 no code
    assert train[0]["text"] == ("admission date chief complaint quoted fever chills discharge diagnosis zorbic fever "
                                "addendum the zorbic rash resolved second addendum")
    assert [(n["id"], n["labels"]) for n in read_notes(out / "dev.jsonl")] == [("200", ["401.9"])]  # val -> dev
    assert [(n["id"], n["labels"]) for n in read_notes(out / "test.jsonl")] == [("400", ["04.07"])]
    assert summary["mimic3-clean"] == {"codes": 2, "train": 1, "dev": 1, "test": 1, "missing_notes": 1,
                                       "no_labels": 1}
    assert "mimic3-clean: 1 admissions without a code of the set, dropped" in caplog.text
    # with Edin et al.'s 10, no code of these invented tables is frequent enough
    with pytest.raises(DataError, match="mimic3-clean train: none of its 3 admissions has a note with a code"):
        run(inputs, "--sets", "clean")


def test_edin_text_follows_their_preprocessor():
    edin = prepare_mimic3.edin_text
    # non-ASCII letters go too; a number that starts the note stays; brackets stay (remove_brackets=False)
    assert edin("2 Tabs_daily, café  3\n[**Name**] 40 mg 5 6 x") == "2 tabs daily caf name mg x"
    assert edin("dose 5 6 ") == "dose"  # a trailing space makes the last number one between spaces
    assert edin("dose 5 6") == "dose 6"  # their regex needs a space after the number: the last one stays
    assert edin("B12 and 1st, 2-3 days") == "b12 and 1st days"
    assert prepare_mimic3.caml_tokenize("2 Tabs_daily, café") == "tabs_daily café"


def test_edin_split_file_errors(tmp_path):
    path = tmp_path / "split.csv"
    for text, match in (("", "expected the header hadm_id,split"), ("_id,split\n1,train\n", "expected the header"),
                        ("hadm_id,split\n1,dev\n", r":2: expected a numeric hadm_id and train, val or test"),
                        ("hadm_id,split\n1,train\n1,test\n", ":3: hadm_id 1 is listed twice"),
                        ("hadm_id,split\n1,train\n2,val\n", "no admission in split test")):
        path.write_text(text)
        with pytest.raises(DataError, match=match):
            prepare_mimic3.read_edin_split(path)
    with pytest.raises(DataError, match="missing split file"):
        prepare_mimic3.read_edin_split(tmp_path / "none.csv")


def test_caml_text_and_gzip(tmp_path):
    write_mimic(tmp_path / "mimic", gz=True)
    write_splits(tmp_path / "splits")
    run(tmp_path, "--sets", "50", "--text", "caml")
    text = read_notes(tmp_path / "out" / "mimic3-50" / "train.jsonl")[0]["text"]
    assert text == ("admission date chief complaint quoted fever chills discharge diagnosis zorbic fever "
                    "addendum the zorbic rash resolved second addendum")
    assert not (tmp_path / "out" / "mimic3-full").exists()


def test_no_notes_for_a_split(inputs):
    (inputs / "splits" / "caml" / "test_50_hadm_ids.csv").write_text("999\n")
    with pytest.raises(DataError, match="mimic3-50 test: no discharge summary found"):
        run(inputs, "--sets", "50")


def test_bad_inputs(inputs):
    (inputs / "mimic" / "PROCEDURES_ICD.csv").unlink()
    with pytest.raises(DataError, match="no PROCEDURES_ICD.csv"):
        run(inputs)
    write_mimic(inputs / "mimic")
    (inputs / "splits" / "caml" / "dev_full_hadm_ids.csv").write_text("hadm_id\n200\n")
    with pytest.raises(DataError, match="expected one numeric hadm_id a line, got 'hadm_id'"):
        run(inputs, "--sets", "full")
    (inputs / "mimic" / "DIAGNOSES_ICD.csv").write_text("ROW_ID,HADM_ID,CODE\n1,100,4019\n")
    with pytest.raises(DataError, match=r"missing column\(s\) SEQ_NUM, ICD9_CODE"):
        run(inputs, "--sets", "50")
    write_mimic(inputs / "mimic")
    (inputs / "mimic" / "NOTEEVENTS.csv").write_bytes(b"")
    with pytest.raises(DataError, match="NOTEEVENTS.csv: empty file, expected a CSV header"):
        run(inputs, "--sets", "50")
    write_mimic(inputs / "mimic")
    with open(inputs / "mimic" / "PROCEDURES_ICD.csv", "a") as f:
        f.write('9,1,100,3,"04X7"\n')
    with pytest.raises(DataError, match=r"PROCEDURES_ICD.csv:6: not an ICD-9-CM code: '04X7'"):
        run(inputs, "--sets", "50")


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mimic", str(tmp_path / "none"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"prepare_mimic3.py: error: {tmp_path / 'none'}: no such folder"]


def test_public_split_files(shared_dir):
    mimic3 = shared_dir / "data" / "mimic3"
    splits = prepare_mimic3.load_splits(mimic3, ["50", "rare50", "full"])
    assert {s: len(v) for s, v in splits["50"].items()} == {"train": 8066, "dev": 1573, "test": 1729}
    assert {s: len(v) for s, v in splits["full"].items()} == {"train": 47723, "dev": 1631, "test": 3372}
    assert {s: len(v) for s, v in splits["rare50"].items()} == {"train": 249, "dev": 20, "test": 142}
    rare_codes = set(read_codes(mimic3 / "rare50_codes.txt"))
    rare_labels = [labels for rows in splits["rare50"].values() for _, labels in rows]
    assert all(set(labels) <= rare_codes for labels in rare_labels)
    assert sum(map(len, [labels for _, labels in splits["rare50"]["test"]])) == 146  # 148 written, 2 repeats
    full_ids = {h for rows in splits["full"].values() for h, _ in rows}
    assert all(h in full_ids for rows in splits["50"].values() for h, _ in rows)
    clean = prepare_mimic3.load_splits(mimic3, ["clean"])["clean"]
    assert {s: len(v) for s, v in clean.items()} == {"train": 38401, "dev": 5577, "test": 8734}
    assert {h for rows in clean.values() for h, _ in rows} <= full_ids  # Edin et al. kept 52,712 of CAML's 52,726
