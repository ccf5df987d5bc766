"""How often a note's text carries evidence for the concepts of its true codes (paper App. D).

    python scripts/concept_coverage.py --concepts codiesp-d50 --notes runs/codiesp/train.jsonl runs/codiesp/dev.jsonl

Each note is cut into overlapping windows of --window sentences (stride --stride). All windows of all notes form
one BM25 corpus (rank-bm25's BM25Okapi; lower-cased word tokens, English stop words dropped, plural -s folded).
A concept phrase matches a window when its BM25 score, divided by the sum of its terms' IDFs (terms absent from
the corpus count with the largest IDF), reaches --min-score: 1.0 is about every term of the phrase once in a
window of average length, 0.5 about half of the phrase's IDF mass. A note is covered when one of its windows
matches a concept of one of its true codes (labels outside the concept set are ignored, notes without such labels
are left out). Prints JSON: the share of covered notes, the same by concept level, and per code.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

from tqdm import tqdm

from cec.cli import user_errors
from cec.coding.concepts import load_concept_set
from cec.data import read_notes
from cec.errors import DataError

STOP_WORDS = frozenset("""
a an and are as at be been but by for from had has have he her his in into is it its no nor not of on or our she
so than that the their them then there these they this those to was were which while who will with without
""".split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
_WORD = re.compile(r"[a-z0-9]+")


def sentences(text: str) -> list[str]:
    out = []
    for line in text.split("\n"):
        out += [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]
    return out


def windows(text: str, size: int = 3, stride: int = 1) -> list[str]:
    """Overlapping windows of `size` sentences, `stride` apart; the last window reaches the note's end."""
    sents = sentences(text)
    if len(sents) <= size:
        return [" ".join(sents)] if sents else []
    starts = list(range(0, len(sents) - size + 1, stride))
    if starts[-1] + size < len(sents):
        starts.append(len(sents) - size)
    return [" ".join(sents[s:s + size]) for s in starts]


def _fold(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    return [_fold(w) for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


def coverage(notes: list[dict], concept_set, window: int = 3, stride: int = 1, min_score: float = 0.5,
             examples: int = 0) -> dict:
    from rank_bm25 import BM25Okapi

    codes = set(concept_set.codes)
    labelled = [n for n in notes if any(c in codes for c in n["labels"])]
    if not labelled:
        raise DataError(f"no note has a label of concept set {concept_set.name!r} "
                        f"(first labels seen: {[c for n in notes[:3] for c in n['labels']][:5]})")
    note_windows, corpus = [], []
    for note in labelled:
        wins = windows(note["text"], window, stride)
        note_windows.append(list(range(len(corpus), len(corpus) + len(wins))))
        corpus += wins
    bm25 = BM25Okapi([tokenize(w) or ["\0"] for w in corpus])
    oov_idf = math.log((len(corpus) + 0.5) / 0.5)

    def idf(term):
        return bm25.idf[term] if term in bm25.idf else oov_idf

    # which windows each concept matches, asked only of the notes whose codes own the concept
    notes_of_code = {c: [i for i, n in enumerate(labelled) if c in n["labels"]] for c in concept_set.codes}
    matched = {}  # (note index, concept id) -> (score, window id)
    for code in tqdm(concept_set.codes, desc="codes", unit="code"):
        docs = [w for i in notes_of_code[code] for w in note_windows[i]]
        if not docs:
            continue
        owner = {w: i for i in notes_of_code[code] for w in note_windows[i]}
        for concept in concept_set.concepts_of(code):
            terms = list(dict.fromkeys(tokenize(concept.text)))
            if not terms:
                continue
            scale = sum(idf(t) for t in terms)
            scores = bm25.get_batch_scores(terms, docs)
            for w, s in zip(docs, scores):
                s /= scale
                key = (owner[w], concept.id)
                if s >= min_score and s > matched.get(key, (0.0, -1))[0]:
                    matched[key] = (s, w)

    def covered(i: int, note_codes, level=None) -> bool:
        return any((i, c.id) in matched for code in note_codes for c in concept_set.concepts_of(code, level))

    per_code, covered_notes, by_level = {}, 0, {"parent": 0, "leaf": 0}
    for code in concept_set.codes:
        idx = notes_of_code[code]
        hit = sum(covered(i, [code]) for i in idx)
        per_code[code] = {"notes": len(idx), "covered": hit, "coverage": round(hit / len(idx), 4) if idx else None}
    shown = []
    for i, note in enumerate(labelled):
        own = [c for c in note["labels"] if c in codes]
        if covered(i, own):
            covered_notes += 1
            if len(shown) < examples:
                (score, w), cid = max((matched[k], k[1]) for k in matched if k[0] == i)
                shown.append({"note": note["id"], "concept": concept_set.concepts[cid].text,
                              "score": round(score, 3), "window": corpus[w]})
        for level in by_level:
            by_level[level] += covered(i, own, level)
    with_notes = [v["coverage"] for v in per_code.values() if v["notes"]]
    out = {
        "concept_set": concept_set.name, "notes": len(notes), "notes_with_codes": len(labelled),
        "windows": len(corpus), "covered_notes": covered_notes,
        "coverage": round(covered_notes / len(labelled), 4),
        "coverage_by_level": {k: round(v / len(labelled), 4) for k, v in by_level.items()},
        "macro_code_coverage": round(sum(with_notes) / len(with_notes), 4),
        "settings": {"window": window, "stride": stride, "min_score": min_score},
        "per_code": per_code,
    }
    if examples:
        out["examples"] = shown
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", required=True, help="a shipped concept set name or a built concept-set JSON")
    ap.add_argument("--notes", type=Path, nargs="+", required=True, help="notes JSONL files (id, text, labels)")
    ap.add_argument("--window", type=int, default=3, help="sentences per window")
    ap.add_argument("--stride", type=int, default=1, help="sentences between window starts")
    ap.add_argument("--min-score", type=float, default=0.5, help="IDF-normalised BM25 score of a match")
    ap.add_argument("--examples", type=int, default=0, help="show the best match of this many covered notes")
    args = ap.parse_args(argv)
    if args.window < 1 or not 1 <= args.stride <= args.window:
        raise DataError("--window must be >= 1 and --stride between 1 and --window (windows overlap or touch)")
    cs = load_concept_set(args.concepts)
    notes = [n for path in args.notes for n in read_notes(path)]
    result = coverage(notes, cs, args.window, args.stride, args.min_score, args.examples)
    result["files"] = [str(p) for p in args.notes]
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return result


if __name__ == "__main__":
    with user_errors(Path(sys.argv[0]).name):
        main()
