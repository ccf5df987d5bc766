import re
import shutil
import subprocess

import pytest

from cec.coding.report import evidence_spans, render_report, sentence_spans, write_report

NOTE = ("Reason for admission: fever and swollen ankles.\n"
        "Blood pressure 172/98 mmHg on arrival; he takes enalapril.\n"
        "He smokes ten cigarettes a day. Hemoglobin 9.1 g/dL.")


def code(c, p, evidence, threshold=0.5, description=None):
    return {"code": c, "description": description or f"description of {c}", "probability": p,
            "predicted": p >= threshold,
            "evidence": [{"concept": t, "level": "leaf", "probability": q} for t, q in evidence]}


def doc(note=NOTE, codes=None):
    codes = codes if codes is not None else [
        code("I10", 0.9, [("high blood pressure", 0.95), ("antihypertensive medication", 0.3)]),
        code("F17.210", 0.8, [("cigarette smoking", 0.9)]),
        code("D64.9", 0.2, [("low hemoglobin", 0.9)]),
    ]
    return {"note": note, "code_system": "icd10cm", "threshold": 0.5, "codes": codes,
            "timing": {"prefix_tokens": 120, "questions": 40, "seconds": 1.5}}


def marks(page: str) -> list[tuple[str, str]]:
    """(title, text) of every <mark> of the page."""
    return re.findall(r'<mark style="[^"]*" title="([^"]*)">([^<]*)</mark>', page)


def test_sentences_stop_at_punctuation_and_newlines_only():
    spans = [NOTE[a:b] for a, b in sentence_spans(NOTE)]
    assert spans == ["Reason for admission: fever and swollen ankles.", "Blood pressure 172/98 mmHg on arrival;",
                     "he takes enalapril.", "He smokes ten cigarettes a day.", "Hemoglobin 9.1 g/dL."]


def test_evidence_found_by_bm25_with_stemming():
    found = evidence_spans(NOTE, ["high blood pressure", "cigarette smoking", "renal biopsy"])
    assert [NOTE[a:b] for a, b in found["high blood pressure"]] == ["Blood pressure 172/98 mmHg on arrival;"]
    assert [NOTE[a:b] for a, b in found["cigarette smoking"]] == ["He smokes ten cigarettes a day."]
    assert found["renal biopsy"] == []


def test_a_window_must_share_a_third_of_the_phrase():
    found = evidence_spans(NOTE, ["fever of unknown origin", "fever with rigors and night sweats", "left shift",
                                  "hemoglobin 7 g/dL", "hemoglobin", "mild anemia"])
    assert [NOTE[a:b] for a, b in found["fever of unknown origin"]] == [NOTE.split("\n")[0]]  # 1 of 3 words
    assert found["fever with rigors and night sweats"] == []  # 1 of 5 words: not enough
    assert found["left shift"] == found["mild anemia"] == []  # 'left' and 'mild' say nothing
    assert found["hemoglobin 7 g/dL"] == found["hemoglobin"] != []
    assert evidence_spans(NOTE, ["bilirubin 3 mg/dL"])["bilirubin 3 mg/dL"] == []  # numbers, units: not evidence


def test_badges_are_capped_where_many_codes_start():
    codes = [code(f"C{i}", 0.9, [("blood pressure", 0.9)]) for i in range(6)]
    page = render_report(doc(codes=codes))
    assert page.count('<span class="badge"') == 5 and 'title="C4 C5">+2</span>' in page


def test_predicted_codes_highlight_their_positive_concepts_only():
    page = render_report(doc(), concept_threshold=0.5)
    got = marks(page)
    assert [t for _, t in got] == ["Blood pressure 172/98 mmHg on arrival;", "He smokes ten cigarettes a day."]
    assert "I10" in got[0][0] and "high blood pressure" in got[0][0] and "lexical match (BM25)" in got[0][0]
    assert "F17.210" in got[1][0] and "cigarette smoking" in got[1][0]
    assert '<p class="lexical">Highlights: lexical matching (BM25)' in page  # the fallback says what it is
    # below the concept threshold: listed, not highlighted; a code under the threshold: no legend entry
    assert re.search(r'<li class="off">answered No: antihypertensive medication <span class="p">0.30</span></li>', page)
    assert "antihypertensive medication" not in "".join(t for t, _ in got)
    assert "description of D64.9" not in page.split("<details>")[0]
    assert "low hemoglobin" not in page
    assert page.count('class="code"') == 2


def with_spans(c, *sentences):
    """The code with model spans (cec.coding.attribution.add_evidence) on these sentences of NOTE, best first."""
    c["spans"] = [{"start": NOTE.index(t), "end": NOTE.index(t) + len(t), "text": t, "score": 2.0 - i}
                  for i, t in enumerate(sentences)]
    for ev in c["evidence"]:
        ev["sentence"] = c["spans"][0] if ev["probability"] >= 0.5 else None
    return c


def test_model_spans_are_highlighted_per_code_instead_of_lexical_matches():
    codes = [with_spans(code("I10", 0.9, [("high blood pressure", 0.95), ("antihypertensive medication", 0.3)]),
                        "he takes enalapril.", "Blood pressure 172/98 mmHg on arrival;"),
             with_spans(code("F17.210", 0.8, [("cigarette smoking", 0.9)]), "He smokes ten cigarettes a day."),
             code("D64.9", 0.2, [("low hemoglobin", 0.9)])]
    page = render_report(doc(codes=codes))
    got = marks(page)
    assert [t for _, t in got] == ["Blood pressure 172/98 mmHg on arrival;", "he takes enalapril.",
                                   "He smokes ten cigarettes a day."]  # the spans, not BM25's single match
    assert "I10" in got[1][0] and "model evidence, score 2.00" in got[1][0] and "F17.210" not in got[1][0]
    assert "F17.210" in got[2][0] and "lexical" not in page.split("<details>")[0].split("</style>")[1]
    # each Yes concept quotes its sentence
    assert "high blood pressure <span class=\"p\">0.95</span> <span class=\"q\">&ldquo;he takes enalapril.&rdquo;" in page


def test_a_code_without_spans_falls_back_to_lexical_and_says_so():
    codes = [with_spans(code("I10", 0.9, [("high blood pressure", 0.95)]), "he takes enalapril."),
             code("F17.210", 0.8, [("cigarette smoking", 0.9)])]
    page = render_report(doc(codes=codes))
    got = dict((t, title) for title, t in marks(page))
    assert "model evidence" in got["he takes enalapril."]
    assert "lexical match (BM25) of concept &#x27;cigarette smoking&#x27;" in got["He smokes ten cigarettes a day."]
    assert '<p class="lexical">Highlights of F17.210: lexical matching (BM25)' in page


def test_the_lexical_priors_words_are_listed_and_escaped():
    i10 = code("I10", 0.9, [("high blood pressure", 0.95)])
    i10["lexical_prior"] = {"logit": 2.1, "contribution": 0.84, "terms": [
        {"ngram": "enalapril", "contribution": 0.3}, {"ngram": "<b>mmhg", "contribution": 0.1}]}
    f17 = code("F17.210", 0.8, [("cigarette smoking", 0.9)])
    f17["lexical_prior"] = {"logit": -1.0, "contribution": -0.4, "terms": []}
    page = render_report(doc(codes=[i10, f17]))
    assert ("words in the note (lexical prior, +0.84 to the logit): &ldquo;enalapril&rdquo;, "
            "&ldquo;&lt;b&gt;mmhg&rdquo;") in page
    assert page.count("lexical prior") == 1  # a code whose prior pushed it down lists no words


def test_overlapping_codes_share_a_striped_highlight():
    codes = [code("I10", 0.9, [("blood pressure", 0.9)]), code("R03.0", 0.7, [("elevated pressure reading", 0.8)])]
    page = render_report(doc(codes=codes))
    (title, text), = marks(page)
    assert text == "Blood pressure 172/98 mmHg on arrival;"
    assert "I10" in title and "R03.0" in title
    assert "repeating-linear-gradient" in page


def test_everything_from_the_note_and_the_concepts_is_escaped():
    note = "Fever. <script>document.title='pwned'</script> & <img src=x onerror=alert(1)>\nCough \"dry\"."
    codes = [code("R05", 0.9, [("<b>cough</b>", 0.9), ("fever", 0.8)], description='Cough "<i>x</i>"'),
             code("<x>", 0.1, [("y", 0.1)])]
    page = render_report(doc(note=note, codes=codes), note_id="<note>")
    assert "<script" not in page and "<img" not in page and "<b>" not in page and "<i>" not in page
    assert "<x>" not in page and "<note>" not in page
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    assert "&lt;b&gt;cough&lt;/b&gt;" in page
    for title, _ in marks(page):  # attribute values cannot be closed by the concept text
        assert '"' not in title and "<" not in title
    assert not re.search(r"(src|href)=|https?://|url\(", page.replace("src=x", ""))  # self-contained


def test_no_predicted_code_still_shows_the_note(tmp_path):
    codes = [code("I10", 0.1, [("high blood pressure", 0.9)])]
    write_report(tmp_path / "r.html", doc(codes=codes))
    page = (tmp_path / "r.html").read_text()
    assert "No code reached the threshold 0.5" in page and "Blood pressure 172/98" in page
    assert not marks(page)
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp file left behind


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(not CHROMIUM, reason="no chromium to render the report in")
def test_chromium_shows_a_script_in_the_note_as_text(tmp_path):
    note = "Fever.\n<script>document.title='pwned';document.body.innerHTML='gone'</script>\nCough."
    path = tmp_path / "r.html"
    write_report(path, doc(note=note, codes=[code("R05", 0.9, [("cough", 0.9)])]))
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                          "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert "<title>CEC coding report</title>" in dom, out.stderr[-2000:]
    assert "pwned" in dom and "gone" in dom  # the script's text is on the page...
    assert "&lt;script&gt;document.title='pwned'" in dom  # ...as text, not as an element
    assert "<script" not in dom
    assert "Cough.</mark>" in dom
