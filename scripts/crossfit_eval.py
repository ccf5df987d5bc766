"""Two-fold dev protocol (cec.evaluation.crossfit) over the notes scored in an evaluation score cache.

    python scripts/evaluate.py ... --cache runs/eval/codiesp.scores.jsonl     # scores notes (resumable)
    python scripts/crossfit_eval.py --notes runs/codiesp/dev.jsonl --train runs/codiesp/train.jsonl \\
        --cache runs/eval/codiesp.scores.jsonl --out results/crossfit.md

Uses the notes of --notes whose stage-1 concept probabilities are in the cache (and, per row, the notes that
system has scores for: rows over fewer notes say so). Each row fits its calibration, threshold and (for the
concept bottleneck) weights on one half of those notes and reports on the other, both ways; metrics pooled over
all notes, with a bootstrap 95% interval of micro-F1. The label LLM has a row for each k of 3-6 the cache holds
(`scripts/evaluate.py --systems cec-k3 cec-k4 cec-k6`), named after the answers its adapter was trained on.
Prints JSON; --out also writes the Markdown table.
--fit-out FILE writes the bottleneck fitted on all the notes (its calibration and threshold: "fitted" in the JSON):
what a pipeline ships; with --fit-direct that bottleneck also reads the fine-tuned direct question (the row "Concept
bottleneck + direct-FT question", there whenever the cache has direct-FT scores). With --fit-train the bottleneck
(its own row, and --fit-out) also fits on the --train notes the cache has stage-1 scores of; its calibration and
threshold stay fitted on dev notes only. With --lexical the lexical prior (cec.coding.lexical: TF-IDF + logistic
regression, C by cross-validation) is fitted on the --train notes as the pipeline reads them, on the labels the
bottleneck fits on; rows "+ lexical prior" read its logit as one more shared weight (dev notes: the prior fitted on
all training notes; training notes: out-of-fold priors), and --fit-out ships it beside the bottleneck. With
--coder-labels (--notes and --train written by
scripts/negation_gold.py --coder-notes) one more bottleneck row, and --fit-out, fit on the labels a coder gives the
blanked notes (the gold codes whose every mention negation blanks left out); every row is judged on all gold.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cec.coding import negation  # noqa: E402
from cec.coding.calibration import Platt  # noqa: E402
from cec.coding.lexical import LexicalPrior  # noqa: E402
from cec.cli import user_errors  # noqa: E402
from cec.engine.lora import read_adapter_config  # noqa: E402
from cec.evaluation.crossfit import bottleneck_system, fit_bottleneck, halves, score_system  # noqa: E402
from cec.evaluation.crossfit import two_fold  # noqa: E402
from cec.data import read_notes  # noqa: E402
from cec.errors import ConfigError, DataError  # noqa: E402
from cec.evaluation.score_cache import ScoreCache  # noqa: E402
from cec.evaluation.systems import CONCEPTS, System, concept_mean, fingerprints, leaf_view  # noqa: E402
from cec.evaluation.systems import resolve_setup, tfidf_scores  # noqa: E402
from cec.io import atomic_write_json, atomic_write_text  # noqa: E402
from cec.evaluation.metrics import label_matrix, roc_auc, tune_threshold  # noqa: E402

CEC_SYSTEMS = [System(f"cec-k{k}", "cec", k) for k in (3, 4, 5, 6)]  # the paper's k (Table 3), a row each it has
DIRECT_FT, DIRECT = System("direct-ft", "direct-ft"), System("direct", "direct")
LLM_SYSTEMS = CEC_SYSTEMS + [DIRECT_FT, DIRECT]


def cached(cache, key, notes):
    rows = [cache.get(*key, n) for n in notes]
    return None if any(r is None for r in rows) else np.array(rows, dtype=np.float64)


def gold(note: dict) -> list[str]:
    """A note's gold codes: its labels, and the ones negation_gold.py --coder-notes moved to blanked_labels."""
    return note["labels"] + note.get("blanked_labels", [])


def scored_training_notes(cache, key: str, train: list[dict], cs, where: str, flag: str = "--fit-train",
                          lexical_z: np.ndarray | None = None):
    """(stage-1 probabilities, labels[, lexical logits: rows of lexical_z, given for all of train]) of the training
    notes the cache has stage-1 scores of (key: CONCEPTS'), for the bottleneck's `also`; fewer than 10 is a
    DataError."""
    scored = [i for i, n in enumerate(train) if cache.get(CONCEPTS, key, n) is not None]
    if len(scored) < 10:
        raise DataError(f"{flag}: only {len(scored)} notes of {where} have stage-1 scores in {cache.path} (need 10)")
    notes = [train[i] for i in scored]
    out = cached(cache, (CONCEPTS, key), notes), label_matrix([n["labels"] for n in notes], cs.codes)
    return out if lexical_z is None else (*out, lexical_z[scored])


def concept_stage_metrics(cs, concept_p: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict:
    """The concept model on its own, against the dev notes' pseudo-labels (a concept is positive for a note when
    one of its gold codes has it, App. C): AUC over all (note, concept) pairs, precision and recall at the
    pipeline's concept threshold, and how often it says Yes."""
    pseudo = np.zeros(concept_p.shape, dtype=bool)
    for j, code in enumerate(cs.codes):
        pseudo[np.ix_(y[:, j] == 1, cs.concept_ids(code))] = True
    yes = concept_p >= threshold
    hits = int((yes & pseudo).sum())
    return {"auc": roc_auc(pseudo.ravel().astype(int), concept_p.ravel()), "threshold": threshold,
            "precision": hits / max(int(yes.sum()), 1), "recall": hits / max(int(pseudo.sum()), 1),
            "yes_rate": float(yes.mean()), "pseudo_positive_rate": float(pseudo.mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--notes", required=True, help="dev notes JSONL (the scored set)")
    ap.add_argument("--train", help="train notes JSONL (for the TF-IDF row)")
    ap.add_argument("--cache", required=True, help="score cache JSONL written by scripts/evaluate.py")
    ap.add_argument("--pipeline", help="pipeline folder the cache was scored with (default: the shipped one)")
    ap.add_argument("--label-adapter", help="the label LLM's adapter, overriding the pipeline's (as given to "
                                            "scripts/evaluate.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="Markdown table to write")
    ap.add_argument("--fit-out", help="write the bottleneck fitted on all scored notes here (JSON)")
    ap.add_argument("--fit-train", action="store_true",
                    help="the bottleneck (a row of its own, and --fit-out) also fits on the --train notes whose "
                         "stage-1 scores are in --cache (scripts/evaluate.py --systems concept-mean --test TRAIN "
                         "--dev TRAIN --cache CACHE)")
    ap.add_argument("--fit-direct", action="store_true",
                    help="the --fit-out bottleneck also reads the direct-FT question (every note needs its scores)")
    ap.add_argument("--lexical", action="store_true",
                    help="fit the lexical prior on the --train notes: rows that read it, and --fit-out ships it")
    ap.add_argument("--coder-labels", action="store_true",
                    help="--notes and --train are negation_gold.py --coder-notes files: a bottleneck row fitted on "
                         "their labels (the gold codes negation blanks, in blanked_labels, left out), and --fit-out "
                         "fitted so; every row is judged on all gold (labels + blanked_labels)")
    args = ap.parse_args(argv)
    if args.fit_direct and not args.fit_out:
        raise ConfigError("--fit-direct says what the --fit-out bottleneck reads: give --fit-out FILE too")
    if args.fit_train and not args.train:
        raise ConfigError("--fit-train fits on the --train notes: give --train TRAIN too")
    if args.fit_train and args.fit_direct:
        raise ConfigError("--fit-train and --fit-direct: the training notes have no direct-question scores")
    if args.lexical and not args.train:
        raise ConfigError("--lexical fits the lexical prior on the --train notes: give --train TRAIN too")
    if args.lexical and args.fit_direct:
        raise ConfigError("--lexical and --fit-direct: one bottleneck reads one or the other here")

    setup = resolve_setup(args.pipeline, label_adapter=args.label_adapter)
    cs = setup.concept_set
    keys = fingerprints(setup, LLM_SYSTEMS, "cpu", None)
    cache = ScoreCache(args.cache)
    notes = [n for n in read_notes(args.notes) if cache.get(CONCEPTS, keys[CONCEPTS], n) is not None]
    if len(notes) < 10:
        raise DataError(f"{args.cache}: only {len(notes)} notes of {args.notes} have stage-1 scores (need 10)")
    y_coder = label_matrix([n["labels"] for n in notes], cs.codes)  # --coder-labels: what a coder codes
    notes = [n | {"labels": gold(n)} for n in notes]  # every row is judged (and, but that one, fitted) on all gold
    y = label_matrix([n["labels"] for n in notes], cs.codes)
    blanked = y & ~y_coder  # the gold pairs of blanked_labels (none unless --notes is a --coder-notes file)
    concept_p = cached(cache, (CONCEPTS, keys[CONCEPTS]), notes)

    rows = {}  # name -> (system fn, notes mask[, the labels it is fitted on, when not y])
    everyone = np.ones(len(notes), dtype=bool)
    if args.train:
        train_coder = read_notes(args.train)
        train = [n | {"labels": gold(n)} for n in train_coder]
        tfidf_cache = ScoreCache(Path(args.cache).with_suffix(".tfidf.jsonl"))

        def tfidf(tune):  # C and the threshold chosen on the tuning half only (scores cached per half)
            _, scores, _ = tfidf_scores(train, [notes[i] for i in tune], notes, cs.codes, tfidf_cache)
            return score_system(scores, y, calibrate=False)(tune)
        rows["TF-IDF + LR (one-vs-rest)"] = (tfidf, everyone)
    prior = None  # --lexical: the prior fitted on all training notes, the dev notes' logits, the training notes' (oof)
    if args.lexical:
        read = lambda ns: [n["text"] for n in negation.readable_notes(ns, setup.config.negation)]  # noqa: E731
        prior_train = train_coder if args.coder_labels else train
        texts, y_prior = read(prior_train), label_matrix([n["labels"] for n in prior_train], cs.codes)
        print(f"[cec] fitting the lexical prior on {len(texts)} training notes", file=sys.stderr)
        prior = LexicalPrior.fit(texts, y_prior, cs.codes)
        lexical_dev, lexical_train = prior.logits(read(notes)), LexicalPrior.out_of_fold(texts, y_prior, cs.codes,
                                                                                        prior.C)
    scored = {}  # system key -> ([notes, codes] scores, mask of the notes that have them)
    label = setup.config.adapter("label")  # its row says which answers it was trained on (train.py records it)
    answers = read_adapter_config(label)[1].get("concept_answers", "pseudo") if label else "pseudo"
    for s, name in ((DIRECT, "Direct coding w/o FT"), (DIRECT_FT, "Direct coding w/ FT"),
                    *((s, f"CEC, label LLM, k={s.k} ({answers} answers)") for s in CEC_SYSTEMS)):
        have = np.array([cache.get(s.key, keys[s.key], n) is not None for n in notes])
        if have.sum() >= 10:
            scores = np.zeros(y.shape)
            scores[have] = cached(cache, (s.key, keys[s.key]), [n for n, h in zip(notes, have) if h])
            scored[s.key] = scores, have
            rows[name + " (raw)"] = (score_system(scores, y, calibrate=False), have)
            rows[name + " (calibrated)"] = (score_system(scores, y), have)
    for name, view in (("Concept mean, all own concepts", cs), ("Concept mean, leaf concepts", leaf_view(cs))):
        rows[name] = (score_system(concept_mean(view, torch.from_numpy(concept_p)).numpy(), y), everyone)
    rows["Concept bottleneck (linear stage 2)"] = (bottleneck_system(cs, concept_p, y), everyone)
    also = None  # stage-1 probabilities and labels of the scored training notes (--fit-train)
    if args.fit_train:
        also = scored_training_notes(cache, keys[CONCEPTS], train, cs, args.train)
        rows[f"Concept bottleneck, fitted also on {len(also[0])} training notes"] = (
            bottleneck_system(cs, concept_p, y, also=also), everyone)
    if args.coder_labels:
        also_coder = None if not args.fit_train else scored_training_notes(cache, keys[CONCEPTS], train_coder, cs,
                                                                           args.train)
        train_part = "" if not args.fit_train else f", fitted also on {len(also_coder[0])} training notes"
        rows[f"Concept bottleneck{train_part}, on coder labels"] = (
            bottleneck_system(cs, concept_p, y_coder, also=also_coder), everyone, y_coder)
    rows["Concept bottleneck, per-code thresholds"] = (bottleneck_system(cs, concept_p, y), everyone)
    if args.lexical:  # on the labels the prior was fitted on
        y_lex, labels_part = (y_coder, ", on coder labels") if args.coder_labels else (y, "")
        rows[f"Concept bottleneck + lexical prior{labels_part}"] = (
            bottleneck_system(cs, concept_p, y_lex, lexical_z=lexical_dev), everyone, y_lex)
        if args.fit_train:
            also_lex = scored_training_notes(cache, keys[CONCEPTS], prior_train, cs, args.train,
                                             lexical_z=lexical_train)
            rows[f"Concept bottleneck + lexical prior, fitted also on {len(also_lex[0])} training notes"
                 f"{labels_part}"] = (bottleneck_system(cs, concept_p, y_lex, also=also_lex, lexical_z=lexical_dev),
                                      everyone, y_lex)
    direct_ft = scored.get(DIRECT_FT.key)
    if direct_ft is not None:
        rows["Concept bottleneck + direct-FT question"] = (
            bottleneck_system(cs, concept_p, y, direct_p=direct_ft[0]), direct_ft[1])

    results = []
    for name, (system, mask, *fit_y) in rows.items():
        idx = np.flatnonzero(mask)
        sub_y = y[idx]

        def restricted(tune, system=system, idx=idx):  # the system over the notes it has, indices remapped
            predict, tune_p, cal = system(idx[tune])
            return (lambda j: predict(idx[j])), tune_p, cal
        r = two_fold(restricted, sub_y, args.seed, per_code="per-code" in name,
                     fit_y=fit_y[0][idx] if fit_y else None, blanked=blanked[idx])
        results.append({"system": name, "notes": int(len(idx)), **r})
        print(f"[cec] {name}: micro-F1 {r['micro_f1']:.3f} [{r['micro_f1_ci95'][0]:.3f}, "
              f"{r['micro_f1_ci95'][1]:.3f}]", file=sys.stderr)
    payload = {"notes": len(notes), "codes": len(cs.codes), "positives": int(y.sum()), "seed": args.seed,
               "halves": [len(h) for h in halves(len(notes), args.seed)], "systems": results,
               "concept_stage": concept_stage_metrics(cs, concept_p, y),
               "protocol": "two-fold over the scored dev notes: calibration (Platt), threshold (micro-F1) and "
                           "bottleneck weights fitted on one half, reported on the other, both ways; pooled"}
    if args.fit_out:
        direct_p = None
        if args.fit_direct:
            if direct_ft is None or not direct_ft[1].all():
                raise DataError(f"--fit-direct: not every note of {args.notes} has direct-FT scores in {args.cache} "
                                "(scripts/evaluate.py --systems direct-ft)")
            direct_p = direct_ft[0]
        fit_y, fit_also = (y_coder, also_coder) if args.coder_labels else (y, also)
        lexical_z = None
        if args.lexical:
            lexical_z, fit_also = lexical_dev, also_lex if args.fit_train else None
        model, oof = fit_bottleneck(cs, concept_p, fit_y, np.arange(len(notes)), direct_p=direct_p, also=fit_also,
                                    lexical_z=lexical_z, prior=prior)
        cal = Platt.fit(oof, fit_y)
        model.save(args.fit_out)
        payload["fitted"] = {"bottleneck": args.fit_out, "l2": model.l2, "calibration": cal.to_json(),
                             "threshold": tune_threshold(fit_y, cal(oof)), "notes": len(notes),
                             "train_notes": 0 if fit_also is None else len(fit_also[0]), "direct": model.direct,
                             "lexical": model.lexical, "lexical_C": None if prior is None else prior.C,
                             "labels": "coder" if args.coder_labels else "gold"}
    print(json.dumps(payload, indent=1))
    if args.out:
        atomic_write_text(args.out, render(payload))
        atomic_write_json(Path(args.out).with_suffix(".json"), payload)
    return payload


def render(payload: dict) -> str:
    lines = [f"Two-fold protocol over {payload['notes']} CodiEsp-D50 dev notes ({payload['positives']} gold codes); "
             "micro-F1 pooled over both report halves, bootstrap 95% interval over notes.", "",
             "| System | Notes | F1 Micro [95% CI] | F1 Micro A->B / B->A | F1 Macro | AUC Micro | AUC Macro | P@5 "
             "| ECE | P > 0.99 | Codes/note |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["systems"]:
        lo, hi = r["micro_f1_ci95"]
        d = r["micro_f1_directions"]
        lines.append(f"| {r['system']} | {r['notes']} | {r['micro_f1']:.3f} [{lo:.3f}, {hi:.3f}] | {d[0]:.3f} / "
                     f"{d[1]:.3f} | {r['macro_f1']:.3f} | {r['micro_auc']:.3f} | {r['macro_auc']:.3f} | "
                     f"{r['p_at_5']:.3f} | {r['ece']:.3f} | {100 * r['share_above_0_99']:.1f}% | "
                     f"{r['codes_per_note']:.1f} (gold {r['gold_codes_per_note']:.1f}) |")
    without = [r for r in payload["systems"] if "blanked_pairs" in r]
    if without:
        lines += ["", f"Without the {without[0]['blanked_pairs']} gold pairs negation blanks every mention of "
                  "(blanked_labels; neither positive nor negative for AUC, not gold for F1):", "",
                  "| System | AUC Micro | F1 Micro |", "|---|---:|---:|"]
        lines += [f"| {r['system']} | {r['micro_auc_without_blanked']:.3f} | {r['micro_f1_without_blanked']:.3f} |"
                  for r in without]
    c = payload["concept_stage"]
    lines += ["", f"Concept stage on its own, against the notes' pseudo-labels (a concept is positive when a gold code "
              f"has it): AUC {c['auc']:.3f}; at P >= {c['threshold']:g}, precision {c['precision']:.3f}, recall "
              f"{c['recall']:.3f}; Yes to {100 * c['yes_rate']:.1f}% of (note, concept) pairs, "
              f"{100 * c['pseudo_positive_rate']:.1f}% positive."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with user_errors(Path(sys.argv[0]).name):
        main()
