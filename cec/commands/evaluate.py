"""Evaluate CEC, its ablations and the TF-IDF baseline on a test split; thresholds tuned on dev (Tables 1-4).

    python scripts/evaluate.py --test runs/codiesp/test.jsonl --dev runs/codiesp/dev.jsonl \\
        --train runs/codiesp/train.jsonl --pipeline runs/pipeline --out results/codiesp.md \\
        --json results/codiesp.json [--max-notes 20] [--systems cec-k3 cec-k6 leaf direct]

Systems: cec-k3 cec-k4 cec-k5 cec-k6 (CEC with k own concepts + m outside negatives), leaf (CEC over each
code's leaf-level concepts only, at the pipeline's k), concept-mean (stage 1 alone: each code the mean of its
own concepts' probabilities; it stores the stage-1 probabilities scripts/crossfit_eval.py fits on), direct (base
model, one direct yes/no question per code description), direct-ft (the same with a direct-stage adapter:
--direct-adapter, or `direct_adapter` in cec_pipeline.json), tfidf (TF-IDF + one-vs-rest logistic regression on --train). Default: all the inputs allow.

For each system the threshold is tuned on dev by micro-F1 and applied to test; the table reports macro/micro
AUC, macro/micro F1 (macro F1 = the mean of per-label F1) and P@5. Per-note scores are cached in
JSON_STEM.scores.jsonl beside --json (or --cache), so an interrupted run resumes where it stopped.
"""
import argparse
import json
import sys
from pathlib import Path

from cec.cli import add_runtime_args, runtime, user_errors
from cec.data import read_notes
from cec.errors import ConfigError
from cec.evaluation.score_cache import default_cache_path
from cec.evaluation.systems import parse_systems, resolve_setup, run_evaluation
from cec.evaluation.tables import render_markdown
from cec.io import atomic_write_json, atomic_write_text, prepare_output

def parse_args(argv=None, prog: str | None = None):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test", required=True, help="notes JSONL to evaluate on")
    ap.add_argument("--dev", required=True, help="notes JSONL the thresholds (and the TF-IDF C) are tuned on")
    ap.add_argument("--train", help="notes JSONL the TF-IDF baseline is trained on (needed for tfidf)")
    ap.add_argument("--pipeline", help="pipeline folder (cec_pipeline.json); default: the shipped one unless "
                                       "--model is given")
    ap.add_argument("--model", help="base model (embedded name, HF folder, .gguf or hub id); overrides the pipeline's")
    ap.add_argument("--concepts", help="concept set (shipped name or built JSON); overrides the pipeline's")
    ap.add_argument("--concept-adapter", help="concept-stage LoRA adapter folder")
    ap.add_argument("--label-adapter", help="label-stage LoRA adapter folder")
    ap.add_argument("--direct-adapter", help="direct-coding LoRA adapter folder (enables direct-ft)")
    ap.add_argument("--k", type=int, help="k of the main CEC row and of the leaf ablation (default: the pipeline's)")
    ap.add_argument("--systems", nargs="+", help="systems to run (default: all the inputs allow)")
    ap.add_argument("--out", required=True, help="Markdown table to write")
    ap.add_argument("--json", help="results JSON to write (default: --out with .json)")
    ap.add_argument("--cache", help="per-note score cache JSONL (default: beside --json, JSON_STEM.scores.jsonl)")
    ap.add_argument("--title", help="heading of the Markdown file")
    ap.add_argument("--max-notes", type=int, help="only the first N notes of test and of dev")
    add_runtime_args(ap)
    ap.add_argument("--batch-tokens", type=int, default=4096, help="question tokens per forward batch")
    return ap.parse_args(argv)


def main(argv=None, prog: str | None = None) -> dict:
    args = parse_args(argv, prog)
    if args.max_notes is not None and args.max_notes < 1:
        raise ConfigError("--max-notes must be at least 1")
    if args.k is not None and args.k < 1:
        raise ConfigError("--k must be at least 1")
    if args.batch_tokens < 1:
        raise ConfigError("--batch-tokens must be at least 1")
    device, dtype = runtime(args)
    json_path = Path(args.json) if args.json else Path(args.out).with_suffix(".json")
    for output in (args.out, json_path):
        prepare_output(output)
    test, dev = read_notes(args.test), read_notes(args.dev)
    if args.max_notes:
        test, dev = test[: args.max_notes], dev[: args.max_notes]
    train = read_notes(args.train) if args.train else None
    setup = resolve_setup(args.pipeline, model=args.model, concepts=args.concepts,
                          concept_adapter=args.concept_adapter, label_adapter=args.label_adapter,
                          direct_adapter=args.direct_adapter)
    if args.k is not None:
        setup.config.k = args.k
    systems, left_out = parse_systems(args.systems, setup.config.k, setup.adapters["direct"] is not None,
                                      train is not None)
    for line in left_out:
        print(f"[cec] {line}", file=sys.stderr)
    cache = Path(args.cache) if args.cache else default_cache_path(json_path)
    sources = {"test": args.test, "dev": args.dev, "train": args.train, "pipeline": args.pipeline,
               "max_notes": args.max_notes}
    payload = run_evaluation(setup, systems, test, dev, train, cache, device=device, dtype=dtype,
                             batch_tokens=args.batch_tokens, sources=sources)
    table = render_markdown(payload, args.title)
    atomic_write_text(args.out, table)
    atomic_write_json(json_path, payload)
    print(table)
    return payload


def cli() -> None:
    """The `cec-evaluate` command."""
    with user_errors("cec-evaluate"):
        main(prog="cec-evaluate")
