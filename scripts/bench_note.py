"""Benchmark: notes coded end to end by a pipeline with the model loaded (issue 8's per-note speed figure).

Prints one JSON object: per note the seconds of each stage, its prefix and question tokens; then the median.
Notes come from a JSONL file ({"id", "text"} per line; the first --n) or, by default, the shipped example note.
Run it on a quiet machine: on a shared CPU other processes' load shows up directly in the seconds.

    .venv/bin/python scripts/bench_note.py --notes runs/codiesp/dev.jsonl --n 3 [--pipeline DIR] [--threads 2]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", help="pipeline folder (default: the shipped one)")
    ap.add_argument("--notes", help="notes JSONL (default: the shipped example note)")
    ap.add_argument("--n", type=int, default=3, help="notes to code (default: %(default)s)")
    ap.add_argument("--label-adapter", help="another code-stage adapter (its layout comes with it)")
    ap.add_argument("--label-layout", choices=("paper", "compact"), help="override the pipeline's code-stage layout")
    ap.add_argument("--label-stages", nargs="+", choices=("llm", "linear"),
                    help="stage-2 variants timed in this one run on the same loaded model (default: the pipeline's)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", metavar="FILE", help="also write the JSON here")
    args = ap.parse_args(argv)

    from cec.data import read_notes
    from cec.coding.pipeline import RESOURCES, CECPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.notes:
        notes = read_notes(args.notes)[: args.n]
    else:
        notes = [{"id": "example", "text": (RESOURCES / "example_note.txt").read_text()}]
    from cec.coding.pipeline import DEFAULT_PIPELINE, PipelineConfig, resolve_beside, share_base
    from cec.engine.weights import load_model

    t = time.perf_counter()
    config, folder = PipelineConfig.load(args.pipeline or DEFAULT_PIPELINE)
    model, tokenizer = load_model(resolve_beside(folder, config.base_model), device=args.device)
    load_s = time.perf_counter() - t
    out = {"pipeline": str(args.pipeline or "default"), "device": args.device, "threads": torch.get_num_threads(),
           "load_seconds": round(load_s, 2), "stages": {}}
    for stage in args.label_stages or [config.label_stage]:
        pipe = CECPipeline.load(folder, model=share_base(model), tokenizer=tokenizer, label_stage=stage,
                                threshold=config.threshold, label_layout=args.label_layout,
                                label_adapter=str(Path(args.label_adapter).resolve()) if args.label_adapter else None)
        pipe.code_note(notes[0]["text"][:400], "warmup")  # first-call allocations out of the figures
        rows = []
        for note in notes:
            pipe.label_scorer.stats = type(pipe.label_scorer.stats)()  # a linear stage asks no code questions
            r = pipe.code_note(note["text"], note.get("id"))
            cs, ls = pipe.concept_scorer.stats, pipe.label_scorer.stats
            rows.append({"id": note.get("id"), "seconds": r.timing["seconds"],
                         "concept_seconds": r.timing["concept_seconds"], "label_seconds": r.timing["label_seconds"],
                         "prefix_tokens": cs.prefix_tokens, "concept_questions": cs.questions,
                         "concept_question_tokens": cs.question_tokens, "code_questions": ls.questions,
                         "code_question_tokens": ls.question_tokens})
            print(json.dumps({"stage": stage, **rows[-1]}), file=sys.stderr, flush=True)
        out["stages"][stage] = {"label_layout": pipe.layout, "notes": rows,
                                "median_seconds": statistics.median(r["seconds"] for r in rows),
                                "median_concept_seconds": statistics.median(r["concept_seconds"] for r in rows),
                                "median_label_seconds": statistics.median(r["label_seconds"] for r in rows)}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        from cec.io import atomic_write_text

        atomic_write_text(args.json, text + "\n")


if __name__ == "__main__":
    main()
