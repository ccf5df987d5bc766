"""Files written whole or not at all: atomic files and folders (built under a temporary name, then renamed), and
append-only JSONL whose lines a crash can tear only at the end."""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cec.errors import DataError

TMP_PREFIX = ".tmp-"  # atomic_folder's temporary folders: .tmp-NAME-XXXXXXXX beside NAME


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (tmp, None) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None  # name the user's file, not our temp file
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextmanager
def atomic_folder(path: str | Path, keep_if=None):
    """Build a folder in the yielded temporary folder beside `path`; when the block ends it is renamed to `path`
    whole (an older `path` is replaced). On an error the temporary folder is removed and `path` is left as it was;
    a process killed meanwhile leaves only a TMP_PREFIX folder. keep_if(), checked at the end: when it holds
    (another process built the same folder first), the existing `path` is kept and ours dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the mode a plain mkdir would
        yield tmp
        if keep_if is not None and keep_if():
            shutil.rmtree(tmp)
            return
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class AppendJsonl:
    """An append-only JSONL file. Each record is one line written by a single os.write, so a process killed
    mid-write tears at most the last line; read() skips lines that do not parse, and the first append() after
    a torn tail starts a fresh line, so the torn bytes stay a line of their own and never join a record.
    fsync=True: each line is on disk before append() returns (else only at flush() or close())."""

    def __init__(self, path: str | Path, fsync: bool = False):
        self.path, self.fsync = Path(path), fsync
        self._fd: int | None = None

    def read(self) -> tuple[list, int]:
        """(the records in file order, how many non-blank lines did not parse); ([], 0) for a missing file."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        records, skipped = [], 0
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except (ValueError, RecursionError):  # a torn line (ValueError includes bad UTF-8)
                skipped += 1
        return records, skipped

    def append(self, record) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                os.write(self._fd, b"\n")  # after a torn tail
        data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data):]
        if self.fsync:
            os.fsync(self._fd)

    def rewrite(self, records) -> None:
        """Replace the whole file with these records, atomically (e.g. to drop lines a resumed run redoes)."""
        self.close()
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def flush(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "AppendJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prepare_output(path: str | Path) -> Path:
    """Create the folder of an output file up front, so an output that cannot be written fails before the work,
    not after it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file to write")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise DataError(f"cannot write {path}: {blocker} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.filename}: {e.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise DataError(f"cannot write {path}: its folder is not writable")
    try:  # what access() misses: a read-only file system, or root on a folder it may not write
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror}") from None
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (links and relative paths resolved); False when either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()
