"""cec.io: append-only JSONL (a torn tail is skipped and never joins a record) and atomic folders (whole or not
at all)."""
import json
import os

import pytest

from cec.io import TMP_PREFIX, AppendJsonl, atomic_folder


def test_append_then_read_gives_the_records_in_order(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    assert AppendJsonl(path).read() == ([], 0)  # no file yet
    with AppendJsonl(path) as log:
        log.append({"step": 1, "text": "été"})
        log.append([1, 2])
    assert AppendJsonl(path).read() == ([{"step": 1, "text": "été"}, [1, 2]], 0)
    assert path.read_text(encoding="utf-8") == '{"step": 1, "text": "été"}\n[1, 2]\n'  # UTF-8, not \\u escapes


def test_a_torn_tail_is_skipped_and_the_next_record_starts_a_fresh_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "sco')  # killed mid-write
    log = AppendJsonl(path)
    assert log.read() == ([{"id": "a"}], 1)
    log.append({"id": "c"})
    log.close()
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b", "sco\n{"id": "c"}\n'
    assert AppendJsonl(path).read() == ([{"id": "a"}, {"id": "c"}], 1)
    log.append({"id": "d"})  # a closed writer opens again, after a whole last line: no blank line
    log.close()
    assert AppendJsonl(path).read() == ([{"id": "a"}, {"id": "c"}, {"id": "d"}], 1)
    assert b"\n\n" not in path.read_bytes()


def test_lines_that_are_not_json_or_not_utf8_are_skipped_blank_lines_ignored(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a": 1}\n\n\xff\xfe\n' + b"[" * 100_000 + b"\n" + b'{"a": 2}\n')
    assert AppendJsonl(path).read() == ([{"a": 1}, {"a": 2}], 2)


def test_rewrite_replaces_the_file_atomically_and_appends_go_on_after_it(tmp_path):
    path = tmp_path / "log.jsonl"
    log = AppendJsonl(path)
    for step in (1, 2, 3):
        log.append({"step": step})
    log.rewrite([{"step": 1}])
    log.append({"step": 2})
    log.close()
    assert AppendJsonl(path).read() == ([{"step": 1}, {"step": 2}], 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_each_record_is_one_write(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    log = AppendJsonl(path, fsync=True)
    log.append({"warm": True})  # opened
    writes, syncs = [], []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd) or real_fsync(fd))
    log.append({"id": "x", "text": "y" * 10_000})
    monkeypatch.undo()
    log.close()
    assert len(writes) == 1 and writes[0].endswith(b"\n") and json.loads(writes[0]) == {"id": "x", "text": "y" * 10_000}
    assert len(syncs) == 1  # fsync=True: on disk before append returns


def test_atomic_folder_builds_then_replaces_whole(tmp_path):
    target = tmp_path / "out" / "cache"
    with atomic_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(TMP_PREFIX + "cache-") and not target.exists()
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    mode = target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # as a plain mkdir makes it, not mkdtemp's 0700
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # the old folder replaced, not merged
    assert sorted(p.name for p in target.parent.iterdir()) == ["cache"]


def test_atomic_folder_on_error_leaves_the_old_folder_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "cache"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old"

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device (injected)", str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        with atomic_folder(tmp_path / "other") as tmp:
            (tmp / "a.txt").write_text("x")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_atomic_folder_keeps_a_folder_another_process_finished_first(tmp_path):
    target = tmp_path / "cache"
    with atomic_folder(target, keep_if=lambda: (target / "done").is_file()) as tmp:
        (tmp / "ours").write_text("ours")
        target.mkdir()
        (target / "done").write_text("theirs")  # the other process renamed its folder in meanwhile
    assert sorted(p.name for p in target.iterdir()) == ["done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
