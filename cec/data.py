"""Note datasets on disk: notes JSONL, code lists, and raw text files.

Notes JSONL holds one object per line: {"id": str, "text": str, "labels": [code, ...]}. Extra keys are kept.
A code list is one code per line (.txt), or a TSV whose header row has a `code` column.

Text files are decoded as UTF-8 (a BOM is dropped, CRLF and CR become LF). A file that is not valid UTF-8 is
decoded with U+FFFD replacement characters and a warning is logged, so one stray byte in a corpus of thousands
does not stop a build. A file with NUL bytes is binary, not text, and is refused with DataError.

Notes JSONL read for training and evaluation must be UTF-8, as JSON requires: a line that is not is a DataError
naming the file and line (a BOM at the start is dropped), so a dataset is never trained or scored on silently
altered text. Notes read to be coded (read_notes(dataset=False), infer.py) need no labels, and a line that is not
UTF-8 is decoded with a warning instead, or the file is read strictly in another encoding.
"""
import json
import logging
from pathlib import Path

from cec.errors import DataError, json_error_text
from cec.io import atomic_write_text

log = logging.getLogger(__name__)


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None
    return decode_text(data, str(path), "file")


def decode_text(data: bytes, name: str, what: str = "data", encoding: str | None = None) -> str:
    """Bytes of a note as text: NUL bytes refused (a binary file), a BOM dropped, line ends made \\n. UTF-8 with
    undecodable bytes replaced by U+FFFD and a warning, or strictly `encoding` (a user's --encoding)."""
    if encoding is not None:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as e:
            raise DataError(f"{name}: not valid {encoding} (byte {e.start}); check --encoding") from None
        if "\x00" in text:
            raise DataError(f"{name}: binary {what} (contains NUL characters), expected text")
        text = text.lstrip("\ufeff")
    else:
        if b"\x00" in data:
            raise DataError(f"{name}: binary {what} (contains NUL bytes), expected text")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            log.warning("%s: not valid UTF-8 (byte %d); undecodable bytes replaced with U+FFFD", name, e.start)
            text = data.decode("utf-8-sig", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _validate_note(obj, where: str, labels: bool = True) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "text", "labels") if labels else ("id", "text"):
        if key not in obj:
            raise DataError(f"{where}: missing key {key!r}")
    if not isinstance(obj["id"], str) or not obj["id"]:
        raise DataError(f"{where}: 'id' must be a non-empty string")
    if not isinstance(obj["text"], str) or not obj["text"].strip():
        raise DataError(f"{where}: 'text' must be a non-empty string (note {obj['id']!r})")
    if labels:
        codes = obj["labels"]
        if not isinstance(codes, list) or not all(isinstance(c, str) and c for c in codes):
            raise DataError(f"{where}: 'labels' must be a list of non-empty strings (note {obj['id']!r})")
        obj["labels"] = list(dict.fromkeys(codes))  # drop repeats, keep order
    return obj


def parse_json_line(line: str, where: str):
    """One JSON value; anything json.loads refuses (syntax, a 5,000-digit number, nesting deeper than the
    interpreter's recursion limit) is a DataError naming `where`."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({json_error_text(e, 'column')})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{where}: invalid JSON ({type(e).__name__}: {str(e)[:100]})") from None


def read_notes(path: str | Path, *, dataset: bool = True, encoding: str | None = None) -> list[dict]:
    """The notes of a JSONL file, in file order (blank lines skipped); each error names the file and line.

    dataset=True (training, evaluation): every note has "labels", a list of codes (repeats dropped), and the file
    must be UTF-8. dataset=False (notes to code): "labels" is optional and kept as it is; bytes that are not UTF-8
    are replaced with a warning. `encoding` reads the whole file strictly in that codec instead (UTF-16 and the
    like cannot be split into lines before decoding)."""
    path = Path(path)
    notes, seen = [], {}
    for lineno, line in _lines(path, strict=dataset, encoding=encoding):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        note = _validate_note(parse_json_line(line, where), where, labels=dataset)
        if note["id"] in seen:
            raise DataError(f"{where}: duplicate note id {note['id']!r} (first on line {seen[note['id']]})")
        seen[note["id"]] = lineno
        notes.append(note)
    return notes


def _lines(path: Path, strict: bool, encoding: str | None):
    """(line number, text) of a notes file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such notes file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a notes JSONL file") from None
    with f:
        if encoding is not None:
            yield from enumerate(decode_text(f.read(), str(path), encoding=encoding).split("\n"), start=1)
            return
        for lineno, raw in enumerate(f, start=1):
            if not strict:
                yield lineno, decode_text(raw, f"{path}:{lineno}")
                continue
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # an editor's BOM is dropped
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1}); notes files must be "
                                "UTF-8") from None


def write_notes(path: str | Path, notes: list[dict]) -> None:
    lines, seen = [], set()
    for i, note in enumerate(notes):
        note = _validate_note(dict(note), f"{path}: note {i}")
        if note["id"] in seen:
            raise DataError(f"{path}: note {i}: duplicate note id {note['id']!r}")
        seen.add(note["id"])
        lines.append(json.dumps(note, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))


def read_codes(path: str | Path) -> list[str]:
    """Codes in file order: a .txt with one code per line, or a TSV with a header row naming a `code` column."""
    path = Path(path)
    lines = [(n, ln) for n, ln in enumerate(read_text_file(path).split("\n"), start=1) if ln.strip()]
    if not lines:
        raise DataError(f"{path}: empty code list")
    column = 0
    header = [h.strip().lower() for h in lines[0][1].split("\t")]
    if "code" in header:
        column, lines = header.index("code"), lines[1:]
    codes, seen = [], {}
    for lineno, line in lines:
        fields = line.split("\t")
        code = fields[column].strip() if column < len(fields) else ""
        if not code:
            raise DataError(f"{path}:{lineno}: empty code")
        if code in seen:
            raise DataError(f"{path}:{lineno}: duplicate code {code!r} (first on line {seen[code]})")
        seen[code] = lineno
        codes.append(code)
    if not codes:
        raise DataError(f"{path}: empty code list")
    return codes


def write_codes(path: str | Path, codes: list[str]) -> None:
    if len(set(codes)) != len(codes):
        raise DataError(f"{path}: duplicate codes in code list")
    atomic_write_text(path, "".join(c + "\n" for c in codes))
