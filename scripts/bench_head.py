"""Time the yes/no head against lm_head + log-softmax over the full vocabulary, on random weights of a real
model's shapes; print JSON (--json FILE also writes it).

CUDA (default Llama-3-8B shapes, 128256 x 4096, bf16): the Triton kernel. CPU (default Gemma 3 270M shapes,
262144 x 640, fp32): the PyTorch reference. Both heads compute the same score, which the JSON checks
(max_abs_diff)."""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cec.cli import add_runtime_args, runtime, user_errors  # noqa: E402
from cec.errors import ConfigError  # noqa: E402
from cec.engine.heads import YesNoHead, rms_norm, use_kernel, yes_no_scores  # noqa: E402
from cec.io import atomic_write_json  # noqa: E402

FAMILIES = {"llama": (True, 0.0, None), "gemma": (False, 1.0, None), "gemma2": (False, 1.0, 30.0)}
YES_IDS, NO_IDS = [9642, 7566, 9891], [2822, 2360, 912]  # three spellings per side, as in the pipeline


def full_vocab_scores(hidden, norm_weight, out_weight, yes, no, eps, offset, softcap, llama_norm):
    """What a plain HF pipeline does: final norm, lm_head over the whole vocabulary, cap, log-softmax."""
    logits = rms_norm(hidden, norm_weight, eps, offset, llama_norm) @ out_weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logp = torch.log_softmax(logits.float(), -1)
    return torch.logsumexp(logp[:, yes], -1) - torch.logsumexp(logp[:, no], -1)


def time_ms(fn, device: str, iters: int, warmup: int = 3) -> float:
    """Median time of one call in milliseconds: on CUDA the GPU time (triton's do_bench, which clears the L2
    cache before each call and so hides the host's launch cost), on CPU the wall time."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=max(iters, 20), return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def call_us(fn, calls: int = 200) -> float:
    """Wall time per call of back-to-back calls, synchronized once at the end: the cost a caller sees when
    the host, not the GPU, is the bottleneck (Python and the kernel launch)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def peak_mb(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runtime_args(p)
    p.add_argument("--vocab", type=int, default=None, help="default 128256 on CUDA, 262144 on CPU")
    p.add_argument("--hidden", type=int, default=None, help="default 4096 on CUDA, 640 on CPU")
    p.add_argument("--rows", type=int, default=375, help="hidden rows scored per call (questions in a batch)")
    p.add_argument("--family", default=None, choices=list(FAMILIES), help="norm and cap flavour")
    p.add_argument("--iters", type=int, default=None, help="timed calls on CPU; milliseconds of timing on CUDA")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    device, dtype = runtime(args)
    cuda = device.type == "cuda"
    vocab = args.vocab or (128256 if cuda else 262144)
    hidden_size = args.hidden or (4096 if cuda else 640)
    family = args.family or ("llama" if cuda else "gemma")
    iters = args.iters or (50 if cuda else 5)
    if vocab <= max(YES_IDS + NO_IDS) or args.rows < 1 or hidden_size < 1:
        raise ConfigError(f"--vocab must exceed {max(YES_IDS + NO_IDS)}; --rows and --hidden must be positive")
    llama_norm, offset, softcap = FAMILIES[family]
    eps = 1e-5

    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.rows, hidden_size, generator=g, device=device).to(dtype)
    norm_weight = (1.0 + 0.1 * torch.randn(hidden_size, generator=g, device=device)).to(dtype)
    out_weight = (0.02 * torch.randn(vocab, hidden_size, generator=g, device=device)).to(dtype)
    head = YesNoHead(norm_weight, out_weight, YES_IDS, NO_IDS, eps=eps, norm_offset=offset, softcap=softcap,
                     llama_norm=llama_norm)
    kw = dict(eps=eps, norm_offset=offset, softcap=softcap, llama_norm=llama_norm)

    def run_head():
        return head.scores(hidden)

    def run_head_gather():  # the answer rows gathered from the full matrix on every call
        return yes_no_scores(hidden, norm_weight, out_weight, YES_IDS, NO_IDS, **kw)

    def run_full():
        return full_vocab_scores(hidden, norm_weight, out_weight, YES_IDS, NO_IDS, eps, offset, softcap,
                                 llama_norm)

    with torch.no_grad():
        got, want = run_head(), run_full()
        results = {}
        for name, fn in (("head", run_head), ("head_gather", run_head_gather), ("full_vocab", run_full)):
            results[name] = {"ms": round(time_ms(fn, device.type, iters), 4), "peak_mb": peak_mb(fn, device.type),
                             "call_us": round(call_us(fn), 1) if cuda else None}
    flops_full = 2 * args.rows * hidden_size * vocab
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "head_impl": "triton" if use_kernel(hidden, norm_weight, head.rows) else "torch reference",
        "dtype": str(dtype).removeprefix("torch."),
        "family": family,
        "rows": args.rows, "hidden": hidden_size, "vocab": vocab,
        "answer_ids": {"yes": len(YES_IDS), "no": len(NO_IDS)},
        "iters": iters,
        **{f"{k}_ms": v["ms"] for k, v in results.items()},
        **({f"{k}_peak_mb": v["peak_mb"] for k, v in results.items()} if cuda else {}),
        **({f"{k}_call_us": v["call_us"] for k, v in results.items()} if cuda else {}),
        "speedup_vs_full_vocab": round(results["full_vocab"]["ms"] / results["head"]["ms"], 2),
        "full_vocab_tflops": round(flops_full / (results["full_vocab"]["ms"] * 1e-3) / 1e12, 2),
        "head_gb_per_s": round((hidden.numel() * hidden.element_size() + head.rows.numel()
                                * head.rows.element_size()) / (results["head"]["ms"] * 1e-3) / 1e9, 3),
        "max_abs_diff": float((got - want).abs().max()),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    with user_errors("bench_head.py"):
        main()
