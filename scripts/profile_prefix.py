"""Profile one note's yes/no scoring: naive re-encoding vs the shared prefix, ours and HF's. Prints JSON.

  python scripts/profile_prefix.py                         # embedded Gemma 3 270M, CPU fp32, CodiEsp-like load
  python scripts/profile_prefix.py --config llama3-8b --device cuda --dtype bf16 \
      --prefix-tokens 3000 --questions 375 --question-tokens 25

Modes: naive (ours, prefix re-encoded with every question, batched), shared (ours: prefix once, cascade
attention), hf_naive and hf_reuse (transformers: full sequences; or prefill once, copy and expand the cache to
each batch, as HF documents). Synthetic token ids with a common question start, like the paper's prompts.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cec.engine.cache import PrefixScorer, batches_by_length, head_for, score_naive  # noqa: E402
from cec.cli import user_errors  # noqa: E402
from cec.engine.config import ModelConfig  # noqa: E402
from cec.io import atomic_write_json  # noqa: E402
from cec.engine.model import Transformer  # noqa: E402

RANDOM_CONFIGS = {  # real shapes, random weights, for GPU timing
    "llama3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
                  "tie_word_embeddings": False},
    "gemma-7b": {"model_type": "gemma", "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
                 "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
                 "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 8192},
}
YES, NO = [9, 10], [11]


class PeakMemory:
    """Peak memory above the starting point: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss()
            self.stop = False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()
            self.bytes = self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def workload(args, vocab):
    g = torch.Generator().manual_seed(args.seed)
    hi = min(vocab, 32000)
    prefix = torch.randint(100, hi, (args.prefix_tokens,), generator=g).tolist()
    common = torch.randint(100, hi, (args.common_tokens,), generator=g).tolist()
    spread = max(1, args.question_tokens // 4)
    questions = []
    for _ in range(args.questions):
        n = args.question_tokens - args.common_tokens + int(torch.randint(-spread, spread + 1, (1,), generator=g))
        questions.append(common + torch.randint(100, hi, (max(n, 1),), generator=g).tolist())
    return prefix, questions


def hf_model_for(model: Transformer):
    """An HF model sharing our weights (no copy)."""
    import transformers as tf

    cfg = model.config
    if cfg.family == "gemma3_text":
        hf_cfg = tf.Gemma3TextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
            layer_types=cfg.layer_types, max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                             "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}})
    elif cfg.family == "llama":
        hf_cfg = tf.LlamaConfig(**{k: v for k, v in RANDOM_CONFIGS["llama3-8b"].items() if k != "model_type"})
    elif cfg.family == "gemma":
        hf_cfg = tf.GemmaConfig(**{k: v for k, v in RANDOM_CONFIGS["gemma-7b"].items() if k != "model_type"})
    else:
        raise SystemExit(f"no HF twin for {cfg.family}")
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(model.device):  # built for real so its buffers (RoPE, embedding scale) are right
        hf = tf.AutoModelForCausalLM.from_config(hf_cfg, dtype=model.dtype)
    hf.load_state_dict(model.state_dict(), assign=True, strict=False)  # then its weights become ours
    hf.tie_weights()
    return hf.eval()


def hf_last_scores(logits):
    logits = logits.float()
    return torch.logsumexp(logits[:, YES], -1) - torch.logsumexp(logits[:, NO], -1)


@torch.no_grad()
def run_hf_naive(hf, prefix, questions, batch_tokens, device):
    """Full prefix+question per row, last-token logits only. Rows of a batch have equal lengths: HF's
    sliding-window masks count indices, not positions, so padding would shift the window."""
    out = torch.empty(len(questions))
    lengths = [len(prefix) + len(q) for q in questions]
    for idx in batches_by_length(lengths, batch_tokens, 1 << 30, max_padding=0.0):
        ids = torch.tensor([prefix + questions[i] for i in idx], device=device)
        out[torch.tensor(idx)] = hf_last_scores(hf(input_ids=ids, logits_to_keep=1).logits[:, -1]).cpu()
    return out


@torch.no_grad()
def run_hf_reuse(hf, prefix, questions, batch_size, device):
    """Prefill once; per batch (questions of equal length), deep-copy the cache and expand it to the batch."""
    from transformers import DynamicCache

    base = DynamicCache(config=hf.config)
    hf(input_ids=torch.tensor([prefix], device=device), past_key_values=base, use_cache=True, logits_to_keep=1)
    out = torch.empty(len(questions))
    for idx in batches_by_length([len(q) for q in questions], 1 << 30, batch_size, max_padding=0.0):
        ids = torch.tensor([questions[i] for i in idx], device=device)
        cache = copy.deepcopy(base)
        cache.batch_repeat_interleave(len(idx))
        logits = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        out[torch.tensor(idx)] = hf_last_scores(logits).cpu()
    return out


def timed(fn, device, repeats=1):
    best = None
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            sync(device)
            t = time.perf_counter()
            scores = fn()
            sync(device)
            dt = time.perf_counter() - t
        if best is None or dt < best[1]:
            best = (scores, dt, mem.bytes)
    return best


def flops(cfg: ModelConfig, prefix_tokens: int, question_tokens: int, question_lens: list[int]) -> float:
    """Matmul FLOPs of the shared mode: projections and MLP per token, plus attention scores and values."""
    h, hd = cfg.hidden_size, cfg.head_dim
    per_token = 2 * (h * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2) + 3 * h * cfg.intermediate_size)
    dense = per_token * (prefix_tokens + question_tokens) * cfg.num_layers
    attn_prefix = 4 * cfg.num_heads * hd * prefix_tokens * prefix_tokens / 2
    attn_questions = sum(4 * cfg.num_heads * hd * (prefix_tokens + n) * n for n in question_lens)
    return dense + (attn_prefix + attn_questions) * cfg.num_layers


def measured_peak_tflops(device, dtype) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync(device)
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12


def head_section(model: Transformer, device, rows: int):
    """The fused yes/no head against lm_head + softmax over the full vocabulary, for `rows` hidden rows."""
    head = head_for(model, YES, NO)
    hidden = torch.randn(rows, model.config.hidden_size, device=device, dtype=model.dtype)
    reps = 20 if device.type == "cuda" else 3

    def full():
        logp = torch.log_softmax(model.logits(model.model.norm(hidden)).float(), -1)
        return torch.logsumexp(logp[:, YES], -1) - torch.logsumexp(logp[:, NO], -1)

    res = {}
    for name, fn in (("fused_head", lambda: head.scores(hidden)), ("lm_head_softmax", full)):
        fn()
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            out = fn()
        sync(device)
        res[name] = {"seconds": (time.perf_counter() - t) / reps}
        res[name]["scores"] = out
    dp = (torch.sigmoid(res["fused_head"].pop("scores")) - torch.sigmoid(res["lm_head_softmax"].pop("scores")))
    return {"rows": rows, "vocab": model.config.vocab_size, **res,
            "speedup": res["lm_head_softmax"]["seconds"] / res["fused_head"]["seconds"],
            "max_abs_dp": dp.abs().max().item(), "kernel": device.type == "cuda"}


def load(args, device, dtype):
    if args.config:
        cfg = ModelConfig.from_hf(RANDOM_CONFIGS[args.config])
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(cfg).to(dtype)
        with torch.no_grad():  # real-scale random weights, so activations stay sane through 32 layers
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02)
        return model.eval()
    from cec.engine.weights import load_model

    model, _ = load_model(args.model, device=str(device), dtype=dtype)
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", help="embedded name, HF folder, hub id or GGUF file")
    ap.add_argument("--config", choices=sorted(RANDOM_CONFIGS), help="random weights of a real model's shapes")
    ap.add_argument("--prefix-tokens", type=int, default=500)
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--question-tokens", type=int, default=20, help="mean question length")
    ap.add_argument("--common-tokens", type=int, default=12, help="tokens every question starts with")
    ap.add_argument("--batch-size", type=int, default=16, help="questions per batch in the naive and HF modes")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="question tokens per batch in shared mode")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--modes", default="naive,shared,hf_naive,hf_reuse")
    ap.add_argument("--head-rows", type=int, default=400)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    t = time.perf_counter()
    model = load(args, device, dtype)
    load_s = time.perf_counter() - t
    prefix, questions = workload(args, model.config.vocab_size)
    head = head_for(model, YES, NO)
    modes = args.modes.split(",")
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "model": args.config or args.model, "dtype": str(dtype).split(".")[-1], "load_seconds": load_s,
           "prefix_tokens": len(prefix), "questions": len(questions),
           "mean_question_tokens": sum(map(len, questions)) / len(questions), "modes": {}}
    scores = {}
    hf = None
    if any(m.startswith("hf") for m in modes):
        try:
            hf = hf_model_for(model)
        except ImportError:
            modes = [m for m in modes if not m.startswith("hf")]
    runners = {
        "naive": lambda: score_naive(model, head, prefix, questions,
                                     batch_tokens=args.batch_size * (len(prefix) + args.question_tokens)),
        "shared": lambda: PrefixScorer(model, head, batch_tokens=args.batch_tokens).score(prefix, questions),
        "hf_naive": lambda: run_hf_naive(hf, prefix, questions,
                                         args.batch_size * (len(prefix) + args.question_tokens), device),
        "hf_reuse": lambda: run_hf_reuse(hf, prefix, questions, args.batch_size, device),
    }
    n_q_tokens = sum(map(len, questions))
    tokens = {"naive": len(questions) * len(prefix) + n_q_tokens, "hf_naive": len(questions) * len(prefix) + n_q_tokens,
              "shared": len(prefix) + n_q_tokens, "hf_reuse": len(prefix) + n_q_tokens}
    if device.type == "cuda":  # warm up kernels and the allocator
        PrefixScorer(model, head).score(prefix[:64], questions[:8])
    for mode in modes:
        s, dt, mem = timed(runners[mode], device)
        scores[mode] = s
        res["modes"][mode] = {"seconds": dt, "tokens": tokens[mode], "questions_per_second": len(questions) / dt,
                              "peak_memory_mb": mem / 2 ** 20}
        print(f"{mode}: {dt:.2f} s", file=sys.stderr)
    m = res["modes"]
    if "shared" in m:
        for other in ("naive", "hf_naive", "hf_reuse"):
            if other in m:
                res[f"speedup_vs_{other}"] = m[other]["seconds"] / m["shared"]["seconds"]
        p = {k: torch.sigmoid(v) for k, v in scores.items()}
        res["max_abs_dp"] = max(((p[a] - p["shared"]).abs().max().item() for a in p if a != "shared"), default=0.0)
        if device.type == "cuda":
            f = flops(model.config, len(prefix), n_q_tokens, [len(q) for q in questions])
            peak = measured_peak_tflops(device, dtype)
            res["flops"] = f
            res["achieved_tflops"] = f / m["shared"]["seconds"] / 1e12
            res["measured_peak_tflops"] = peak
            res["flop_floor_ratio"] = res["achieved_tflops"] / peak
    if args.head_rows:
        res["head"] = head_section(model, device, args.head_rows)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        atomic_write_json(args.json, res)


if __name__ == "__main__":
    with user_errors("profile_prefix"):
        main()
