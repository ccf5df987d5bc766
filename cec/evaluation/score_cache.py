"""The evaluation's score cache: one score vector per note and system, in an append-only JSONL file, keyed by the
note (id + text hash) and by a fingerprint of what the system depends on."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cec.io import AppendJsonl


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ScoreCache:
    """Append-only JSONL of {"system", "key", "id", "text", "scores"}: one score vector per note and system.

    A torn last line (a run killed mid-write) is skipped; a later append starts on a fresh line (cec.io.AppendJsonl)."""

    def __init__(self, path: str | Path):
        self.file = AppendJsonl(path)
        self.path = self.file.path
        self.index: dict[tuple, list[float]] = {}
        records, self.skipped = self.file.read()
        for r in records:
            try:
                self.index[(r["system"], r["key"], r["id"], r["text"])] = r["scores"]
            except (KeyError, TypeError):
                self.skipped += 1

    def get(self, system: str, key: str, note: dict) -> list[float] | None:
        return self.index.get((system, key, note["id"], text_hash(note["text"])))

    def put(self, system: str, key: str, note: dict, scores) -> list[float]:
        scores = [float(x) for x in (scores.tolist() if hasattr(scores, "tolist") else scores)]
        record = {"system": system, "key": key, "id": note["id"], "text": text_hash(note["text"]), "scores": scores}
        self.file.append(record)
        self.index[(system, key, record["id"], record["text"])] = scores
        return scores

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def default_cache_path(json_path: str | Path) -> Path:
    json_path = Path(json_path)
    return json_path.with_name(json_path.stem + ".scores.jsonl")
