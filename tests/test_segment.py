import pytest

from cec.coding.segment import (
    DEFAULT_TITLES,
    df_iapf,
    learn_titles,
    segment_note,
    split_sections,
    title_candidates,
    truncate,
)


def count_words(text: str) -> int:
    return len(text.split())


def filler(word: str, n: int) -> str:
    return " ".join(f"{word}{i}" for i in range(n))


# Invented notes in the shape of a discharge summary (no real patient text).
def make_note(i: int, hpi_words=30, course_words=60) -> str:
    return (
        f"Admission Date:  2100-01-{i:02d}\n"
        "Service: MEDICINE\n"
        "Chief Complaint:\nshortness of breath\n"
        f"History of Present Illness:\n{filler('hpi', hpi_words)}\n"
        "Physical Exam:\nBP: 120/80 HR: 80\nBP: 118/76 on repeat\n"
        f"Past Medical History:\n{filler('pmh', 10)}\n"
        f"Brief Hospital Course:\n{filler('course', course_words)}\n"
        f"Discharge Medications:\n{filler('med', 20)}\n"
        "Discharge Diagnosis:\nzorbic fever\n"
        f"Discharge Instructions:\n{filler('instr', 40)}\n"
    )


def test_title_candidates():
    text = "Chief Complaint:\nx\n  History of Present Illness: y\nnot a title here\n1. CHF: z\nBP: 1\n"
    got = [p for p, _ in title_candidates(text)]
    assert got == ["chief complaint", "history of present illness", "bp"]
    assert title_candidates("a b c d e f g h: x") == []  # more than max_words words


def test_df_iapf_ranks_headings_above_repeated_fields():
    notes = [make_note(i) for i in range(1, 11)]
    notes[0] += "Note: see the past medical history above\n"  # 'note' is rare, and the phrase repeats once
    scores = {s.phrase: s for s in df_iapf(notes)}
    assert scores["history of present illness"].df == 10
    assert scores["history of present illness"].apf == 1.0
    assert scores["history of present illness"].score == pytest.approx(1.0)
    assert scores["bp"].apf == 2.0 and scores["bp"].score == pytest.approx(0.5)  # repeats inside each note
    assert scores["note"].df == 1 and scores["note"].score == pytest.approx(0.1)
    assert scores["past medical history"].apf == pytest.approx(11 / 10)
    titles = learn_titles(notes, min_df=0.5)
    assert "brief hospital course" in titles and "note" not in titles
    assert titles.index("discharge diagnosis") < titles.index("bp")
    assert learn_titles(notes, min_df=0.5) == titles  # deterministic


def test_split_sections_covers_text():
    note = make_note(3)
    sections = split_sections(note)
    assert "".join(note[s.start:s.end] for s in sections) == note
    assert [s.title for s in sections][:4] == ["admission date", "service", "chief complaint",
                                               "history of present illness"]
    assert "bp" not in [s.title for s in sections]  # field labels stay inside their section
    learned = split_sections(note, titles=["brief hospital course"])
    assert [s.title for s in learned] == [None, "brief hospital course"]


def test_short_note_unchanged():
    note = make_note(1)
    assert segment_note(note, 10_000, count_words) == note


def test_segment_keeps_priority_sections_in_note_order():
    note = make_note(2, hpi_words=30, course_words=300)
    total = count_words(note)
    budget = 120
    assert total > budget
    out = segment_note(note, budget, count_words)
    assert count_words(out) <= budget
    assert "zorbic fever" in out and "shortness of breath" in out and "hpi29" in out and "pmh9" in out
    assert "instr0" not in out and "med0" not in out
    # the hospital course does not fit whole: its head fills the budget
    assert "course0" in out and "course299" not in out
    assert count_words(out) >= budget - 1
    # note order is kept: the diagnosis (last in the note) comes last
    assert out.index("History of Present Illness") < out.index("Brief Hospital Course") < out.index("zorbic")
    assert segment_note(note, budget, count_words) == out  # deterministic


def test_segment_fills_with_other_sections_when_room():
    note = make_note(4, hpi_words=5, course_words=5)
    budget = count_words(note) - 5  # everything but a few words fits
    out = segment_note(note, budget, count_words)
    assert count_words(out) <= budget
    assert "med19" in out  # an unprioritised section that fits is kept


def test_segment_falls_back_to_truncation():
    text = filler("w", 500)  # no section titles at all
    out = segment_note(text, 50, count_words)
    assert out == filler("w", 50)
    assert truncate(text, 50, count_words) == out


def test_segment_respects_a_char_budget():
    # A different tokenizer (characters) gives a different cut, always within budget.
    note = make_note(5, course_words=200)
    out = segment_note(note, 400, len)
    assert len(out) <= 400 and "zorbic fever" in out


def test_truncate_single_long_word():
    assert truncate("x" * 100, 10, len) == "x" * 10


def test_invalid_budget():
    with pytest.raises(ValueError):
        segment_note("abc", 0, len)


def test_default_titles_are_normalised():
    assert all(t == " ".join(t.lower().split()) for t in DEFAULT_TITLES)
