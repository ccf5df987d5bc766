"""Evidence a coder can check: model sentence attribution (cec.coding.attribution) against CodiEsp-X gold, as JSON.

    python scripts/evidence_eval.py --src ../shared/data/codiesp --dev runs/codiesp/dev.jsonl --max-notes 20

1. Gold: each Spanish note is cut into sentences, aligned to its English lines (cec.evaluation.align, Gale-Church 1-1/1-2/2-1)
   and each CodiEsp-X mention of a CodiEsp-D50 code mapped to the English line(s) of its span. On all dev notes.
2. Ranking: for every gold (note, code) of CodiEsp-D50 in the first --max-notes notes with one (after skipping
   --skip of them), the note's sentences are ranked for the code, whether or not it was predicted: by our
   attribution (drops, or with --gain drop + gain; asking --per-code concepts per code; "ours_N" rows: the first N
   of them only, from the same questions; with --gain, "ours_drop" and "ours_gain": each part alone; every row also
   split into the gold codes the pipeline predicted and those it did not), by BM25 (the old report's
   report: cec.coding.report's tokens, the code description and its Yes concepts as the query, ties in note order), by
   a random ranking (its expected hit@k, exactly) and by note order. hit@k: a gold sentence in the top k.
3. Faithfulness: for the note's most probable predicted code, the note is coded again (stage 1 whole, then the
   pipeline's stage 2 for that code: the linear bottleneck, or the label LLM) without its top sentence and without
   a random sentence; the drops of P(code) (calibrated, as reported) and of its logit.
4. Time: code_note against code_note + the attribution of its predicted codes (add_evidence's work), per note.
"""
import argparse
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from cec.evaluation.align import align, map_span, parse_offsets
from cec.coding.attribution import PER_CODE, attribute, evidence_weights, note_sentences, strongest
from cec.coding.output import code_list
from cec.coding.pipeline import CECPipeline, shown_concepts
from cec.coding.stages import prefix_ids
from cec.data import read_codes
from cec.io import atomic_write_json
from cec.coding.report import sentence_spans, tokens


def gold_mentions(src: Path, notes: list[dict], codes: list[str], split: str = "dev"):
    """CodiEsp-X's diagnosis mentions of `codes` in `notes` (of `split`: dev or train), each mapped to the English
    lines that translate it:
    ([(note id, code, mention text, Spanish (start, end) spans, English line indices)], alignment figures)."""
    dev = src / split
    code_set = set(codes)
    groups, kinds, same = {}, Counter(), 0
    for n in notes:
        es = (dev / "text_files" / f"{n['id']}.txt").read_text(encoding="utf-8")
        ss, en = sentence_spans(es, ".!?"), note_sentences(n["text"])
        same += len(ss) == len(en)
        g = align([b - a for a, b in ss], [b - a for a, b in en])
        groups[n["id"]] = (es, ss, g)
        kinds.update(f"{len(a)}-{len(b)}" for a, b in g or [])
    mentions = []
    for line in (dev / f"{split}X.tsv").read_text(encoding="utf-8").splitlines():
        nid, kind, code, text, offsets = line.split("\t")
        if kind != "DIAGNOSTICO" or code.upper() not in code_set or nid not in groups:
            continue
        es, ss, g = groups[nid]
        spans = parse_offsets(offsets)
        mentions.append((nid, code.upper(), text, spans, map_span(spans, ss, g) if g else []))
    figures = {"notes": len(notes), "notes_same_sentence_count": same,
               "notes_aligned": sum(g is not None for _, _, g in groups.values()), "groups": dict(kinds),
               "d50_mentions": len(mentions), "d50_mentions_mapped": sum(bool(m[4]) for m in mentions)}
    return mentions, figures


def load_gold(src: Path, notes: list[dict], codes: list[str], show: int = 0) -> tuple[dict, dict]:
    """({(note id, code): set of English sentence indices}, alignment figures)."""
    mentions, figures = gold_mentions(src, notes, codes)
    gold = defaultdict(set)
    for nid, code, _, _, lines in mentions:
        gold[(nid, code)] |= set(lines)
    by_id = {n["id"]: n for n in notes}
    for nid, code, text, _, lines in random.Random(0).sample(mentions, min(show, len(mentions))):
        en = note_sentences(by_id[nid]["text"])
        print(f"[eye] {nid} {code} {text!r} -> {[by_id[nid]['text'][slice(*en[j])] for j in lines]}", file=sys.stderr)
    pairs = {(n["id"], c) for n in notes for c in n["labels"]}
    covered = {p for p in pairs if gold.get(p)}
    figures |= {"gold_pairs": len(pairs), "gold_pairs_with_sentence": len(covered),
                "gold_notes_with_sentence": len({nid for nid, _ in covered})}
    return {p: gold[p] for p in covered}, figures


def bm25_order(text: str, spans, query: str) -> list[int]:
    from rank_bm25 import BM25Okapi

    docs = [tokens(text[a:b]) for a, b in spans]
    q = tokens(query)
    if not q or not any(docs):
        return list(range(len(spans)))
    scores = BM25Okapi([d or ["\0"] for d in docs]).get_scores(q)
    return sorted(range(len(spans)), key=lambda s: -scores[s])  # stable: ties in note order


def random_hit(n: int, g: int, k: int) -> float:
    """P(at least one of g gold sentences among k of n drawn at random)."""
    return 1 - math.comb(n - g, k) / math.comb(n, k) if k < n else 1.0


def recode_score(pipe, text: str, j: int, note_id: str, concept_p=None) -> float:
    """The logit of P(code j) for `text` (calibrated, as code_note reports it), coded as code_note codes it:
    stage 1 whole unless concept_p is given, then stage 2 for code j only."""
    text = pipe.fit_note(text)
    if concept_p is None:
        concept_p = pipe.concept_probs(text)
    if pipe.bottleneck is not None:
        x = pipe.bottleneck.logits(concept_p, pipe.bottleneck_direct(text), pipe.bottleneck_lexical(text))[j]
    else:
        q = pipe.label_question_ids(concept_p, shown_concepts(pipe.config, pipe.cs, concept_p, note_id))[j]
        prefix = prefix_ids(pipe.tokenizer, pipe.stages["label"].prefix(text))
        x = pipe.label_scorer.score(prefix, [q])[0]
    if pipe.calibration is not None:
        return float(torch.logit(pipe.calibration(torch.sigmoid(torch.as_tensor(x)).reshape(1)), eps=1e-7)[0])
    return float(x)


def ranking_scores(pipe, result, code_indices, a, per_code: int | None, n: int) -> torch.Tensor:
    """The sentence scores `attribute` (run with per_code) would give had it asked only the first n <= per_code
    concepts of each code (attribution.strongest): the same drops and gains, fewer rows; the code-question part
    (label LLM, direct question) kept."""
    row = {i: r for r, i in enumerate(a.concept_ids)}
    w_asked, w_n = (torch.zeros(len(code_indices), len(a.concept_ids)) for _ in range(2))
    for k, j in enumerate(code_indices):
        weights = evidence_weights(pipe, result, j)
        for w, m in ((w_asked, per_code), (w_n, n)):
            for i, v in strongest(weights, result.concept_probs, m).items():
                w[k, row[i]] = v
    return w_n @ a.concept_scores + (a.scores - w_asked @ a.concept_scores)


def without(text: str, span) -> str:
    return (text[: span[0]] + text[span[1]:]).replace("\n\n", "\n").strip()


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def summarise(out, n_notes, n_pairs, hits, by_pred, faith, times, args) -> None:
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    rate = lambda h, n: {"hit@1": round(h[0] / n, 4), "hit@3": round(h[1] / n, 4)}  # noqa: E731
    out["ranking"] = {"notes": n_notes, "gold_pairs": n_pairs, **{m: rate(h, n_pairs) for m, h in hits.items()},
                      **{"predicted" if k else "not_predicted":
                         {"pairs": n, **{m: rate(h, n) for m, h in v.items()}}
                         for k, (n, v) in sorted(by_pred.items()) if n}}
    out["faithfulness"] = {"codes": len(faith), "prob_drop_top": mean([f[0] for f in faith]),
                           "prob_drop_random": mean([f[1] for f in faith]),
                           "logit_drop_top": mean([f[2] for f in faith]),
                           "logit_drop_random": mean([f[3] for f in faith])}
    code_s, ev_s = sum(t[0] for t in times), sum(t[1] for t in times)
    out["time"] = {"notes": len(times), "code_seconds_per_note": mean([t[0] for t in times]),
                   "evidence_seconds_per_note": mean([t[1] for t in times]),
                   "ratio_with_evidence": round((code_s + ev_s) / code_s, 3) if code_s else None,
                   "threads": args.threads, "per_code": args.per_code or "all", "gain": args.gain}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=Path("../shared/data/codiesp"))
    ap.add_argument("--dev", type=Path, default=Path("runs/codiesp/dev.jsonl"))
    ap.add_argument("--pipeline", help="pipeline folder (default: the shipped one)")
    ap.add_argument("--max-notes", type=int, default=20, help="notes with a gold D50 code to run the model on")
    ap.add_argument("--skip", type=int, default=0, help="skip this many notes with a gold D50 code first")
    ap.add_argument("--no-faithfulness", action="store_true", help="skip the deletion test (two codings a note)")
    ap.add_argument("--show", type=int, default=0, help="print this many mapped gold mentions to stderr")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-code", type=int, default=PER_CODE,
                    help=f"concepts asked per code (default {PER_CODE}, as infer.py; 0: all of them)")
    ap.add_argument("--gain", action="store_true",
                    help="rank by drop + gain (attribution.attribute(gain=True)); default: drops only, as infer.py")
    ap.add_argument("--out", type=Path, help="also write the JSON here, updated after every note")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    per_code = args.per_code or None
    fewer = range(1, per_code) if per_code else ()  # "ours_N" rankings from the same drops
    notes = [json.loads(line) for line in args.dev.read_text(encoding="utf-8").splitlines() if line.strip()]
    pipe = CECPipeline.load(args.pipeline)
    codes = list(pipe.cs.codes)
    assert set(read_codes(args.src / "codiesp50_codes.tsv")) == set(codes), "pipeline is not CodiEsp-D50"
    gold, out = load_gold(args.src, notes, codes, args.show)
    out = {"alignment": out}
    rng = random.Random(args.seed)
    hits = defaultdict(lambda: [0.0, 0.0])  # method -> [hit@1, hit@3] sums
    by_pred = defaultdict(lambda: [0, defaultdict(lambda: [0.0, 0.0])])  # predicted?: [pairs, hits as above]
    n_pairs, times, faith = 0, [], []
    run = [n for n in notes if any((n["id"], c) in gold for c in n["labels"])][args.skip: args.skip + args.max_notes]
    for n in run:
        text, nid = n["text"], n["id"]
        t0 = time.perf_counter()
        result = pipe.code_note(text, nid)
        t1 = time.perf_counter()
        spans = note_sentences(text)
        predicted = [codes.index(c["code"]) for c in code_list(result, pipe) if c["predicted"]]
        pred_attr = attribute(pipe, text, result, predicted, spans, per_code, args.gain)  # add_evidence's work
        t2 = time.perf_counter()
        pred_scores = pred_attr.scores
        times.append((t1 - t0, t2 - t1))
        want = [c for c in n["labels"] if (nid, c) in gold]
        idx = [codes.index(c) for c in want]
        rest = [j for j in idx if j not in predicted]  # gold codes not predicted: ranked all the same
        rest_attr = attribute(pipe, text, result, rest, spans, per_code, args.gain) if rest else None

        def gold_rows(part):  # [len(idx), sentences]: one part of the gold codes' scores
            per = [None if a is None else part(codes_, a) for codes_, a in ((predicted, pred_attr), (rest, rest_attr))]
            return torch.stack([per[0][predicted.index(j)] if j in predicted else per[1][rest.index(j)]
                                for j in idx])
        scores = {}
        if idx:
            scores = {f"ours_{n}": gold_rows(lambda c, a, n=n: ranking_scores(pipe, result, c, a, per_code, n))
                      for n in fewer}
            scores["ours"] = gold_rows(lambda c, a: a.scores)
            if args.gain:
                scores |= {"ours_drop": gold_rows(lambda c, a: a.code_drops),
                           "ours_gain": gold_rows(lambda c, a: a.code_gains)}
        for k, (c, j) in enumerate(zip(want, idx)):
            g = gold[(nid, c)]
            words = [pipe.cs.descriptions[c]] + [pipe.cs.concepts[i].text for i in evidence_weights(pipe, result, j)]
            orders = {m: torch.argsort(sc[k], descending=True, stable=True).tolist() for m, sc in scores.items()}
            orders.update({"bm25": bm25_order(text, spans, " ".join(words)), "first": list(range(len(spans)))})
            part = by_pred[j in predicted]
            for h in (hits, part[1]):
                for m, order in orders.items():
                    h[m][0] += order[0] in g
                    h[m][1] += bool(g & set(order[:3]))
                h["random"][0] += random_hit(len(spans), len(g), 1)
                h["random"][1] += random_hit(len(spans), len(g), 3)
            part[0] += 1
            n_pairs += 1
        if predicted and not args.no_faithfulness and len(spans) > 1:
            top = 0  # code_list is sorted by probability: the most probable predicted code
            j = predicted[top]
            x = recode_score(pipe, text, j, nid, result.concept_probs)
            best = spans[int(torch.argmax(pred_scores[top]))]
            other = spans[rng.randrange(len(spans))]  # uniform over the note's sentences
            x_top, x_rand = (recode_score(pipe, without(text, s), j, nid) for s in (best, other))
            faith.append((sigmoid(x) - sigmoid(x_top), sigmoid(x) - sigmoid(x_rand), x - x_top, x - x_rand))
        print(f"[eval] {nid}: {len(want)} gold codes, {len(predicted)} predicted, code {t1 - t0:.1f} s, "
              f"evidence {t2 - t1:.1f} s", file=sys.stderr)
        summarise(out, len(times), n_pairs, hits, by_pred, faith, times, args)
        if args.out:  # after every note, so a long run that is stopped still leaves its figures
            atomic_write_json(args.out, out)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
