"""Property-based tests (hypothesis, bounded example counts): the concept-reply parser, the notes JSONL reader,
the ICD code normalisers and the tokenizer round trip never fail with anything but a CECError, and give back
what they were given."""
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from cec.errors import CECError, DataError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)  # any text a str can hold


# ---------------------------------------------------------------------------------------------------------
# cec.coding.concepts.parse_reply
# ---------------------------------------------------------------------------------------------------------
ICD10 = st.from_regex(r"[A-Z][0-9]{2}(\.[0-9A-Z]{1,3})?", fullmatch=True)
ICD9 = st.from_regex(r"(V[0-9]{2}|E[0-9]{3}|[0-9]{3})(\.[0-9]{1,2})?|[0-9]{2}\.[0-9]{1,2}", fullmatch=True)
REPLY_PIECES = ["[", "]", "{", "}", "'", '"', ",", ":", "```", "```json\n", "\n", " ", "401.9", "'401.9'",
                '"96.71"', "concepts", "'code'", "\\", "None", "1e999", "[[[[", "}}}}", "patient's", "(", ")"]
reply_text = st.lists(st.sampled_from(REPLY_PIECES) | TEXT, max_size=40).map("".join)


@FUZZ
@given(reply=reply_text | TEXT, codes=st.lists(ICD9 | ICD10, max_size=6, unique=True))
@example(reply="[" * 3000, codes=["401.9"])
@example(reply="{'401.9': " + "[" * 2000 + "]" * 2000 + "}", codes=["401.9"])
@example(reply="[{'401.9': ['a']}" + "x" * 5000, codes=["401.9"])
def test_parse_reply_returns_phrases_of_requested_codes_or_a_cec_error(reply, codes):
    from cec.coding.concepts import parse_reply

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = parse_reply(reply, codes)
    except CECError:
        return
    assert not caught, [str(w.message) for w in caught]  # e.g. '\d' in a reply: no SyntaxWarning on the console
    assert isinstance(found, dict) and set(found) <= set(codes)
    for phrases in found.values():
        assert phrases and all(isinstance(p, str) and p == p.strip() and p for p in phrases)
        assert len(set(phrases)) == len(phrases)


phrase = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30).map(
    str.strip).filter(bool)


def test_parse_reply_reads_python_escapes_without_a_warning():
    from cec.coding.concepts import parse_reply

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert parse_reply("[{'401.9': ['glucose \\d+ mg', 'C\\+\\+']}]", ["401.9"]) == {
            "401.9": ["glucose \\d+ mg", "C\\+\\+"]}
    assert not caught, [str(w.message) for w in caught]


@FUZZ
@given(concepts=st.dictionaries(ICD9 | ICD10, st.lists(phrase, min_size=1, max_size=4, unique=True), min_size=1,
                                max_size=6),
       style=st.sampled_from(["json", "python"]), prose=st.booleans(), fence=st.booleans())
def test_parse_reply_round_trips_the_papers_reply_format(concepts, style, prose, fence):
    """[{'code': [phrases]}, ...] as JSON or a Python literal, bare, in a code fence or amid prose, gives back
    exactly the phrases of each code."""
    from cec.coding.concepts import parse_reply

    items = [{code: phrases} for code, phrases in concepts.items()]
    body = json.dumps(items, ensure_ascii=False) if style == "json" else repr(items)
    if fence:
        body = f"```{style}\n{body}\n```"
    if prose:
        body = f"Here are the concepts for each code:\n{body}\nLet me know if you need more."
    assert parse_reply(body, list(concepts)) == concepts


# ---------------------------------------------------------------------------------------------------------
# cec.data.read_notes
# ---------------------------------------------------------------------------------------------------------
LINE_PIECES = [b'{"id": "a", "text": "fever", "labels": []}', b'{"id": "b", "text": "x", "labels": ["A1"]}', b"\n",
               b"\r\n", b"{", b"}", b'"id"', b'"text"', b'"labels"', b":", b",", b"[", b"]", b"null", b"1" * 5000,
               b"[" * 3000, b"\xef\xbb\xbf", b"\xff\xfe", b"\xe9", b"\x00", b"NaN", b'"\\ud800"', b" "]
jsonl_bytes = st.lists(st.sampled_from(LINE_PIECES) | st.binary(max_size=20), max_size=30).map(b"".join)


@FUZZ
@given(data=jsonl_bytes | st.binary(max_size=300))
@example(data=b'{"id": "a", "text": "t", "labels": []}\n' + b"[" * 100_000 + b"\n")
@example(data=b'{"id": "a", "text": "t", "labels": [' + b"9" * 5000 + b"]}\n")
def test_read_notes_returns_notes_or_a_data_error_naming_file_and_line(tmp_path_factory, data):
    from cec.data import read_notes

    path = tmp_path_factory.mktemp("jsonl") / "notes.jsonl"
    path.write_bytes(data)
    try:
        notes = read_notes(path)
    except DataError as e:
        assert re.match(rf"{re.escape(str(path))}:\d+: \S", str(e)), str(e)
        assert "\n" not in str(e)
        return
    for note in notes:
        assert isinstance(note["id"], str) and note["id"] and note["text"].strip()
        assert all(isinstance(c, str) and c for c in note["labels"])
    assert len({n["id"] for n in notes}) == len(notes)


note_strategy = st.fixed_dictionaries({
    "id": st.text(min_size=1, max_size=10).filter(lambda s: "\x00" not in s),
    "text": TEXT.filter(lambda s: s.strip()),
    "labels": st.lists(st.text(min_size=1, max_size=6), max_size=4, unique=True)})


@FUZZ
@given(notes=st.lists(note_strategy, max_size=5, unique_by=lambda n: n["id"]))
def test_written_notes_read_back_unchanged(tmp_path_factory, notes):
    from cec.data import read_notes, write_notes

    assume(all("\x00" not in n["id"] for n in notes))
    path = tmp_path_factory.mktemp("roundtrip") / "notes.jsonl"
    write_notes(path, notes)
    assert read_notes(path) == notes


# ---------------------------------------------------------------------------------------------------------
# cec.coding.icd normalisers
# ---------------------------------------------------------------------------------------------------------
code_like = (st.from_regex(r"\s?[VvEe]?[0-9]{1,5}(\.[0-9]{0,3})?\s?", fullmatch=True)
             | st.from_regex(r"\s?[A-Za-z][0-9][0-9A-Za-z](\.?[0-9A-Za-z]{1,4})?\s?", fullmatch=True) | TEXT)


@FUZZ
@given(code=code_like, kind=st.sampled_from([None, "dx", "proc"]))
def test_icd9_normalize_is_idempotent_and_fails_only_with_a_cec_error(code, kind):
    from cec.coding.icd import ICD9CM

    try:
        once = ICD9CM.normalize(code, kind)
    except CECError:
        return
    assert ICD9CM.normalize(once, kind) == once
    assert once == once.strip() and once == once.upper()


@FUZZ
@given(code=code_like)
def test_icd10_normalize_is_idempotent_and_fails_only_with_a_cec_error(code):
    from cec.coding.icd import ICD10CM

    try:
        once = ICD10CM.normalize(code)
    except CECError:
        return
    assert ICD10CM.normalize(once) == once
    assert once == once.strip() and once == once.upper()


# ---------------------------------------------------------------------------------------------------------
# Tokenizer round trips
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_level():
    import soak_batch

    return soak_batch.tiny_tokenizer()


@FUZZ
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
       | st.lists(st.sampled_from(["<bos>", "<eos>", "<pad>", " ", "\n", "\r\n", "\t", "yes", " No", "é", "🩺",
                                   "\u200b", "\x00", "\ufeff"]) | TEXT, max_size=20).map("".join))
def test_byte_level_tokenizer_round_trips_any_text(byte_level, text):
    assert byte_level.decode(byte_level.encode(text, add_bos=False)) == text


GEMMA = Path.home() / ".cache" / "cec" / "gemma3-270m"


@pytest.fixture(scope="module")
def gemma():
    if not (GEMMA / "tokenizer.json").is_file():
        pytest.skip(f"no converted Gemma 3 270M at {GEMMA} (run infer.py once to build it)")
    from cec.engine.tokenizer import Tokenizer

    return Tokenizer.from_folder(GEMMA)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
                    max_size=200)
       | st.lists(st.sampled_from(["<bos>", "<eos>", "<start_of_turn>", "  ", "\n\n", "\t", " Yes", "No", "é",
                                   "🩺", "\u200b", "\x00", "\ufeff", "mg/dL", "Na+ 135"]) | TEXT, max_size=20)
       .map("".join).filter(lambda s: "\u2581" not in s))
def test_gemma_tokenizer_round_trips_any_text_without_the_metaspace_character(gemma, text):
    """SentencePiece spells a space as U+2581, so a literal U+2581 comes back as a space (as in transformers);
    any other text comes back exactly."""
    assert gemma.decode(gemma.encode(text, add_bos=False)) == text
