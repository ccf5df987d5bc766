"""Benchmark: a long prompt through the embedded Gemma 3 270M, ours vs transformers, plus load times.

Prints one JSON object. Load times: first load into an empty cache (GGUF read, dequantized, converted and
written) and the cached load. The forward pass returns logits for the last token only, on both sides
(transformers: logits_to_keep=1); runs alternate between the two models so background load hits both alike.

    .venv/bin/python scripts/bench_forward.py [--tokens 2000] [--repeats 3] [--device cpu] [--dtype float32]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cec.cli import add_runtime_args, runtime, user_errors  # noqa: E402

TEXT = (
    "The patient is a 68-year-old woman with hypertension, type 2 diabetes mellitus, chronic kidney disease "
    "stage 3 and atrial fibrillation on warfarin, admitted with three days of dyspnea, orthopnea and leg "
    "swelling. Blood pressure 168/94 mmHg, heart rate 112, SpO2 89% on room air. BNP 1850, creatinine 2.1 "
    "mg/dL, INR 3.2. Chest radiograph: cardiomegaly, bilateral effusions. Echocardiogram: ejection fraction "
    "35%, moderate mitral regurgitation. Treated with furosemide 40 mg IV twice daily and metoprolol; "
    "warfarin held, then resumed. Discharge diagnoses: acute on chronic systolic heart failure, atrial "
    "fibrillation with rapid ventricular response, acute kidney injury on chronic kidney disease. ")


def prompt_ids(tok, n: int) -> list[int]:
    ids = tok.encode(TEXT)
    body = tok.encode(TEXT, add_bos=False)
    while len(ids) < n:
        ids += body
    return ids[:n]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    add_runtime_args(ap)
    ap.add_argument("--skip-hf", action="store_true", help="time ours only")
    args = ap.parse_args()
    device, dtype = runtime(args)

    import cec.engine.weights as W

    with tempfile.TemporaryDirectory() as cache:  # first load: an empty cache, so the GGUF is converted
        os.environ["CEC_CACHE"] = cache
        load_first, _ = timed(lambda: W.load_model(args.model, device=device, dtype=dtype))
        load_cached, (model, tok) = timed(lambda: W.load_model(args.model, device=device, dtype=dtype))
        folder = W.resolve(args.model)
        ids = torch.tensor([prompt_ids(tok, args.tokens)], device=device)

        def sync(x):
            if ids.device.type == "cuda":
                torch.cuda.synchronize()
            return x

        def ours():
            with torch.no_grad():
                last = torch.tensor([ids.shape[1] - 1], device=ids.device)  # final layer: that row only
                return sync(model.logits(model(ids, last=last))[0, -1].float())

        result = {"model": args.model, "tokens": args.tokens, "device": str(device), "dtype": str(model.dtype),
                  "threads": torch.get_num_threads(), "load_first_s": round(load_first, 2),
                  "load_cached_s": round(load_cached, 2)}
        runs = {"ours": []}
        fns = {"ours": ours}
        if not args.skip_hf:
            from transformers import AutoModelForCausalLM

            load_hf, hf = timed(lambda: AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=model.dtype, attn_implementation="sdpa").to(device).eval())
            result["load_hf_from_converted_folder_s"] = round(load_hf, 2)

            def transformers():
                with torch.no_grad():
                    return sync(hf(ids, logits_to_keep=1).logits[0, -1].float())

            runs["transformers"] = []
            fns["transformers"] = transformers
        for name, fn in fns.items():  # warm-up
            timed(fn)
        last = {}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                dt, last[name] = timed(fn)
                runs[name].append(round(dt, 3))
        for name, r in runs.items():
            result[f"{name}_forward_s"] = statistics.median(r)
            result[f"{name}_runs_s"] = r
        if "transformers" in last:
            result["max_abs_diff_last_logits"] = (last["ours"] - last["transformers"]).abs().max().item()
            result["ours_over_transformers"] = round(result["ours_forward_s"] / result["transformers_forward_s"], 3)
        result["loadavg_1min"] = round(os.getloadavg()[0], 2)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    with user_errors("bench_forward.py"):
        main()
