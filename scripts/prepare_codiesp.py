"""Build CodiEsp-D notes JSONL from the official CodiEsp release (CLEF eHealth 2020, CC BY 4.0).

    python scripts/prepare_codiesp.py --src ../shared/data/codiesp --out runs/codiesp

SRC holds train/, dev/ and test/ as released: {split}/text_files_en/*.txt (English machine translation),
{split}/text_files/*.txt (Spanish originals, --lang es) and {split}/{split}D.tsv (article id <TAB> ICD-10-CM code,
lower case). A split folder that is absent is skipped. Writes OUT/{split}.jsonl (one note per text file, id =
file name without .txt, labels = its D codes inside the code set, upper-cased, in code-set order; notes without
such a code stay with empty labels) and OUT/codes.txt.

The code set is --codes FILE if given, else the --top most frequent D codes of train (counted as notes per code;
ties keep their first appearance in trainD.tsv, as collections.Counter.most_common does).
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from cec.cli import user_errors
from cec.data import read_codes, read_text_file, write_codes, write_notes
from cec.errors import DataError

SPLITS = ("train", "dev", "test")
TEXT_DIRS = {"en": "text_files_en", "es": "text_files"}


def read_d_codes(path: Path) -> list[tuple[str, str]]:
    """(article id, upper-cased code) pairs of a {split}D.tsv, in file order, repeats dropped."""
    if not path.is_file():
        raise DataError(f"{path}: missing (each split folder needs its D codes file)")
    pairs = []
    for lineno, line in enumerate(read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise DataError(f"{path}:{lineno}: expected 'article id<TAB>code', got {line[:80]!r}")
        pairs.append((fields[0].strip(), fields[1].strip().upper()))
    return list(dict.fromkeys(pairs))


def top_codes(pairs: list[tuple[str, str]], n: int) -> list[str]:
    counts = Counter(code for _, code in pairs)
    return [code for code, _ in counts.most_common(n)]


def build_split(split_dir: Path, split: str, lang: str, codes: list[str]) -> list[dict]:
    text_dir = split_dir / TEXT_DIRS[lang]
    if not text_dir.is_dir():
        raise DataError(f"{text_dir}: missing (expected the {lang} text files of {split})")
    files = sorted(text_dir.glob("*.txt"))
    if not files:
        raise DataError(f"{text_dir}: no .txt files")
    code_rank = {c: i for i, c in enumerate(codes)}
    labels: dict[str, list[str]] = {f.stem: [] for f in files}
    for doc, code in read_d_codes(split_dir / f"{split}D.tsv"):
        if doc not in labels:
            raise DataError(f"{split_dir / f'{split}D.tsv'}: article {doc!r} has no text file in {text_dir}")
        if code in code_rank:
            labels[doc].append(code)
    notes = []
    for f in tqdm(files, desc=f"{split} ({lang})", unit="note", leave=False):
        text = read_text_file(f).strip()
        if not text:
            raise DataError(f"{f}: empty text file")
        notes.append({"id": f.stem, "text": text, "labels": sorted(labels[f.stem], key=code_rank.__getitem__)})
    return notes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, type=Path, help="folder with train/, dev/, test/ of the release")
    parser.add_argument("--out", required=True, type=Path, help="output folder for {split}.jsonl and codes.txt")
    parser.add_argument("--lang", choices=sorted(TEXT_DIRS), default="en", help="en: text_files_en, es: text_files")
    parser.add_argument("--codes", type=Path, help="code set file (.txt, or .tsv with a 'code' column)")
    parser.add_argument("--top", type=int, default=50, help="size of the code set taken from train (default 50)")
    args = parser.parse_args(argv)

    if not args.src.is_dir():
        raise DataError(f"{args.src}: no such folder")
    splits = [s for s in SPLITS if (args.src / s).is_dir()]
    if not splits:
        raise DataError(f"{args.src}: none of the split folders {', '.join(SPLITS)} found")
    if args.codes:
        codes = list(dict.fromkeys(c.upper() for c in read_codes(args.codes)))
    else:
        if "train" not in splits:
            raise DataError(f"{args.src}: no train/ to take the top {args.top} codes from; give --codes")
        if args.top < 1:
            raise DataError(f"--top must be at least 1, got {args.top}")
        codes = top_codes(read_d_codes(args.src / "train" / "trainD.tsv"), args.top)

    summary = {"codes": len(codes), "splits": {}}
    write_codes(args.out / "codes.txt", codes)
    for split in splits:
        notes = build_split(args.src / split, split, args.lang, codes)
        write_notes(args.out / f"{split}.jsonl", notes)
        summary["splits"][split] = {
            "notes": len(notes),
            "notes_with_labels": sum(bool(n["labels"]) for n in notes),
            "positives": sum(len(n["labels"]) for n in notes),
            "codes_seen": len({c for n in notes for c in n["labels"]}),
        }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    with user_errors(Path(sys.argv[0]).name):
        main()
