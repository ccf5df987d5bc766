"""Atomic writes: a temp file in the same folder, fsync, then rename; a crash never leaves half a file."""
import json
import os
import tempfile
from pathlib import Path

from cec.errors import DataError


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
