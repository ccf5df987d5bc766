import json
import runpy
import subprocess
import sys
from pathlib import Path


from cec.coding.concepts import Concept, ConceptSet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "concept_coverage.py"
cov = runpy.run_path(str(SCRIPT))


def toy_set() -> ConceptSet:
    concepts = [Concept(0, "chest pain", "parent"), Concept(1, "troponin elevation", "leaf"),
                Concept(2, "kidney stones", "parent"), Concept(3, "ureteral colic", "leaf")]
    return ConceptSet("toy", "icd10cm", ["I21.9", "N20.0"],
                      {"I21.9": "Acute myocardial infarction, unspecified", "N20.0": "Calculus of kidney"},
                      {"I21.9": ("I21", "Acute myocardial infarction"),
                       "N20.0": ("N20", "Calculus of kidney and ureter")},
                      concepts, {"I21.9": [0], "N20.0": [2]}, {"I21.9": [1], "N20.0": [3]})


# Every sentence has 4 tokens after stop words, so each window (one sentence) has the average length and a phrase
# whose terms occur once in it scores exactly the sum of its IDFs: a normalised score of 1.
NOTES = [
    {"id": "a", "labels": ["I21.9"], "text": "Severe chest pain reported.\nVitals stable overall today.\n"
                                            "Family history mentions diabetes.\nMild elevation noted again."},
    {"id": "b", "labels": ["N20.0", "Z99.9"], "text": "Follow up visit routine.\nAppetite remains good still."},
    {"id": "c", "labels": ["N20.0"], "text": "Imaging showed kidney stones. Recommended fluids plus analgesia."},
    {"id": "d", "labels": ["Z00.0"], "text": "Routine examination was unremarkable. Nothing further noted today."},
]


def test_sentences_and_windows():
    text = "First one here. Second one (short). Third!\nFourth line\n\nFifth? sixth stays with fifth."
    assert cov["sentences"](text) == ["First one here.", "Second one (short).", "Third!", "Fourth line",
                                      "Fifth? sixth stays with fifth."]
    assert cov["windows"](text, 3, 1) == ["First one here. Second one (short). Third!",
                                          "Second one (short). Third! Fourth line",
                                          "Third! Fourth line Fifth? sixth stays with fifth."]
    # stride 2 over 5 sentences: starts 0 and 2, then one more window so the end is covered
    assert cov["windows"](text, 2, 2) == ["First one here. Second one (short).", "Third! Fourth line",
                                          "Fourth line Fifth? sixth stays with fifth."]
    assert cov["windows"]("Only one.", 3, 1) == ["Only one."]
    assert cov["windows"]("   ", 3, 1) == []


def test_tokenize():
    assert cov["tokenize"]("The kidney stones were NOT in the ureters; glass, pus, iris.") == [
        "kidney", "stone", "ureter", "glass", "pus", "iris"]


def test_coverage_counts_notes_and_codes():
    out = cov["coverage"](NOTES, toy_set(), window=1, stride=1, min_score=0.5)
    assert out["notes"] == 4 and out["notes_with_codes"] == 3  # note d has no code of the set
    assert out["covered_notes"] == 2 and out["coverage"] == round(2 / 3, 4)
    assert out["per_code"]["I21.9"] == {"notes": 1, "covered": 1, "coverage": 1.0}
    assert out["per_code"]["N20.0"] == {"notes": 2, "covered": 1, "coverage": 0.5}
    assert out["coverage_by_level"] == {"parent": round(2 / 3, 4), "leaf": 0.0}
    assert out["macro_code_coverage"] == 0.75


def test_normalised_score_threshold_is_exact():
    # "chest pain" occurs once in a window of average length: its normalised score is 1
    assert cov["coverage"](NOTES[:1] + NOTES[1:3], toy_set(), 1, 1, min_score=1.0 - 1e-9)["per_code"]["I21.9"][
        "covered"] == 1
    assert cov["coverage"](NOTES[:1] + NOTES[1:3], toy_set(), 1, 1, min_score=1.0 + 1e-6)["per_code"]["I21.9"][
        "covered"] == 0
    # "troponin elevation": the corpus never saw "troponin", which counts with the largest IDF, so the window with
    # "elevation" alone scores idf(elevation) / (idf(elevation) + max IDF) = 1.609 / 4.443 = 0.362 (8 windows)
    for min_score, covered in ((0.5, 0.0), (0.36, round(1 / 3, 4))):
        assert cov["coverage"](NOTES, toy_set(), 1, 1, min_score)["coverage_by_level"]["leaf"] == covered


def test_cli(tmp_path, capsys):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps(n) + "\n" for n in NOTES))
    cs = tmp_path / "toy.json"
    toy_set().save(cs)
    out = cov["main"](["--concepts", str(cs), "--notes", str(notes), "--window", "2", "--examples", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == out and out["settings"] == {"window": 2, "stride": 1, "min_score": 0.5}
    assert out["examples"][0]["note"] == "a" and out["examples"][0]["concept"] == "chest pain"
    notes.write_text(json.dumps({"id": "z", "text": "x", "labels": ["Q00"]}) + "\n")
    run = subprocess.run([sys.executable, str(SCRIPT), "--concepts", str(cs), "--notes", str(notes)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "no note has a label" in run.stderr and run.stderr.count("\n") == 1


def test_codiesp_coverage(shared_dir, tmp_path, capsys):
    """CodiEsp-D50 train, notes built from ../shared by scripts/prepare_codiesp.py."""
    src = tmp_path / "codiesp"
    src.mkdir()
    (src / "train").symlink_to(shared_dir / "data" / "codiesp" / "train")
    runpy.run_path(str(ROOT / "scripts" / "prepare_codiesp.py"))["main"](["--src", str(src), "--out", str(tmp_path)])
    capsys.readouterr()
    from cec.coding.concepts import load_concept_set
    from cec.data import read_notes

    cs = load_concept_set("codiesp-d50")
    assert (tmp_path / "codes.txt").read_text().split() == cs.codes  # the shipped set is CodiEsp-D50
    out = cov["coverage"](read_notes(tmp_path / "train.jsonl"), cs)
    assert out["notes_with_codes"] == 440  # NOTES.md: 440 of 500 train notes have a code of the 50
    assert 0.85 < out["coverage"] <= 1.0
