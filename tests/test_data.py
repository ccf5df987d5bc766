import json
import logging

import pytest

from cec.data import read_codes, read_notes, read_text_file, write_codes, write_notes
from cec.errors import DataError

NOTES = [
    {"id": "a", "text": "Fever and cough.", "labels": ["R50.9", "R05"]},
    {"id": "b", "text": "No complaints \u00e9t\u00e9.", "labels": []},
]


def test_roundtrip(tmp_path):
    path = tmp_path / "sub" / "notes.jsonl"
    write_notes(path, NOTES)
    assert read_notes(path) == NOTES
    assert "\u00e9t\u00e9" in path.read_text(encoding="utf-8")  # written as UTF-8, not \\u escapes
    assert not [p for p in path.parent.iterdir() if p.name != "notes.jsonl"]  # no temp file left


def test_extra_keys_kept_and_repeated_labels_dropped(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({"id": "x", "text": "t", "labels": ["A", "B", "A"], "lang": "en"}) + "\n\n")
    assert read_notes(path) == [{"id": "x", "text": "t", "labels": ["A", "B"], "lang": "en"}]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": "x", "labels": []}', "missing key 'text'"),
        ('{"id": 3, "text": "t", "labels": []}', "'id' must be"),
        ('{"id": "x", "text": "   ", "labels": []}', "'text' must be a non-empty string"),
        ('{"id": "x", "text": "t", "labels": "A"}', "'labels' must be"),
        ('{"id": "x", "text": "t", "labels": [1]}', "'labels' must be"),
        ('{"id": "a", "text": "t", "labels": []}', "duplicate note id 'a' \\(first on line 1\\)"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(NOTES[0]) + "\n" + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as e:
        read_notes(path)
    assert f"{path}:3:" in str(e.value)


def test_missing_notes_file(tmp_path):
    with pytest.raises(DataError, match="no such notes file"):
        read_notes(tmp_path / "nope.jsonl")


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id": "x", "text": "\xff", "labels": []}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: not valid UTF-8"):
        read_notes(path)


def test_notes_to_code_need_no_labels_and_keep_theirs(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"id": "a", "text": "fever"}\n\n{"id": "b", "text": "cough", "labels": "kept as it is"}\n')
    assert read_notes(path, dataset=False) == [{"id": "a", "text": "fever"},
                                               {"id": "b", "text": "cough", "labels": "kept as it is"}]
    with pytest.raises(DataError, match="n.jsonl:1: missing key 'labels'"):
        read_notes(path)
    for line, message in (('["a"]', "n.jsonl:1: expected a JSON object"), ('{"text": "x"}', "missing key 'id'"),
                          ('{"id": "a", "text": " "}', "'text' must be a non-empty string"),
                          ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}', "n.jsonl:2: duplicate note id 'a'")):
        path.write_text(line + "\n")
        with pytest.raises(DataError, match=message):
            read_notes(path, dataset=False)


def test_notes_to_code_replace_bad_utf8_with_a_warning_or_read_another_encoding_strictly(tmp_path, caplog):
    path = tmp_path / "n.jsonl"
    path.write_bytes('{"id": "a", "text": "ni\u00f1o", "labels": []}\r\n'.encode("utf-8")
                     + '{"id": "b", "text": "ni\u00f1a", "labels": []}\n'.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="cec.data"):
        notes = read_notes(path, dataset=False)
    assert [n["text"] for n in notes] == ["ni\u00f1o", "ni\ufffda"]
    assert f"{path}:2: not valid UTF-8" in caplog.text
    with pytest.raises(DataError, match=r"n\.jsonl:2: not valid UTF-8"):
        read_notes(path)
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes('{"id": "a", "text": "ni\u00f1o"}\n'.encode("utf-16"))
    assert read_notes(utf16, dataset=False, encoding="utf-16") == [{"id": "a", "text": "ni\u00f1o"}]
    with pytest.raises(DataError, match=r"u16\.jsonl: not valid ascii .*check --encoding"):
        read_notes(utf16, dataset=False, encoding="ascii")
    (tmp_path / "nul.jsonl").write_bytes(b'{"id": "a", "text": "x\x00"}\n')
    with pytest.raises(DataError, match=r"nul\.jsonl:1: binary data"):
        read_notes(tmp_path / "nul.jsonl", dataset=False)


def test_write_notes_validates(tmp_path):
    with pytest.raises(DataError, match="'text'"):
        write_notes(tmp_path / "n.jsonl", [{"id": "x", "text": "", "labels": []}])
    with pytest.raises(DataError, match="duplicate note id"):
        write_notes(tmp_path / "n.jsonl", [NOTES[0], NOTES[0]])
    assert not (tmp_path / "n.jsonl").exists()


def test_read_text_file_utf8_bom_and_newlines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffline one\r\nline two\rline three \u00f1".encode("utf-8"))
    assert read_text_file(path) == "line one\nline two\nline three \u00f1"


def test_read_text_file_latin1_replaced_with_warning(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ni\u00f1o con fiebre".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="cec.data"):
        text = read_text_file(path)
    assert text == "ni\ufffdo con fiebre"
    assert "not valid UTF-8" in caplog.text and str(path) in caplog.text


def test_read_text_file_refuses_binary(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(DataError, match="binary file"):
        read_text_file(path)
    with pytest.raises(DataError, match="no such file"):
        read_text_file(tmp_path / "missing.txt")


def test_codes_txt_and_tsv(tmp_path):
    write_codes(tmp_path / "codes.txt", ["401.9", "V58.61", "038.9"])
    assert read_codes(tmp_path / "codes.txt") == ["401.9", "V58.61", "038.9"]
    tsv = tmp_path / "codes.tsv"
    tsv.write_text("code\tdescription\nR52\tPain\nI10\tHypertension\n")
    assert read_codes(tsv) == ["R52", "I10"]
    (tmp_path / "dup.txt").write_text("A\n\nB\nA\n")
    with pytest.raises(DataError, match=r"dup.txt:4: duplicate code 'A' \(first on line 1\)"):
        read_codes(tmp_path / "dup.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty code list"):
        read_codes(tmp_path / "empty.txt")


def test_shared_code_lists(shared_dir):
    assert len(read_codes(shared_dir / "data/mimic3/top50_codes.txt")) == 50
    codes = read_codes(shared_dir / "data/codiesp/codiesp50_codes.tsv")
    assert len(codes) == 50 and codes[0] == "R52"
