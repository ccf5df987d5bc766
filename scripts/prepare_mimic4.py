"""Build MIMIC-IV ICD-10 and ICD-9 notes JSONL (full and top-50) on the splits of Edin et al. 2023.

    python scripts/prepare_mimic4.py --mimic /path/to/mimiciv/2.2 --note /path/to/mimic-iv-note/2.2 --out runs/mimic4

--mimic holds hosp/diagnoses_icd and hosp/procedures_icd (or is the hosp folder), --note holds note/discharge (or is
the note folder), each .csv or .csv.gz as PhysioNet ships them (credentialed access).
--splits holds Edin et al.'s split files (default ../shared/data/mimic4 beside the repo):
  mimiciv_icd10_split.csv, mimiciv_icd9_split.csv   hadm_id,split (train, val or test)
Writes OUT/mimic4-{icd10,icd9}-{full,50}/{train,dev,test}.jsonl and codes.txt (notes in split-file order, id =
hadm_id; their val is written as dev, as our other sets call it). Outputs are rewritten on a re-run, as
prepare_mimic3.py does (atomically, after every set is built, so a failed run leaves an earlier run's files as they
were); the input files are only read, and nothing is written beside them.

As Edin et al. build MIMIC-IV (medical-coding-reproducibility, prepare_data/prepare_mimiciv.py and utils.py):
- an admission's note is its discharge.csv text; empty texts and exact repeats are dropped;
- codes are icd_code read as strings (leading zeros kept: 0389 -> 038.9, 0040 -> 00.40) and dotted per code system
  by cec.coding.icd.mimic_code: ICD-9-CM diagnoses after 3 characters (4 for E codes), ICD-9-CM procedures after 2,
  ICD-10-CM after 3, ICD-10-PCS none (0DTJ4ZZ). The ICD-9 sets take the icd_version 9 rows of both tables, the
  ICD-10 sets the version 10 rows; a code repeated within an admission counts once;
- full: the codes of at least 10 admissions (--min-count) of the set; admissions left without a code are dropped
  (Edin et al. drop them before splitting, so with the same MIMIC-IV none are); codes.txt is those codes, sorted;
- --text edin: their TextPreprocessor as configured there (lower case, every run of characters other than a-z and
  0-9 a space, runs of whole numbers between spaces dropped).
Where we differ:
- 50: Edin et al. build no MIMIC-IV top-50. Ours is the 50 most frequent codes (admissions per code, ties by code)
  counted over all three splits, as their MIMIC-III-50 count does (prepare_mimiciii_mullenbach.py;
  --top50-from train counts train only), and, as their MIMIC-III-50, admissions without one are dropped.
- ICD-10-CM codes of three characters stay without a dot (I10); their reformat_icd10 writes "I10.".
- The text is raw by default (--text raw), as in our other sets: newlines and section titles, which segmentation
  needs.
- They count codes over all notes before splitting; we count over the split's admissions. The codes kept are the
  same: an admission they dropped had only rarer codes.
- An admission with several discharge notes gets them joined by a blank line in note_seq order (they keep one row
  per note; their split files list each hadm_id once).
- Their loader caches a .feather file beside each download; we write nothing there.
"""
import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

from cec.cli import user_errors
from cec.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # prepare_mimic3's readers, also when loaded from a test
from prepare_mimic3 import (EDIN_MIN_COUNT, TEXT, WARNINGS, build_edin_set, check_tables, dotted_code,  # noqa: E402
                            find_table, prepare_outputs, read_edin_split, read_table, write_sets)

log = logging.getLogger("prepare_mimic4")
SETS = ("icd10-full", "icd10-50", "icd9-full", "icd9-50")
TOP = 50
NOTE_COLUMNS = ("NOTE_ID", "HADM_ID", "NOTE_SEQ", "TEXT")
CODE_COLUMNS = ("HADM_ID", "ICD_CODE", "ICD_VERSION")
DEFAULT_SPLITS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mimic4"


def locate(folder: Path, sub: str, name: str) -> Path:
    """NAME.csv or NAME.csv.gz in FOLDER/SUB (PhysioNet's layout) or in FOLDER itself."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    for where in (folder / sub, folder):
        if where.is_dir():
            try:
                return find_table(where, name)
            except DataError:
                pass
    raise DataError(f"{folder}: no {name}.csv or {name}.csv.gz, nor in {sub}/")


def version_of(name: str) -> str:
    return name.split("-")[0].removeprefix("icd")


def read_discharge_notes(path: Path, keep: set[str]) -> dict[str, str]:
    """hadm_id -> its discharge note, for the admissions in `keep`; several notes are joined in note_seq order."""
    parts = defaultdict(list)
    for _, row in read_table(path, NOTE_COLUMNS):
        hadm, text = row["HADM_ID"].strip(), row["TEXT"].strip()
        if hadm in keep and text:
            seq = int(row["NOTE_SEQ"]) if row["NOTE_SEQ"].strip().isdigit() else 0
            parts[hadm].append((seq, row["NOTE_ID"].strip(), text))
    texts = {hadm: "\n\n".join(dict.fromkeys(t for *_, t in sorted(p))) for hadm, p in parts.items()}
    several = sum(len(set(t for *_, t in p)) > 1 for p in parts.values())
    if several:
        log.info("%s: %d admissions with several discharge notes, joined in note_seq order", path, several)
    return texts


def read_version_codes(diag_path: Path, proc_path: Path, keep: dict[str, set[str]]) -> dict[str, dict[str, dict]]:
    """icd_version -> hadm_id -> its dotted codes (an insertion-ordered dict used as a set), for the admissions of
    `keep[version]`."""
    codes = {version: defaultdict(dict) for version in keep}
    for path, is_diag in ((diag_path, True), (proc_path, False)):
        for lineno, row in read_table(path, CODE_COLUMNS):
            hadm, code, version = row["HADM_ID"].strip(), row["ICD_CODE"].strip(), row["ICD_VERSION"].strip()
            if version not in ("9", "10"):
                raise DataError(f"{path}:{lineno}: icd_version must be 9 or 10, got {version!r}")
            if version in keep and hadm in keep[version] and code:
                codes[version][hadm][dotted_code(path, lineno, code, version, is_diag)] = None
    return codes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mimic", required=True, type=Path, help="MIMIC-IV folder (with hosp/) or its hosp folder")
    parser.add_argument("--note", required=True, type=Path, help="MIMIC-IV-Note folder (with note/) or its note folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--splits", type=Path, default=DEFAULT_SPLITS_DIR, help="folder with the split files")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="which datasets to build")
    parser.add_argument("--text", choices=tuple(TEXT), default="raw",
                        help="note text as written, CAML-tokenised or as Edin et al. preprocess it")
    parser.add_argument("--min-count", type=int, default=EDIN_MIN_COUNT,
                        help="full sets: keep codes of at least this many admissions (Edin et al.: 10)")
    parser.add_argument("--top50-from", choices=("all", "train"), default="all",
                        help="50 sets: count code frequencies over all splits (as Edin et al.'s MIMIC-III-50) or train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.min_count < 1:
        raise DataError(f"--min-count must be at least 1, got {args.min_count}")
    tables = {"notes": locate(args.note, "note", "discharge"), "diag": locate(args.mimic, "hosp", "diagnoses_icd"),
              "proc": locate(args.mimic, "hosp", "procedures_icd")}
    check_tables({tables["notes"]: NOTE_COLUMNS, tables["diag"]: CODE_COLUMNS, tables["proc"]: CODE_COLUMNS})
    if not args.splits.is_dir():
        raise DataError(f"{args.splits}: no such folder (give --splits)")
    versions = sorted({version_of(name) for name in args.sets})
    splits = {v: read_edin_split(args.splits / f"mimiciv_icd{v}_split.csv") for v in versions}
    prepare_outputs(args.out, [f"mimic4-{name}" for name in args.sets])
    keep = {v: {hadm for ids in splits[v].values() for hadm in ids} for v in versions}

    log.info("reading discharge notes of %d admissions from %s", len(set().union(*keep.values())), tables["notes"])
    texts = read_discharge_notes(tables["notes"], set().union(*keep.values()))
    log.info("reading codes from %s and %s", tables["diag"], tables["proc"])
    codes = read_version_codes(tables["diag"], tables["proc"], keep)

    built = {}
    for name in args.sets:
        version, kind = version_of(name), name.split("-")[1]
        built[f"mimic4-{name}"] = build_edin_set(f"mimic4-{name}", splits[version], texts, codes[version], args.text,
                                                 args.min_count, top=TOP if kind == "50" else None,
                                                 top_from=args.top50_from)
    summary = write_sets(args.out, built, WARNINGS)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    with user_errors(Path(sys.argv[0]).name):
        main()
