"""Where negation handling meets CodiEsp's gold: of the gold diagnosis mentions of dev (CodiEsp-X, mapped to the
English lines that translate them, as scripts/evidence_eval.py maps them), how many fall in a clause
cec.coding.negation blanks, and of those how many the Spanish original states after a negation or family cue
(the gold codes a mention a coder would not: blanking it is right by the coding rules and costs dev F1) against
none (the rules over-reach: a finding the note states as present is kept from the model). No model runs.

    python scripts/negation_gold.py --src ../shared/data/codiesp --notes runs/codiesp/dev.jsonl \\
        --codes ../shared/data/codiesp/codiesp50_codes.tsv [--show 10] > negation_gold.json

A mention "falls in a blanked clause" when at least half of the characters of the English line(s) it maps to
are blanked (a line holds several findings, so a touch alone says little; `touched` counts those too). The cue
is looked for in the Spanish words just before the mention and in the mention itself, and backward cues
("negativo", "descartado") just after it. --show N prints N blanked mentions of each kind to stderr, to check by eye.

--coder-notes OUT writes the notes with the gold codes whose every mention negation blanks taken out of "labels"
(kept in "blanked_labels"): what a coder would code from the note as a pipeline with negation on reads it. With
--split train, the training notes of `train.py --negation on`:

    python scripts/negation_gold.py --src ../shared/data/codiesp --split train --notes runs/codiesp/train.jsonl \\
        --codes ../shared/data/codiesp/codiesp50_codes.tsv --coder-notes runs/codiesp/train_coder.jsonl

--cache SCORES (the dev score cache of scripts/evaluate.py, notes read with negation on; --pipeline the folder it
was scored with) adds the concept bottleneck's two-fold figures (scripts/crossfit_eval.py's row) against all gold
and without the gold (note, code) pairs whose every mention is blanked: what reading like a coder costs against
CodiEsp's gold; once fitted on all gold, once on the labels a coder would give the blanked notes
(`fitted_on_coder_labels`: what a pipeline that does not learn to code negated findings ships).
"""
import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evidence_eval import gold_mentions  # noqa: E402 -- scripts/, beside this file
from cec.cli import user_errors  # noqa: E402
from cec.coding.attribution import note_sentences  # noqa: E402
from cec.coding.negation import blanked_spans  # noqa: E402
from cec.data import read_codes, read_notes, write_notes  # noqa: E402
from cec.errors import DataError  # noqa: E402
from cec.io import prepare_output  # noqa: E402

NEG_BEFORE = {"no", "sin", "niega", "niegan", "negaba", "negó", "ausencia", "ni", "nunca", "tampoco", "descarta",
              "descartan", "descartó", "descartar", "exfumador", "exfumadora", "ex"}
NEG_AFTER = {"negativo", "negativa", "negativos", "negativas", "descartado", "descartada", "descartados",
             "descartadas", "ausente", "ausentes", "resuelto", "resuelta"}
FAMILY = {"madre", "padre", "hermano", "hermana", "hermanos", "hijo", "hija", "abuelo", "abuela", "tío", "tía",
          "familiares", "familiar", "padres"}
WORD = re.compile(r"\w+")
BEFORE_WORDS, AFTER_WORDS = 6, 4


def spanish_cue(es: str, spans: list[tuple[int, int]]) -> str | None:
    """'negated' or 'family' when the Spanish text states the mention after such a cue, else None."""
    start, end = spans[0][0], spans[-1][1]
    before = WORD.findall(es[max(0, start - 80): start].lower())[-BEFORE_WORDS:]
    inside = WORD.findall(es[start:end].lower())
    after = WORD.findall(es[end: end + 60].lower())[:AFTER_WORDS]
    words = set(before) | set(inside)
    if words & FAMILY:
        return "family"
    if words & NEG_BEFORE or set(after) & NEG_AFTER:
        return "negated"
    return None


def blanked_share(line: tuple[int, int], blanks) -> float:
    covered = sum(max(0, min(b.end, line[1]) - max(b.start, line[0])) for b in blanks)
    return covered / max(1, line[1] - line[0])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="CodiEsp folder (with dev/devX.tsv and dev/text_files)")
    ap.add_argument("--notes", required=True, help="dev notes JSONL (English), as prepare_codiesp.py writes them")
    ap.add_argument("--codes", required=True, help="the code list (codiesp50_codes.tsv)")
    ap.add_argument("--split", choices=["dev", "train"], default="dev",
                    help="which CodiEsp split the notes are (its X file and Spanish texts) (default: %(default)s)")
    ap.add_argument("--coder-notes", type=Path, metavar="OUT",
                    help="write the notes without the gold codes whose every mention is blanked (a new file)")
    ap.add_argument("--show", type=int, default=0, help="print this many blanked mentions of each kind to stderr")
    ap.add_argument("--cache", help="dev score cache (scripts/evaluate.py): also the bottleneck with and without "
                                    "the blanked gold pairs")
    ap.add_argument("--pipeline", help="pipeline folder the cache was scored with (default: the shipped one)")
    ap.add_argument("--fit-train", metavar="TRAIN",
                    help="with --cache: the bottleneck also fits on the notes of TRAIN the cache has stage-1 scores of "
                         "(as scripts/crossfit_eval.py --fit-train); the --coder-notes file of --split train gives "
                         "the coder-label fit its labels (all gold: labels + blanked_labels)")
    args = ap.parse_args(argv)
    if args.coder_notes and args.coder_notes.exists():
        raise DataError(f"--coder-notes {args.coder_notes} exists: choose a new file")
    if args.cache and args.split != "dev":
        raise DataError("--cache is a dev score cache: it goes with --split dev")
    notes = read_notes(args.notes)
    if args.coder_notes:
        prepare_output(args.coder_notes)
    mentions, figures = gold_mentions(args.src, notes, read_codes(args.codes), args.split)
    by_id = {n["id"]: n for n in notes}
    blanks = {n["id"]: blanked_spans(n["text"]) for n in notes}
    lines = {n["id"]: note_sentences(n["text"]) for n in notes}
    counts, examples = Counter(), {"over-reach": [], "negated": [], "family": []}
    pairs, pairs_blanked = set(), {}
    for nid, code, text, spans, idx in mentions:
        if not idx:
            continue
        es = (args.src / args.split / "text_files" / f"{nid}.txt").read_text(encoding="utf-8")
        shares = [blanked_share(lines[nid][j], blanks[nid]) for j in idx]
        cue = spanish_cue(es, spans)
        counts["mentions"] += 1
        counts["mentions_with_spanish_cue"] += cue is not None
        touched, blanked = any(s > 0 for s in shares), all(s >= 0.5 for s in shares)
        counts["touched"] += touched
        pairs.add((nid, code))
        pairs_blanked[(nid, code)] = pairs_blanked.get((nid, code), True) and blanked
        if blanked:
            kind = cue or "over-reach"
            counts[f"blanked_{kind}"] += 1
            en = " | ".join(by_id[nid]["text"][slice(*lines[nid][j])] for j in idx)
            examples[kind].append({"note": nid, "code": code, "spanish": text, "english": en[:200]})
        elif cue is not None:
            counts[f"read_{cue}"] += 1  # a negated or family mention the rules leave to the model
    for kind, rows in examples.items():
        for row in random.Random(0).sample(rows, min(args.show, len(rows))):
            print(f"[eye] {kind}: {json.dumps(row, ensure_ascii=False)}", file=sys.stderr)
    n = counts["mentions"]
    out = {"notes": len(notes), "alignment": figures, "mentions": n,
           "mentions_with_spanish_cue": counts["mentions_with_spanish_cue"],
           "touched": counts["touched"],
           "blanked": {k: counts[f"blanked_{k}"] for k in ("negated", "family", "over-reach")},
           "cued_but_read": {k: counts[f"read_{k}"] for k in ("negated", "family")},
           "gold_pairs": len(pairs), "gold_pairs_all_mentions_blanked": sum(pairs_blanked.values()),
           "notes_with_a_blank": sum(bool(b) for b in blanks.values()),
           "blanks_per_note": round(sum(map(len, blanks.values())) / max(1, len(notes)), 2)}
    out["blanked_share"] = {k: round(v / max(1, n), 4) for k, v in out["blanked"].items()}
    dropped = {k for k, v in pairs_blanked.items() if v}
    if args.coder_notes:
        written = coder_notes(notes, dropped)
        write_notes(args.coder_notes, written)
        out["coder_notes"] = {"path": str(args.coder_notes),
                              "labels_taken_out": sum(len(n.get("blanked_labels", [])) for n in written)}
    if args.cache:
        out["bottleneck"] = without_pairs(args, notes, dropped)
    print(json.dumps(out, indent=2))
    return out


def coder_notes(notes: list[dict], dropped: set) -> list[dict]:
    """The notes with the (note id, code) pairs of `dropped` moved from "labels" to "blanked_labels"."""
    out = []
    for n in notes:
        gone = [c for c in n["labels"] if (n["id"], c) in dropped]
        out.append(n | {"labels": [c for c in n["labels"] if c not in gone]} | ({"blanked_labels": gone} if gone else {}))
    return out


def without_pairs(args, notes, dropped: set) -> dict:
    """The bottleneck's two-fold micro-AUC and micro-F1 over all gold, and with the `dropped` gold (note, code)
    pairs left out (AUC: neither positive nor negative; F1: counted as not gold); for the bottleneck fitted on
    all gold, and (fitted_on_coder_labels) on the labels a coder would give the blanked notes."""
    import numpy as np

    from crossfit_eval import LLM_SYSTEMS, cached, gold, scored_training_notes  # noqa: E402 -- scripts/
    from cec.evaluation.crossfit import bottleneck_system, two_fold
    from cec.evaluation.metrics import label_matrix
    from cec.evaluation.score_cache import ScoreCache
    from cec.evaluation.systems import CONCEPTS, fingerprints, resolve_setup

    setup = resolve_setup(args.pipeline)
    cs = setup.concept_set
    key = fingerprints(setup, LLM_SYSTEMS, "cpu", None)[CONCEPTS]
    cache = ScoreCache(args.cache)
    concept_p = cached(cache, (CONCEPTS, key), notes)
    if concept_p is None:
        raise DataError(f"{args.cache}: not every note of {args.notes} has stage-1 scores of this pipeline")
    y = label_matrix([n["labels"] for n in notes], cs.codes)
    keep = np.ones(y.shape, dtype=bool)
    for i, note in enumerate(notes):
        for j, code in enumerate(cs.codes):
            keep[i, j] = not (y[i, j] and (note["id"], code) in dropped)
    train = read_notes(args.fit_train) if args.fit_train else None

    def figures(labels, train_labels):
        also = None if train is None else scored_training_notes(
            cache, key, [n | {"labels": train_labels(n)} for n in train], cs, args.fit_train)
        r = two_fold(bottleneck_system(cs, concept_p, labels, also=also), y, fit_y=labels, blanked=~keep)
        return {"micro_auc": r["micro_auc"], "micro_auc_without": r.get("micro_auc_without_blanked", r["micro_auc"]),
                "micro_f1": r["micro_f1"], "micro_f1_without": r.get("micro_f1_without_blanked", r["micro_f1"])}
    # fitted on all gold (training notes: their labels and blanked_labels), and on what a coder would code from
    # the blanked note (dev: without the dropped pairs; training notes: their labels, as --coder-notes writes them)
    return {"gold_pairs_left_out": int((~keep).sum()),
            **figures(y, gold),
            "fitted_on_coder_labels": figures(y & keep, lambda n: n["labels"])}


if __name__ == "__main__":
    with user_errors("negation_gold.py"):
        main()
