"""Build MIMIC-III-50, MIMIC-III-rare50, MIMIC-III-full and MIMIC-III-clean notes JSONL from the raw MIMIC-III CSVs.

    python scripts/prepare_mimic3.py --mimic /path/to/mimic-iii-1.4 --out runs/mimic3

--mimic holds NOTEEVENTS, DIAGNOSES_ICD and PROCEDURES_ICD as .csv or .csv.gz (PhysioNet credentialed access).
--splits holds the public split files (default ../shared/data/mimic3 beside the repo):
  caml/{train,dev,test}_{50,full}_hadm_ids.csv   CAML's splits (Mullenbach et al. 2018), one hadm_id a line
  top50_codes.txt                                 the MIMIC-III-50 codes
  kept_rare50/rare50_{train,dev,test}.csv        KEPT's rare50 (Yang et al. 2022): subject_id,hadm_id,labels
  rare50_codes.txt                                the rare50 codes
  mimiciii_clean_split.csv                        Edin et al. 2023's MIMIC-III clean: hadm_id,split (train/val/test)
Writes OUT/mimic3-{50,rare50,full,clean}/{train,dev,test}.jsonl and codes.txt (notes in split-file order,
id = hadm_id; Edin et al.'s val is written as dev). Outputs are rewritten on a re-run (atomically, after every set
is built, so a run that fails leaves an earlier run's files as they were); the input files are only read.

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
- clean (Edin et al. 2023, medical-coding-reproducibility prepare_mimiciii_clean.py): labels are the admission's
  codes (diagnoses and procedures, leading zeros kept) that occur in at least 10 admissions (--min-count) of the
  clean split, counted once per admission; admissions left without a label are dropped (Edin et al. drop them
  before splitting, so with the same MIMIC-III none are); codes.txt is those codes, sorted. Edin et al. count over
  their whole dataset before splitting; counting over the split's admissions gives the same codes, because an
  admission they dropped had only rarer codes. Where we differ: the note is the report and addenda in CAML's
  order joined by a blank line (Edin et al. join them in table order with a space), and the text is raw unless
  --text edin.
--text raw (default) keeps the note as written (newlines and section titles, which segmentation needs);
--text caml writes CAML's tokenised text (lower case, \\w+ tokens, numbers dropped), as KEPT and the paper's
prompts show it; --text edin writes Edin et al.'s (lower case, every run of characters other than a-z and 0-9 a
space, runs of whole numbers between spaces dropped, so a number that starts or ends the note stays).
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
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from cec.cli import user_errors
from cec.data import read_codes, read_text_file, write_codes, write_notes
from cec.errors import DataError
from cec.coding.icd import mimic_code
from cec.io import prepare_output

log = logging.getLogger("prepare_mimic3")
SPLITS = ("train", "dev", "test")
SETS = ("50", "rare50", "full", "clean")
EDIN_SPLITS = {"train": "train", "val": "dev", "test": "test"}  # Edin et al.'s split names -> ours
EDIN_MIN_COUNT = 10  # Edin et al.'s MIN_TARGET_COUNT
NOTE_COLUMNS = ("ROW_ID", "HADM_ID", "CHARTDATE", "CATEGORY", "DESCRIPTION", "TEXT")
CODE_COLUMNS = ("HADM_ID", "SEQ_NUM", "ICD9_CODE")
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


def check_header(path: Path, header: list[str], columns: tuple[str, ...]):
    if not header:
        raise DataError(f"{path}: empty file, expected a CSV header with {', '.join(columns)}")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (the header has {', '.join(header)})")


def read_table(path: Path, columns: tuple[str, ...], header_only: bool = False):
    """(line, row) of a MIMIC CSV (.csv or .csv.gz), each row a dict keyed by upper-case column name, every value
    a string. The header must name `columns` (in any case); header_only checks just that and yields nothing.
    Bytes that are not valid UTF-8 are replaced by U+FFFD with one warning per file (as cec.data does for text
    files); a row with the wrong number of fields, NUL bytes or a corrupt gzip stream is a DataError."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    replaced = _ReplacementCounter()
    handler = f"cec-count-{id(replaced)}"
    codecs.register_error(handler, replaced)
    reader = None
    try:
        with opener(path, "rt", encoding="utf-8", errors=handler, newline="") as f:
            reader = csv.reader(f)
            header = [h.strip().upper() for h in next(reader, [])]
            check_header(path, header, columns)
            if header_only:
                return
            for row in tqdm(reader, desc=path.name, unit=" rows", leave=False, disable=None):
                lineno = reader.line_num
                if len(row) != len(header):
                    raise DataError(f"{path}:{lineno}: {len(row)} fields, the header has {len(header)}")
                yield lineno, dict(zip(header, row))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num if reader else 1}: malformed CSV ({e})") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    if replaced.count:
        log.warning("%s: %d row%s with bytes that are not valid UTF-8, replaced with U+FFFD", path, replaced.count,
                    "s" if replaced.count > 1 else "")


def check_tables(tables: dict[Path, tuple[str, ...]]):
    """Every table's header, before the long reads: a wrong file fails in a second, not after the notes."""
    for path, columns in tables.items():
        for _ in read_table(path, columns, header_only=True):
            pass


def dotted_code(path: Path, lineno: int, code: str, version, is_diag: bool) -> str:
    """cec.coding.icd.mimic_code, with the file and line of a code that is not one."""
    try:
        return mimic_code(code, version, is_diag)
    except DataError as e:
        raise DataError(f"{path}:{lineno}: {e}") from None


def caml_reformat_code(code: str, is_diag: bool) -> str:
    """The code as CAML wrote it: procedure codes lost their leading zeros (read as integers), 0407 -> 40.7."""
    code = code.strip().replace(".", "")
    if is_diag or not code.isdigit():
        return mimic_code(code, 9, is_diag)
    code = str(int(code))
    return mimic_code(code, 9, False) if len(code) > 2 else code  # 0001 -> 1, as CAML wrote it


def read_discharge_summaries(path: Path, keep: set[str]) -> dict[str, str]:
    """hadm_id -> its discharge summary report and addenda, for the admissions in `keep`."""
    parts = defaultdict(list)
    for _, row in read_table(path, NOTE_COLUMNS):
        hadm = row["HADM_ID"].strip()
        if row["CATEGORY"].strip() != "Discharge summary" or hadm not in keep:
            continue
        is_addendum = row["DESCRIPTION"].strip().lower() != "report"
        row_id = int(row["ROW_ID"]) if row["ROW_ID"].strip().isdigit() else 0
        parts[hadm].append((is_addendum, row["CHARTDATE"], row_id, row["TEXT"].strip()))
    texts = {hadm: "\n\n".join(t for *_, t in sorted(p) if t) for hadm, p in parts.items()}
    return {hadm: text for hadm, text in texts.items() if text}


def read_admission_codes(diag_path: Path, proc_path: Path, keep: set[str]) -> dict[str, list[tuple[str, str]]]:
    """hadm_id -> [(dotted code, the code as CAML wrote it)], diagnoses first, each in SEQ_NUM order."""
    codes = defaultdict(list)
    for path, is_diag in ((diag_path, True), (proc_path, False)):
        rows = []
        for lineno, row in read_table(path, CODE_COLUMNS):
            hadm, code = row["HADM_ID"].strip(), row["ICD9_CODE"].strip()
            if hadm in keep and code:
                seq = int(row["SEQ_NUM"]) if row["SEQ_NUM"].strip().isdigit() else 0
                rows.append((hadm, seq, dotted_code(path, lineno, code, 9, is_diag), caml_reformat_code(code, is_diag)))
        for hadm, _, code, caml in sorted(rows):
            codes[hadm].append((code, caml))
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


def read_edin_split(path: Path) -> dict[str, list[str]]:
    """split -> hadm_ids, in file order, of an Edin et al. split file (hadm_id,split; split train, val or test)."""
    if not path.is_file():
        raise DataError(f"{path}: missing split file")
    rows = list(csv.reader(io.StringIO(read_text_file(path), newline="")))
    if not rows or [h.strip().lower() for h in rows[0]] != ["hadm_id", "split"]:
        raise DataError(f"{path}: expected the header hadm_id,split")
    out, seen = {s: [] for s in SPLITS}, set()
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        hadm, split = (row[0].strip(), row[1].strip()) if len(row) == 2 else ("", "")
        if not hadm.isdigit() or split not in EDIN_SPLITS:
            raise DataError(f"{path}:{lineno}: expected a numeric hadm_id and train, val or test, "
                            f"got {','.join(row)!r}")
        if hadm in seen:
            raise DataError(f"{path}:{lineno}: hadm_id {hadm} is listed twice")
        seen.add(hadm)
        out[EDIN_SPLITS[split]].append(hadm)
    empty = [s for s, ids in out.items() if not ids]
    if empty:
        raise DataError(f"{path}: no admission in split {empty[0]}")
    return out


def caml_tokenize(text: str) -> str:
    return " ".join(t.lower() for t in re.findall(r"\w+", text) if not t.isnumeric())


def edin_text(text: str) -> str:
    """Edin et al.'s TextPreprocessor as their MIMIC scripts configure it (lower, remove_special_characters_mullenbach,
    remove_digits), step by step."""
    text = re.sub(r"[^A-Za-z0-9]+", " ", text.lower())
    text = re.sub(r"(\s\d+)+\s", " ", text)  # whole numbers between spaces; not at the very start or end
    return re.sub(r"\s+", " ", text).strip()


TEXT = {"raw": lambda text: text, "caml": caml_tokenize, "edin": edin_text}


def load_splits(splits_dir: Path, sets: list[str]) -> dict[str, dict[str, list[tuple[str, list[str] | None]]]]:
    """set -> split -> [(hadm_id, labels given by the split file or None)]."""
    out = {}
    for name in sets:
        if name == "clean":
            out[name] = {s: [(h, None) for h in ids]
                         for s, ids in read_edin_split(splits_dir / "mimiciii_clean_split.csv").items()}
        elif name == "rare50":
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
                in_tables = {caml for _, caml in codes.get(hadm, [])}
                stats["labels_not_in_tables"] += sum(c not in in_tables for c in given)
                if code_list is not None and any(c not in code_list for c in given):
                    raise DataError(f"mimic3-{name} {split}: admission {hadm} has labels outside the code list")
                labels = given
            else:
                labels = list(dict.fromkeys(c for c, _ in codes.get(hadm, [])))
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
            text = TEXT[text_mode](texts[hadm])
            if not text:
                raise DataError(f"mimic3-{name} {split}: admission {hadm} has no text left after {text_mode} preprocessing")
            notes[split].append({"id": hadm, "text": text, "labels": labels})
    return notes, code_list, stats


def build_edin_set(name: str, splits: dict[str, list[str]], texts: dict[str, str], codes: dict[str, list[str]],
                   text_mode: str, min_count: int = EDIN_MIN_COUNT, top: int | None = None,
                   top_from: str = "all") -> tuple[dict[str, list[dict]], list[str], dict]:
    """A dataset as Edin et al. build theirs, on their split: the code list is every code of at least `min_count`
    admissions (all splits), or with `top` the `top` most frequent codes over `top_from` ("all" splits, as their
    MIMIC-III-50 count, or "train"; ties by code); labels are the admission's codes in the list, in list order;
    admissions without a note or without a label are dropped and counted."""
    stats = {"missing_notes": 0, "no_labels": 0}
    found = {split: [h for h in ids if h in texts] for split, ids in splits.items()}
    stats["missing_notes"] = sum(len(ids) - len(found[s]) for s, ids in splits.items())
    counted = [h for split, ids in found.items() if top is None or top_from == "all" or split == "train" for h in ids]
    counts = Counter(c for h in counted for c in set(codes.get(h, ())))
    if top is None:
        code_list = sorted(c for c, n in counts.items() if n >= min_count)
    else:
        code_list = sorted(counts, key=lambda c: (-counts[c], c))[:top]
    rank = {c: i for i, c in enumerate(code_list)}
    notes = {}
    for split, ids in found.items():
        notes[split] = []
        for hadm in ids:
            labels = sorted({c for c in codes.get(hadm, ()) if c in rank}, key=rank.__getitem__)
            if not labels:
                stats["no_labels"] += 1
                continue
            text = TEXT[text_mode](texts[hadm])
            if not text:
                raise DataError(f"{name} {split}: admission {hadm} has no text left after {text_mode} preprocessing")
            notes[split].append({"id": hadm, "text": text, "labels": labels})
        if not notes[split]:
            raise DataError(f"{name} {split}: none of its {len(splits[split])} admissions has a note with a code "
                            f"of the set (are these the full tables?)")
    return notes, code_list, stats


def set_paths(out_dir: Path) -> list[Path]:
    return [out_dir / f"{split}.jsonl" for split in SPLITS] + [out_dir / "codes.txt"]


def prepare_outputs(out: Path, names: list[str]):
    """Every output file's folder made and checked writable before the long reads."""
    for name in names:
        for path in set_paths(out / name):
            prepare_output(path)


def write_sets(out: Path, built: dict[str, tuple[dict, list[str], dict]], warnings: dict[str, str]) -> dict:
    """Write every built set (only once all are built) and return the summary; log a warning per nonzero count."""
    summary = {}
    for name, (notes, code_list, stats) in built.items():
        for split, split_notes in notes.items():
            write_notes(out / name / f"{split}.jsonl", split_notes)
        write_codes(out / name / "codes.txt", code_list)
        summary[name] = {"codes": len(code_list), **{s: len(n) for s, n in notes.items()}, **stats}
        for key, count in stats.items():
            if count:
                log.warning("%s: %d %s", name, count, warnings[key])
    return summary


WARNINGS = {"missing_notes": "admissions without a discharge summary, skipped",
            "empty_labels": "notes without a code of the set",
            "labels_not_in_tables": "published labels not among the admission's codes",
            "no_labels": "admissions without a code of the set, dropped (as Edin et al. do)"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mimic", required=True, type=Path, help="folder with the MIMIC-III CSV tables")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--splits", type=Path, default=DEFAULT_SPLITS_DIR, help="folder with the split files")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="which benchmarks to build")
    parser.add_argument("--text", choices=tuple(TEXT), default="raw",
                        help="note text as written, CAML-tokenised or as Edin et al. preprocess it")
    parser.add_argument("--min-count", type=int, default=EDIN_MIN_COUNT,
                        help="clean: keep codes of at least this many admissions (Edin et al.: 10)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not args.mimic.is_dir():
        raise DataError(f"{args.mimic}: no such folder")
    if not args.splits.is_dir():
        raise DataError(f"{args.splits}: no such folder (give --splits)")
    if args.min_count < 1:
        raise DataError(f"--min-count must be at least 1, got {args.min_count}")
    tables = {name: find_table(args.mimic, name) for name in ("NOTEEVENTS", "DIAGNOSES_ICD", "PROCEDURES_ICD")}
    check_tables({tables["NOTEEVENTS"]: NOTE_COLUMNS, tables["DIAGNOSES_ICD"]: CODE_COLUMNS,
                  tables["PROCEDURES_ICD"]: CODE_COLUMNS})
    splits = load_splits(args.splits, args.sets)
    code_lists = {"50": read_codes(args.splits / "top50_codes.txt") if "50" in args.sets else None,
                  "rare50": read_codes(args.splits / "rare50_codes.txt") if "rare50" in args.sets else None,
                  "full": None}
    prepare_outputs(args.out, [f"mimic3-{name}" for name in args.sets])
    keep = {hadm for per_split in splits.values() for rows in per_split.values() for hadm, _ in rows}

    log.info("reading discharge summaries of %d admissions from %s", len(keep), tables["NOTEEVENTS"])
    texts = read_discharge_summaries(tables["NOTEEVENTS"], keep)
    log.info("reading codes from %s and %s", tables["DIAGNOSES_ICD"], tables["PROCEDURES_ICD"])
    codes = read_admission_codes(tables["DIAGNOSES_ICD"], tables["PROCEDURES_ICD"], keep)

    built = {}
    for name in args.sets:
        if name == "clean":
            dotted = {hadm: [c for c, _ in pairs] for hadm, pairs in codes.items()}
            ids = {split: [h for h, _ in rows] for split, rows in splits[name].items()}
            built[f"mimic3-{name}"] = build_edin_set(f"mimic3-{name}", ids, texts, dotted, args.text, args.min_count)
        else:
            built[f"mimic3-{name}"] = build_set(name, splits[name], texts, codes, code_lists[name], args.text)
    summary = write_sets(args.out, built, WARNINGS)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    with user_errors(Path(sys.argv[0]).name):
        main()
