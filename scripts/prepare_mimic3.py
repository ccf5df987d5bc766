"""Build MIMIC-III-50, MIMIC-III-rare50 and MIMIC-III-full notes JSONL from the raw MIMIC-III CSVs.

    python scripts/prepare_mimic3.py --mimic /path/to/mimic-iii-1.4 --out runs/mimic3

--mimic holds NOTEEVENTS, DIAGNOSES_ICD and PROCEDURES_ICD as .csv or .csv.gz (PhysioNet credentialed access).
--splits holds the public split files (default ../shared/data/mimic3 beside the repo):
  caml/{train,dev,test}_{50,full}_hadm_ids.csv   CAML's splits (Mullenbach et al. 2018), one hadm_id a line
  top50_codes.txt                                 the MIMIC-III-50 codes
  kept_rare50/rare50_{train,dev,test}.csv        KEPT's rare50 (Yang et al. 2022): subject_id,hadm_id,labels
  rare50_codes.txt                                the rare50 codes
Writes OUT/mimic3-{50,rare50,full}/{train,dev,test}.jsonl and codes.txt (notes in split-file order, id = hadm_id).

CAML's preprocessing: an admission's note is its discharge summary with its addenda (NOTEEVENTS rows of
CATEGORY "Discharge summary"), report first, then addenda by CHARTDATE and ROW_ID, joined by a blank line.
Codes are read as strings and dotted as CAML's reformat does: diagnoses after 3 characters (after 4 for E
codes), procedures after 2, so procedures keep their leading zeros (0407 -> 04.07; CAML read them as integers
and wrote 40.7, a bug that medical-coding-reproducibility fixed).
- 50: labels are the admission's codes in top50_codes.txt.
- full: labels are all the admission's codes; codes.txt is every code of the three splits, sorted.
- rare50: labels are KEPT's published labels (repeats dropped), kept as published: KEPT built them with CAML's
  leading-zero loss, so rare50 has 40.7 (really 04.07). They are cross-checked against the tables, read the
  way CAML read them, and disagreements are reported.
--text raw (default) keeps the note as written (newlines and section titles, which segmentation needs);
--text caml writes CAML's tokenised text (lower case, \\w+ tokens, numbers dropped), as KEPT and the paper's
prompts show it.
"""
import argparse
import codecs
import csv
import gzip
import io
import json
import logging
import re
import sys
import zlib
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from cec.cli import user_errors
from cec.data import read_codes, read_text_file, write_codes, write_notes
from cec.errors import DataError

log = logging.getLogger("prepare_mimic3")
SPLITS = ("train", "dev", "test")
SETS = ("50", "rare50", "full")
DEFAULT_SPLITS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mimic3"


def find_table(mimic_dir: Path, name: str) -> Path:
    for candidate in sorted(mimic_dir.iterdir()):
        if candidate.name.lower() in (f"{name.lower()}.csv", f"{name.lower()}.csv.gz"):
            return candidate
    raise DataError(f"{mimic_dir}: no {name}.csv or {name}.csv.gz")


class _ReplacementCounter:
    """A codecs error handler that replaces each undecodable byte run with U+FFFD and counts the rows hit."""

    def __init__(self):
        self.count = 0

    def __call__(self, error: UnicodeDecodeError):
        self.count += 1
        return "\ufffd", error.end


def read_table(path: Path):
    """Rows of a MIMIC CSV (.csv or .csv.gz) as dicts with upper-case column names; every value a string.
    Bytes that are not valid UTF-8 are replaced by U+FFFD with one warning per file (as cec.data does for text
    files); a row with the wrong number of fields, NUL bytes or a corrupt gzip stream is a DataError."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    replaced = _ReplacementCounter()
    handler = f"cec-count-{id(replaced)}"
    codecs.register_error(handler, replaced)
    lineno = 1
    try:
        with opener(path, "rt", encoding="utf-8", errors=handler, newline="") as f:
            reader = csv.reader(f)
            header = [h.strip().upper() for h in next(reader, [])]
            for row in tqdm(reader, desc=path.name, unit=" rows", leave=False):
                lineno = reader.line_num
                if len(row) != len(header):
                    raise DataError(f"{path}:{lineno}: {len(row)} fields, the header has {len(header)}")
                yield dict(zip(header, row))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    if replaced.count:
        log.warning("%s: %d row%s with bytes that are not valid UTF-8, replaced with U+FFFD", path, replaced.count,
                    "s" if replaced.count > 1 else "")


def require_columns(path: Path, row: dict, columns: tuple[str, ...]):
    missing = [c for c in columns if c not in row]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")


def reformat_code(code: str, is_diag: bool) -> str:
    """MIMIC's dotless ICD-9 code with its dot: 4019 -> 401.9, V5861 -> V58.61, E8790 -> E879.0, 0407 -> 04.07."""
    code = code.strip().replace(".", "")
    cut = (4 if code.startswith("E") else 3) if is_diag else 2
    return code[:cut] + "." + code[cut:] if len(code) > cut else code


def caml_reformat_code(code: str, is_diag: bool) -> str:
    """The code as CAML wrote it: procedure codes lost their leading zeros (read as integers)."""
    code = code.strip().replace(".", "")
    if not is_diag and code.isdigit():
        code = str(int(code))
    return reformat_code(code, is_diag)


def read_discharge_summaries(path: Path, keep: set[str]) -> dict[str, str]:
    """hadm_id -> its discharge summary report and addenda, for the admissions in `keep`."""
    parts = defaultdict(list)
    first = True
    for row in read_table(path):
        if first:
            require_columns(path, row, ("ROW_ID", "HADM_ID", "CHARTDATE", "CATEGORY", "DESCRIPTION", "TEXT"))
            first = False
        hadm = row["HADM_ID"].strip()
        if row["CATEGORY"].strip() != "Discharge summary" or hadm not in keep:
            continue
        is_addendum = row["DESCRIPTION"].strip().lower() != "report"
        row_id = int(row["ROW_ID"]) if row["ROW_ID"].strip().isdigit() else 0
        parts[hadm].append((is_addendum, row["CHARTDATE"], row_id, row["TEXT"].strip()))
    texts = {hadm: "\n\n".join(t for *_, t in sorted(p) if t) for hadm, p in parts.items()}
    return {hadm: text for hadm, text in texts.items() if text}


def read_admission_codes(diag_path: Path, proc_path: Path, keep: set[str]) -> dict[str, list[tuple[str, bool]]]:
    """hadm_id -> [(dotless code as written, is_diagnosis)], diagnoses first, each in SEQ_NUM order."""
    codes = defaultdict(list)
    for path, is_diag in ((diag_path, True), (proc_path, False)):
        rows = []
        first = True
        for row in read_table(path):
            if first:
                require_columns(path, row, ("HADM_ID", "SEQ_NUM", "ICD9_CODE"))
                first = False
            hadm, code = row["HADM_ID"].strip(), row["ICD9_CODE"].strip()
            if hadm in keep and code:
                seq = int(row["SEQ_NUM"]) if row["SEQ_NUM"].strip().isdigit() else 0
                rows.append((hadm, seq, code))
        for hadm, _, code in sorted(rows):
            codes[hadm].append((code, is_diag))
    return codes


def read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: missing split file")
    ids = [ln.strip() for ln in read_text_file(path).splitlines() if ln.strip()]
    bad = [i for i in ids if not i.isdigit()]
    if bad or not ids:
        raise DataError(f"{path}: expected one numeric hadm_id a line" + (f", got {bad[0]!r}" if bad else ""))
    return ids


def read_rare50_split(path: Path) -> list[tuple[str, list[str]]]:
    """(hadm_id, labels with repeats dropped) rows of a KEPT rare50 split file."""
    if not path.is_file():
        raise DataError(f"{path}: missing split file")
    rows = list(csv.DictReader(io.StringIO(read_text_file(path), newline="")))
    if not rows or not {"hadm_id", "labels"} <= set(rows[0]):
        raise DataError(f"{path}: expected columns subject_id,hadm_id,labels")
    out = []
    for lineno, row in enumerate(rows, start=2):
        labels = list(dict.fromkeys(c.strip() for c in row["labels"].split(";") if c.strip()))
        if not row["hadm_id"].strip().isdigit() or not labels:
            raise DataError(f"{path}:{lineno}: expected a numeric hadm_id and at least one label")
        out.append((row["hadm_id"].strip(), labels))
    return out


def caml_tokenize(text: str) -> str:
    return " ".join(t.lower() for t in re.findall(r"\w+", text) if not t.isnumeric())


def load_splits(splits_dir: Path, sets: list[str]) -> dict[str, dict[str, list[tuple[str, list[str] | None]]]]:
    """set -> split -> [(hadm_id, labels given by the split file or None)]."""
    out = {}
    for name in sets:
        if name == "rare50":
            out[name] = {s: read_rare50_split(splits_dir / "kept_rare50" / f"rare50_{s}.csv") for s in SPLITS}
        else:
            out[name] = {s: [(h, None) for h in read_id_list(splits_dir / "caml" / f"{s}_{name}_hadm_ids.csv")]
                         for s in SPLITS}
    return out


def build_set(name: str, splits: dict, texts: dict[str, str], codes: dict, code_list: list[str] | None,
              text_mode: str) -> tuple[dict[str, list[dict]], list[str], dict]:
    """Notes per split, the code list, and counts of what did not line up."""
    stats = {"missing_notes": 0, "empty_labels": 0, "labels_not_in_tables": 0}
    labelled = {}
    for split, rows in splits.items():
        labelled[split] = []
        for hadm, given in rows:
            if hadm not in texts:
                stats["missing_notes"] += 1
                continue
            if given is not None:  # published labels (rare50): checked against the tables as CAML read them
                in_tables = {caml_reformat_code(c, d) for c, d in codes.get(hadm, [])}
                stats["labels_not_in_tables"] += sum(c not in in_tables for c in given)
                if code_list is not None and any(c not in code_list for c in given):
                    raise DataError(f"mimic3-{name} {split}: admission {hadm} has labels outside the code list")
                labels = given
            else:
                labels = list(dict.fromkeys(reformat_code(c, d) for c, d in codes.get(hadm, [])))
            labelled[split].append((hadm, labels))
        if not labelled[split]:
            raise DataError(f"mimic3-{name} {split}: no discharge summary found for any of its {len(rows)} "
                            f"admissions (is NOTEEVENTS the full MIMIC-III table?)")
    if code_list is None:
        code_list = sorted({c for rows in labelled.values() for _, labels in rows for c in labels})
    rank = {c: i for i, c in enumerate(code_list)}
    notes = {}
    for split, rows in labelled.items():
        notes[split] = []
        for hadm, labels in rows:
            labels = sorted((c for c in labels if c in rank), key=rank.__getitem__)
            stats["empty_labels"] += not labels
            text = caml_tokenize(texts[hadm]) if text_mode == "caml" else texts[hadm]
            if not text:
                raise DataError(f"mimic3-{name} {split}: admission {hadm} has no text left after {text_mode} preprocessing")
            notes[split].append({"id": hadm, "text": text, "labels": labels})
    return notes, code_list, stats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mimic", required=True, type=Path, help="folder with the MIMIC-III CSV tables")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--splits", type=Path, default=DEFAULT_SPLITS_DIR, help="folder with the split files")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="which benchmarks to build")
    parser.add_argument("--text", choices=("raw", "caml"), default="raw", help="note text as written, or CAML-tokenised")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not args.mimic.is_dir():
        raise DataError(f"{args.mimic}: no such folder")
    if not args.splits.is_dir():
        raise DataError(f"{args.splits}: no such folder (give --splits)")
    tables = {name: find_table(args.mimic, name) for name in ("NOTEEVENTS", "DIAGNOSES_ICD", "PROCEDURES_ICD")}
    splits = load_splits(args.splits, args.sets)
    code_lists = {"50": read_codes(args.splits / "top50_codes.txt") if "50" in args.sets else None,
                  "rare50": read_codes(args.splits / "rare50_codes.txt") if "rare50" in args.sets else None,
                  "full": None}
    keep = {hadm for per_split in splits.values() for rows in per_split.values() for hadm, _ in rows}

    log.info("reading discharge summaries of %d admissions from %s", len(keep), tables["NOTEEVENTS"])
    texts = read_discharge_summaries(tables["NOTEEVENTS"], keep)
    log.info("reading codes from %s and %s", tables["DIAGNOSES_ICD"], tables["PROCEDURES_ICD"])
    codes = read_admission_codes(tables["DIAGNOSES_ICD"], tables["PROCEDURES_ICD"], keep)

    summary = {}
    for name in args.sets:
        notes, code_list, stats = build_set(name, splits[name], texts, codes, code_lists[name], args.text)
        out_dir = args.out / f"mimic3-{name}"
        for split, split_notes in notes.items():
            write_notes(out_dir / f"{split}.jsonl", split_notes)
        write_codes(out_dir / "codes.txt", code_list)
        summary[f"mimic3-{name}"] = {"codes": len(code_list), **{s: len(n) for s, n in notes.items()}, **stats}
        for key, what in (("missing_notes", "admissions without a discharge summary, skipped"),
                          ("empty_labels", "notes without a code of the set"),
                          ("labels_not_in_tables", "published labels not among the admission's codes")):
            if stats[key]:
                log.warning("mimic3-%s: %d %s", name, stats[key], what)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    with user_errors(Path(sys.argv[0]).name):
        main()
