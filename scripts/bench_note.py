"""Benchmark: notes coded end to end by a pipeline with the model loaded (issue 8's per-note speed figure), set
against the matrix-product floor of the same work measured in the same run (issue 18).

Prints one JSON object: per note the seconds of each stage, its prefix and question tokens; then the median.
Per note also: the FLOPs of the forward calls the scorers made (linears 2*rows*in*out at the token counts they
ran, padding included; attention 4*heads*head_dim per visible query-key pair, over the cached prefix and within
the own tokens; the yes/no head), the achieved GFLOP/s, and floor_seconds: the same matrix products of the
model's own shapes timed alone in this run, attention priced at their rate; over_floor = seconds / floor_seconds.
Its breakdown splits the note's wall time into exclusive parts (linears, attention partials and merge, norms,
the head, Python glue; timers around the engine's modules and functions, none changed) with the gap to the
floor per part; forward_calls gives each model call's rate; batching compares the floor of other ways to batch
the same questions. Notes come from a JSONL file ({"id", "text"} per line; the first --n) or, by default, the
shipped example note. On a shared CPU other processes' load shows up directly in the seconds: loadavg says how
loaded the machine was; compare the ratios, which are measured under the same load.

    .venv/bin/python scripts/bench_note.py --notes runs/codiesp/dev.jsonl --n 3 [--pipeline DIR] [--threads 2]
"""
import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cec.cli import add_scoring_args, positive_int  # noqa: E402
from cec.engine import attention, model as engine_model  # noqa: E402
from cec.coding import stages  # noqa: E402
from cec.engine.scorer import batches_by_length  # noqa: E402
from profile_prefix import Call, ForwardLog, floor_seconds, matmul_seconds  # noqa: E402 -- scripts/, beside this file

# exclusive-time parts by the class name of the module whose forward they are
MODULE_PARTS = {"RMSNorm": "norms", "MLP": "mlp activation", "Attention": "attention glue (rope, reshapes)",
                "Block": "residuals, row gather", "Embedding": "embedding", "Transformer": "forward glue"}
# functions of the engine's modules, looked up by name where the engine calls them
FUNCTION_PARTS = {"attend": "attention (own keys)", "cascade_attend": "cascade glue",
                  "attend_with_lse": None, "merge_partials": "merge partials"}  # None: named by call order
ATTENTION_PARTS = ("attention (own keys)", "cascade glue", "prefix partial", "suffix partial", "merge partials",
                   "attention with lse")


class Breakdown:
    """Exclusive wall time by part: each wrapped callable's time minus that of the wrapped calls inside it, so the
    parts add up to the outermost wrapped call. Parts inside a model call are named after its mode (prefill or
    questions). Wrappers replace attributes for the benchmark's run only (close() puts them back); no engine code
    changes. CPU timing: on CUDA these would be launch times."""

    def __init__(self):
        self.seconds = Counter()
        self.frames = []  # per open call: [seconds its wrapped calls took, Counter of their parts, its part]
        self.mode = None
        self.forwards = []  # inclusive seconds of each model forward, in call order
        self.count = 0  # timed calls
        self._undo = []

    def wrap(self, owner, attr: str, part, mode_of=None):
        """Time owner.attr under `part`: a name, or a function (parent's part, parent's children so far) -> name.
        mode_of(args, kwargs) marks a model forward and names its mode."""
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        own = attr in vars(owner)

        def timed(*args, **kwargs):
            parent = self.frames[-1] if self.frames else [0.0, Counter(), ""]
            name = part(parent[2], parent[1]) if callable(part) else part
            parent[1][name] += 1
            self.count += 1
            outer = self.mode
            if mode_of is not None:
                self.mode = mode_of(args, kwargs)
            label = f"{self.mode}: {name}" if self.mode else name
            self.frames.append([0.0, Counter(), name])
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                self.seconds[label] += dt - self.frames.pop()[0]
                if self.frames:
                    self.frames[-1][0] += dt
                if mode_of is not None:
                    self.forwards.append(dt)
                    self.mode = outer

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, fn if own else None))

    def close(self):
        for owner, attr, fn in reversed(self._undo):
            if fn is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, fn)
        self._undo.clear()

    def reset(self):
        self.seconds.clear()
        self.forwards.clear()
        self.count = 0


def lse_part(parent: str, siblings: Counter) -> str:
    """attend_with_lse: in cascade attention the first call is the prefix partial, the second the suffix
    partial; under attend (soft-capped attention) it is that attention."""
    if parent == "attention (own keys)":
        return "attention with lse"
    return ("prefix partial", "suffix partial")[(siblings["prefix partial"] + siblings["suffix partial"]) % 2]


def forward_mode(args, kwargs) -> str:
    plan = kwargs.get("plan")
    prefix = plan.prefix if plan is not None else kwargs.get("prefix")
    return "questions" if prefix is not None else "prefill"


def instrument(pipe) -> Breakdown:
    """Timers around what coding a note runs: the pipeline, its scorers and heads, each model's modules, and the
    engine's attention functions."""
    bd = Breakdown()
    bd.wrap(pipe, "code_note", "pipeline: tokenize, prompts, stage 2")
    models = {id(m): m for m in (pipe.concept_model, pipe.label_model)}.values()
    for scorer in {id(s): s for s in (pipe.concept_scorer, pipe.label_scorer)}.values():
        for attr in ("score", "score_cached", "encode_prefix"):
            bd.wrap(scorer, attr, "scorer: batching, padding, Python")
        bd.wrap(scorer.head, "scores", "yes/no head")
    for m in models:
        bd.wrap(m, "prefill", "prefill loop")
        bd.wrap(m, "new_cache", "cache allocation")
        for attr in ("plan", "_rope"):
            bd.wrap(m, attr, "plan: rope tables, masks")
        for name, mod in m.named_modules():
            if isinstance(mod, nn.Linear):
                bd.wrap(mod, "forward", f"linear {name.rsplit('.', 1)[-1]}")
            elif type(mod).__name__ in MODULE_PARTS:
                bd.wrap(mod, "forward", MODULE_PARTS[type(mod).__name__],
                        forward_mode if mod is m else None)
    for fn_name, part in FUNCTION_PARTS.items():
        for namespace in (engine_model, attention):
            if fn_name in vars(namespace):
                bd.wrap(namespace, fn_name, part or lse_part)
    return bd


def wrapper_cost() -> float:
    """Seconds one Breakdown wrapper adds to a call (measured on an empty function)."""
    class Box:
        @staticmethod
        def f():
            return None
    bd, n = Breakdown(), 20000
    t = time.perf_counter()
    for _ in range(n):
        Box.f()
    bare = time.perf_counter() - t
    bd.wrap(Box, "f", "x")
    t = time.perf_counter()
    for _ in range(n):
        Box.f()
    cost = (time.perf_counter() - t - bare) / n
    bd.close()
    return max(cost, 0.0)


def group_of(label: str) -> str:
    part = label.split(": ", 1)[-1]
    if part.startswith("linear "):
        return "linears"
    if part in ATTENTION_PARTS:
        return "attention"
    return "head" if part == "yes/no head" else "other"


def floors(log: ForwardLog, mm_seconds: dict, calls=None, rate: float | None = None) -> dict:
    """Floor seconds of these calls (default: all): their linears and head timed alone, their attention at `rate`
    FLOP/s (default: the rate of their own linears)."""
    shapes, f = log.matmuls(calls=calls), log.flops(calls=calls)
    linears = floor_seconds(Counter({s: c for s, c in shapes.items() if s[0] != "head"}), mm_seconds)
    head = floor_seconds(Counter({s: c for s, c in shapes.items() if s[0] == "head"}), mm_seconds)
    rate = rate or f["linear"] / linears
    out = {"linears": linears, "attention": (f["attention_cached"] + f["attention_own"]) / rate, "head": head}
    return {**out, "total": sum(out.values()), "rate": rate}


def analyse(log: ForwardLog, parts: dict, forwards: list, seconds: float, mm_seconds: dict) -> dict:
    """FLOPs, the floor and where the time above it goes, for one note."""
    f, fl = log.flops(), floors(log, mm_seconds)
    rate = fl["rate"]  # FLOP/s of the model's own matrix products, timed alone
    groups = Counter()
    for label, s in parts.items():
        groups[group_of(label)] += s
    # the same floor at the rate the linears reached inside this very run: the load the note saw, no other
    in_run = f["total"] / (f["linear"] / groups["linears"])
    by_mode = {}
    for mode in ("prefill", "questions"):
        mf = floors(log, mm_seconds, [c for c in log.calls if c.kind == mode], rate)
        mine = {k: s for k, s in parts.items() if k.startswith(mode + ": ")}
        lin = sum(s for k, s in mine.items() if group_of(k) == "linears")
        att = sum(s for k, s in mine.items() if group_of(k) == "attention")
        by_mode[mode] = {"calls": sum(c.kind == mode for c in log.calls), "seconds": round(sum(mine.values()), 3),
                         "linear_seconds": round(lin, 3), "linear_floor_seconds": round(mf["linears"], 3),
                         "attention_seconds": round(att, 3), "attention_floor_seconds": round(mf["attention"], 3),
                         "other_seconds": round(sum(mine.values()) - lin - att, 3)}
    gap = {"linears": groups["linears"] - fl["linears"], "attention": groups["attention"] - fl["attention"],
           "head": groups["head"] - fl["head"], "other (no FLOPs: norms, glue, Python)": groups["other"]}
    total_gap = seconds - fl["total"]
    calls = []
    if len(forwards) == len(log.calls):
        for c, dt in zip(log.calls, forwards):
            cf, cfloor = log.flops(calls=[c]), floors(log, mm_seconds, [c], rate)
            calls.append({"kind": c.kind, "rows": c.batch, "tokens": c.tokens, "seconds": round(dt, 4),
                          "gflop_per_s": round((cf["total"] - cf["head"]) / dt / 1e9, 1),
                          "over_floor": round(dt / (cfloor["total"] - cfloor["head"]), 2)})
    return {"flops": f["total"], "flops_by_part": f, "useful_flops": log.flops(useful=True)["total"],
            "achieved_gflop_per_s": round(f["total"] / seconds / 1e9, 1),
            "matmul_gflop_per_s": round(rate / 1e9, 1), "floor_seconds": round(fl["total"], 3),
            "over_floor": round(seconds / fl["total"], 3),
            "floor_in_run_seconds": round(in_run, 3), "over_floor_in_run": round(seconds / in_run, 3),
            "breakdown": {"parts": {k: round(s, 4) for k, s in sorted(parts.items(), key=lambda kv: -kv[1])},
                          "groups": {k: round(s, 3) for k, s in groups.items()},
                          "floor_seconds": {k: round(fl[k], 4) for k in ("linears", "attention", "head")},
                          "by_mode": by_mode,
                          "gap_seconds": round(total_gap, 3),
                          "gap_share": {k: round(v / total_gap, 3) for k, v in gap.items()} if total_gap > 0 else {},
                          "gap_by_group_seconds": {k: round(v, 3) for k, v in gap.items()}},
            "forward_calls": calls}


def batchings(log: ForwardLog, batch_tokens: int, max_batch: int) -> dict:
    """The question calls of a note re-batched from their real lengths: as run, with up to 25% padding, and
    with any padding (token budget only): plan name -> the calls it would make."""
    groups = {}  # one scorer's questions share their start (the prefix length) and head
    for c in log.calls:
        if c.kind == "questions" and c.last is not None:
            groups.setdefault((c.start, c.head_rows), []).extend(int(x) + 1 for x in c.last.tolist())
    plans = {"as run": [c for c in log.calls if c.kind == "questions"]}
    for name, padding in (("padding up to 25%", 0.25), ("any padding", 1.0)):
        plans[name] = []
        for (start, head_rows), lengths in groups.items():
            for idx in batches_by_length(lengths, batch_tokens, max_batch, max_padding=padding):
                plans[name].append(Call(len(idx), max(lengths[i] for i in idx), start,
                                        torch.tensor([lengths[i] - 1 for i in idx]), head_rows, "questions"))
    return plans


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", help="pipeline folder (default: the shipped one)")
    ap.add_argument("--notes", help="notes JSONL (default: the shipped example note)")
    ap.add_argument("--n", type=int, default=3, help="notes to code (default: %(default)s)")
    ap.add_argument("--label-adapter", help="another code-stage adapter (its layout comes with it)")
    ap.add_argument("--label-layout", choices=stages.LABEL_LAYOUTS, help="override the pipeline's code-stage layout")
    ap.add_argument("--label-stages", nargs="+", choices=("llm", "linear"),
                    help="stage-2 variants timed in this one run on the same loaded model (default: the pipeline's)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=positive_int, default=1, help="code each note this many times, report the fastest")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", metavar="FILE", help="also write the JSON here")
    add_scoring_args(ap)
    args = ap.parse_args(argv)

    from cec.data import read_notes
    from cec.coding.output import timing_json
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
           "load_seconds": round(load_s, 2), "cpus": os.cpu_count(),
           "loadavg_before": [round(x, 2) for x in os.getloadavg()], "timer_cost_us": round(wrapper_cost() * 1e6, 2),
           "stages": {}}
    for stage in args.label_stages or [config.label_stage]:
        pipe = CECPipeline.load(folder, model=share_base(model), tokenizer=tokenizer, label_stage=stage,
                                attention=args.attention, compile=args.compile,
                                threshold=config.threshold, label_layout=args.label_layout,
                                label_adapter=str(Path(args.label_adapter).resolve()) if args.label_adapter else None)
        pipe.code_note(notes[0]["text"][:400], "warmup")  # first-call allocations out of the figures
        # label first: in a linear stage both scorers have the one model, and only the concept scorer runs
        heads = {pipe.label_model: pipe.label_scorer.head.rows.shape[0],
                 pipe.concept_model: pipe.concept_scorer.head.rows.shape[0]}
        bd = instrument(pipe)
        rows, runs = [], []
        try:
            for note in notes:
                best = None
                for _ in range(args.repeats):  # the fastest of the codings, with its own breakdown
                    pipe.label_scorer.stats = type(pipe.label_scorer.stats)()  # a linear stage asks no code questions
                    for scorer in (pipe.concept_scorer, pipe.label_scorer):  # every coding prefills, as a new note does
                        scorer.forget()
                    bd.reset()
                    with ForwardLog(heads) as log:
                        r = pipe.code_note(note["text"], note.get("id"))
                    if best is None or r.timing["seconds"] < best[0].timing["seconds"]:
                        best = (r, (log, dict(bd.seconds), list(bd.forwards), bd.count))
                r = best[0]
                runs.append(best[1])
                cs, ls, tm = pipe.concept_scorer.stats, pipe.label_scorer.stats, timing_json(r.timing)
                rows.append({"id": note.get("id"), "seconds": tm["seconds"],
                             "concept_seconds": tm["concept_seconds"], "label_seconds": tm["label_seconds"],
                             "prefix_tokens": cs.prefix_tokens, "concept_questions": cs.questions,
                             "concept_question_tokens": cs.question_tokens, "code_questions": ls.questions,
                             "code_question_tokens": ls.question_tokens,
                             # first batches of shapes new to the process (--attention flex, --compile): compiling,
                             # inside "seconds"; --repeats 2 keeps a coding without it
                             "compile_seconds": round(cs.compile_seconds + ls.compile_seconds, 3)})
                print(json.dumps({"stage": stage, **rows[-1]}), file=sys.stderr, flush=True)
        finally:
            bd.close()
        # the floor: every distinct matrix product these notes ran (and the first one's re-batchings would run),
        # timed alone now, under the load the notes had
        scorer = pipe.concept_scorer
        plans = batchings(runs[0][0], scorer.batch_tokens, scorer.max_batch)
        shapes = Counter()
        for log, *_ in runs:
            shapes.update(log.matmuls())
        for calls in plans.values():
            shapes.update(runs[0][0].matmuls(calls=calls))
        passes = [matmul_seconds(shapes, model.device, model.dtype) for _ in range(2)]  # load comes and goes
        mm = {s: min(p[s] for p in passes) for s in passes[0]}
        for row, (log, parts, forwards, count) in zip(rows, runs):
            row.update(analyse(log, parts, forwards, row["seconds"], mm))
            row["timer_overhead_seconds"] = round(count * out["timer_cost_us"] * 1e-6, 4)
        log0, asked = runs[0][0], [c for c in rows[0]["forward_calls"] if c["kind"] == "questions"]
        rate = floors(log0, mm)["rate"]
        out_plans = {name: {"calls": len(calls), "tokens": sum(c.batch * c.tokens for c in calls),
                            "flops": log0.flops(calls=calls)["total"],
                            "floor_seconds": round(floors(log0, mm, calls, rate)["total"], 3)}
                     for name, calls in plans.items()}
        if asked:
            out_plans["as run"]["seconds"] = round(sum(c["seconds"] for c in asked), 3)
        stage_out = {"label_layout": pipe.layout, "notes": rows,
                     "median_seconds": statistics.median(r["seconds"] for r in rows),
                     "median_concept_seconds": statistics.median(r["concept_seconds"] for r in rows),
                     "median_label_seconds": statistics.median(r["label_seconds"] for r in rows),
                     "median_over_floor": statistics.median(r["over_floor"] for r in rows),
                     "question_batchings_first_note": out_plans}
        out["stages"][stage] = stage_out
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        from cec.io import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return out


if __name__ == "__main__":
    main()
