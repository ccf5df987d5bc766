"""The evaluation's score cache: one score vector per note and system, in an append-only JSONL file, keyed by the
note (id + text hash) and by a fingerprint of what the system depends on."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ScoreCache:
    """Append-only JSONL of {"system", "key", "id", "text", "scores"}: one score vector per note and system.

    A torn last line (a run killed mid-write) is skipped; a later append starts on a fresh line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.index: dict[tuple, list[float]] = {}
        self.skipped = 0
        if self.path.is_file():
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                        self.index[(r["system"], r["key"], r["id"], r["text"])] = r["scores"]
                    except (ValueError, KeyError, TypeError):
                        self.skipped += 1
        self._file = None

    def get(self, system: str, key: str, note: dict) -> list[float] | None:
        return self.index.get((system, key, note["id"], text_hash(note["text"])))

    def put(self, system: str, key: str, note: dict, scores) -> list[float]:
        scores = [float(x) for x in (scores.tolist() if hasattr(scores, "tolist") else scores)]
        record = {"system": system, "key": key, "id": note["id"], "text": text_hash(note["text"]), "scores": scores}
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = False
            if self.path.is_file() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, 2)
                    torn = f.read(1) != b"\n"
            self._file = open(self.path, "a", encoding="utf-8")
            if torn:
                self._file.write("\n")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.index[(system, key, record["id"], record["text"])] = scores
        return scores

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def default_cache_path(json_path: str | Path) -> Path:
    json_path = Path(json_path)
    return json_path.with_name(json_path.stem + ".scores.jsonl")
