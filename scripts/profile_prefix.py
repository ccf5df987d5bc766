"""Profile one note's yes/no scoring: naive re-encoding vs the shared prefix, ours and HF's. Prints JSON.

  python scripts/profile_prefix.py                         # embedded Gemma 3 270M, CPU fp32, CodiEsp-like load
  python scripts/profile_prefix.py --config llama3-8b --device cuda --dtype bf16 \
      --prefix-tokens 3000 --questions 375 --question-tokens 25 --naive-questions 48

Modes: naive (ours, prefix re-encoded with every question, batched), shared (ours: prefix once, cascade
attention), hf_naive and hf_reuse (transformers: full sequences; or prefill once, copy and expand the cache to
each batch, as HF documents). Synthetic token ids with a common question start, like the paper's prompts.
--naive-questions times the two naive modes on a sample spread over the questions and scales their seconds to all.

FLOPs are counted from the forward calls the shared mode made (ForwardLog): linears 2*rows*in*out, attention
4*heads*head_dim per visible query-key pair, the yes/no head. The achieved rate is set against a square matmul
timed in the same run (measured_peak_tflops, flop_floor_ratio) and against the same matrix products timed alone
(floor_seconds: the linears at their own shapes, attention at the peak; over_floor = seconds / floor_seconds).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cec.engine.scorer import PrefixScorer, batches_by_length, head_for, score_naive  # noqa: E402
from cec.cli import user_errors  # noqa: E402
from cec.engine.config import ModelConfig  # noqa: E402
from cec.errors import ConfigError  # noqa: E402
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
    # the same two families at toy size: the CPU dry run of scripts/device_check.sh and the tests
    "tiny-llama": {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 2048,
                   "tie_word_embeddings": False},
    "tiny-gemma": {"model_type": "gemma", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 192,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32,
                   "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048},
}
YES, NO = [9, 10], [11]


@dataclass
class Call:
    """One forward call: `batch` rows of `tokens` tokens (padding included) whose first token sits at position
    `start` (the keys before it are cached: the prefix, or earlier prefill chunks)."""
    batch: int
    tokens: int
    start: int
    last: torch.Tensor | None  # [B] the one row per sequence whose final-layer output is wanted; None = all
    head_rows: int  # answer rows of the yes/no head the kept rows go through (0: none)
    kind: str  # "questions" (against a shared prefix), "prefill" (into a cache) or "plain"


def visible_keys(start: int, n: int, window: int | None) -> int:
    """Sum over query positions start..start+n-1 of the keys each sees: causal from position 0, in the window."""
    def upto(m):  # the sum over positions 0..m-1
        if window is None or m <= window:
            return m * (m + 1) // 2
        return window * (window + 1) // 2 + (m - window) * window
    return upto(start + n) - upto(start)


class ForwardLog:
    """Forward calls of one or more Transformers (twins of one config), recorded by a pre-hook (shapes and ints,
    no device sync), to count their FLOPs and list the matrix products they ran:
    `with ForwardLog({model: answer_rows_of_its_head}) as log: ...; log.flops()`. A call with `last` rows is
    counted as scored by that model's head. Masks beyond causal and sliding window (hidden prefix spans, packed
    training) are not subtracted."""

    def __init__(self, head_rows: dict):
        models = list(head_rows)
        self.config = models[0].config
        self.calls: list[Call] = []
        self._head_rows = {id(m): n for m, n in head_rows.items()}
        self._signature = inspect.signature(type(models[0]).forward)
        self._handles = [m.register_forward_pre_hook(self._record, with_kwargs=True) for m in models]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _record(self, module, args, kwargs):
        a = self._signature.bind(module, *args, **kwargs).arguments
        plan = a.get("plan")  # a ForwardPlan holds the cache or prefix and the kept rows; else the arguments do
        cache, prefix = (plan.cache, plan.prefix) if plan is not None else (a.get("cache"), a.get("prefix"))
        last = plan.final.rows if plan is not None else a.get("last")
        start = cache.length if cache is not None else prefix.length if prefix is not None else 0
        b, t = a["input_ids"].shape
        kind = "questions" if prefix is not None else "prefill" if cache is not None else "plain"
        self.calls.append(Call(b, t, start, last, self._head_rows[id(module)], kind))

    def _lengths(self, call: Call, useful: bool) -> list[int]:
        if useful and call.last is not None:  # right padding: the real tokens end at `last`
            return [int(x) + 1 for x in call.last.tolist()]
        return [call.tokens] * call.batch

    def matmuls(self, useful: bool = False, calls=None) -> Counter:
        """(name, rows, in, out) -> how many times that product ran; useful: without the padding tokens."""
        cfg = self.config
        h, ffn = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        out = Counter()
        for c in self.calls if calls is None else calls:
            tokens = sum(self._lengths(c, useful))
            for i in range(cfg.num_layers):
                rows = c.batch if c.last is not None and i == cfg.num_layers - 1 else tokens
                for name, m, k, n in (("q_proj", rows, h, q), ("k_proj", tokens, h, kv), ("v_proj", tokens, h, kv),
                                      ("o_proj", rows, q, h), ("gate_proj", rows, h, ffn), ("up_proj", rows, h, ffn),
                                      ("down_proj", rows, ffn, h)):
                    out[(name, m, k, n)] += 1
            if c.last is not None and c.head_rows:  # the scored rows go through the yes/no head
                out[("head", c.batch, h, c.head_rows)] += 1
        return out

    def attention_pairs(self, useful: bool = False, calls=None) -> tuple[int, int]:
        """Visible (query, key) pairs over all layers: (keys cached before the call, keys of the call's own rows)."""
        cfg = self.config
        cached = own = 0
        for c in self.calls if calls is None else calls:
            lengths = self._lengths(c, useful)
            last = c.last.tolist() if c.last is not None else None
            for i in range(cfg.num_layers):
                w = cfg.sliding_window if cfg.is_sliding(i) else None
                if last is not None and i == cfg.num_layers - 1:  # one query per row, at its last token
                    spans = [(j, 1) for j in last]
                else:
                    spans = [(0, n) for n in lengths]
                for j, n in spans:
                    total, mine = visible_keys(c.start + j, n, w), visible_keys(j, n, w)
                    cached += total - mine
                    own += mine
        return cached, own

    def flops(self, useful: bool = False, calls=None) -> dict:
        cfg = self.config
        mm = self.matmuls(useful, calls)
        cached, own = self.attention_pairs(useful, calls)
        per_pair = 4 * cfg.num_heads * cfg.head_dim  # q.k and p.v: two multiply-adds of head_dim per query head
        f = {"linear": sum(2 * m * k * n * c for (name, m, k, n), c in mm.items() if name != "head"),
             "attention_cached": per_pair * cached, "attention_own": per_pair * own,
             "head": sum(2 * m * k * n * c for (name, m, k, n), c in mm.items() if name == "head")}
        f["total"] = sum(f.values())
        return f


def matmul_seconds(shapes, device, dtype, reps: int | None = None) -> dict:
    """Seconds of one product F.linear(x [rows, in], W [out, in]) (as nn.Linear runs it) for each distinct
    (rows, in, out) of `shapes` ((name, rows, in, out) keys), timed alone: on CPU the best of `reps` calls, on
    CUDA the mean of `reps` calls synchronized once."""
    cuda = device.type == "cuda"
    reps = reps or (20 if cuda else 3)
    weights, out = {}, {}
    for m, k, n in sorted({s[1:] for s in shapes}):
        if (k, n) not in weights:
            weights[(k, n)] = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
        w, x = weights[(k, n)], torch.randn(m, k, device=device, dtype=dtype)
        F.linear(x, w)
        sync(device)
        if cuda:
            t = time.perf_counter()
            for _ in range(reps):
                F.linear(x, w)
            sync(device)
            out[(m, k, n)] = (time.perf_counter() - t) / reps
        else:
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                F.linear(x, w)
                best = min(best, time.perf_counter() - t)
            out[(m, k, n)] = best
    return out


def floor_seconds(shapes: Counter, seconds: dict) -> float:
    return sum(c * seconds[s[1:]] for s, c in shapes.items())


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


def hf_model_for(model: Transformer, config_name: str | None = None):
    """An HF model sharing our weights (no copy)."""
    import transformers as tf

    cfg = model.config
    if config_name in RANDOM_CONFIGS:
        raw = dict(RANDOM_CONFIGS[config_name])
        hf_cfg = {"llama": tf.LlamaConfig, "gemma": tf.GemmaConfig}[raw.pop("model_type")](**raw)
    elif cfg.family == "gemma3_text":
        hf_cfg = tf.Gemma3TextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
            layer_types=cfg.layer_types, max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                             "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}})
    else:
        raise ConfigError(f"no HF twin for a {cfg.family} model loaded from a file (use --config)")
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


def measured_peak_tflops(device, dtype) -> float:
    """A square matmul's rate: 8192^3 on CUDA (mean of 10 after 3 warm-ups), 1024^3 on CPU (best of 5)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    sync(device)
    if cuda:
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        sync(device)
        return 10 * 2 * n ** 3 / (time.perf_counter() - t) / 1e12
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


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


def spread_sample(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k is 0 or at least n)."""
    if not k or k >= n:
        return list(range(n))
    return sorted({int(i * n / k) for i in range(k)})


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
    ap.add_argument("--naive-questions", type=int, default=0,
                    help="time naive and hf_naive on this many questions and scale to all (0: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--modes", default="naive,shared,hf_naive,hf_reuse")
    ap.add_argument("--head-rows", type=int, default=400)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - {"naive", "shared", "hf_naive", "hf_reuse"})
    if unknown:
        raise ConfigError(f"--modes: unknown {', '.join(unknown)}; known: naive, shared, hf_naive, hf_reuse")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    t = time.perf_counter()
    model = load(args, device, dtype)
    load_s = time.perf_counter() - t
    prefix, questions = workload(args, model.config.vocab_size)
    head = head_for(model, YES, NO)
    sample = spread_sample(len(questions), args.naive_questions)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "model": args.config or args.model, "dtype": str(dtype).split(".")[-1], "torch": torch.__version__,
           "threads": torch.get_num_threads(), "load_seconds": load_s,
           "prefix_tokens": len(prefix), "questions": len(questions),
           "mean_question_tokens": sum(map(len, questions)) / len(questions), "modes": {}}
    hf = None
    if any(m.startswith("hf") for m in modes):
        try:
            hf = hf_model_for(model, args.config)
        except (ImportError, ConfigError) as e:  # no transformers here, or no twin for this model
            res["hf_skipped"] = f"{type(e).__name__}: {e}"
            modes = [m for m in modes if not m.startswith("hf")]
    subset = [questions[i] for i in sample]
    naive_batch = args.batch_size * (len(prefix) + args.question_tokens)
    runners = {  # mode -> (questions it scores, the run)
        "naive": (sample, lambda: score_naive(model, head, prefix, subset, batch_tokens=naive_batch)),
        "shared": (None, lambda: PrefixScorer(model, head, batch_tokens=args.batch_tokens).score(prefix, questions)),
        "hf_naive": (sample, lambda: run_hf_naive(hf, prefix, subset, naive_batch, device)),
        "hf_reuse": (None, lambda: run_hf_reuse(hf, prefix, questions, args.batch_size, device)),
    }
    n_q_tokens = sum(map(len, questions))
    tokens = {"naive": len(questions) * len(prefix) + n_q_tokens, "hf_naive": len(questions) * len(prefix) + n_q_tokens,
              "shared": len(prefix) + n_q_tokens, "hf_reuse": len(prefix) + n_q_tokens}
    if device.type == "cuda":  # warm up kernels and the allocator
        PrefixScorer(model, head).score(prefix[:64], questions[:8])
        if hf is not None:
            run_hf_naive(hf, prefix[:64], questions[:4], 1 << 20, device)
    scores = {}
    for mode in modes:
        idx, run = runners[mode]
        try:
            if mode == "shared":  # its forward calls are what the FLOPs are counted from
                with ForwardLog({model: head.rows.shape[0]}) as log:
                    s, dt, mem = timed(run, device)
            else:
                s, dt, mem = timed(run, device)
        except Exception as e:  # noqa: BLE001 -- one mode failing (out of memory, an HF API change) must not end the run
            res["modes"][mode] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{mode}: {res['modes'][mode]['error']}", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        timed_q = len(questions) if idx is None else len(idx)
        scores[mode] = (idx, s)
        res["modes"][mode] = {"seconds": dt * len(questions) / timed_q, "tokens": tokens[mode],
                              "questions_per_second": timed_q / dt, "peak_memory_mb": mem / 2 ** 20}
        if timed_q < len(questions):
            res["modes"][mode].update(questions_timed=timed_q, seconds_timed=dt)
        print(f"{mode}: {dt:.2f} s for {timed_q} questions", file=sys.stderr)
    m = res["modes"]
    if "shared" in scores:
        shared = scores["shared"][1]
        for other in ("naive", "hf_naive", "hf_reuse"):
            if other in scores:
                res[f"speedup_vs_{other}"] = m[other]["seconds"] / m["shared"]["seconds"]
        dps = [(torch.sigmoid(s) - torch.sigmoid(shared if idx is None else shared[idx])).abs().max().item()
               for mode, (idx, s) in scores.items() if mode != "shared"]
        res["max_abs_dp"] = max(dps, default=0.0)
        f = log.flops()
        peak = measured_peak_tflops(device, dtype)
        shapes = log.matmuls()
        linear_floor = floor_seconds(shapes, matmul_seconds(shapes, device, dtype))
        attention = f["attention_cached"] + f["attention_own"]
        res.update(flops=f["total"], flops_by_part=f, useful_flops=log.flops(useful=True)["total"],
                   forward_calls=len(log.calls), achieved_tflops=f["total"] / m["shared"]["seconds"] / 1e12,
                   measured_peak_tflops=peak)
        res["flop_floor_ratio"] = res["achieved_tflops"] / peak
        res["floor_seconds"] = linear_floor + attention / (peak * 1e12)
        res["over_floor"] = m["shared"]["seconds"] / res["floor_seconds"]
    if args.head_rows:
        res["head"] = head_section(model, device, args.head_rows)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        atomic_write_json(args.json, res)


if __name__ == "__main__":
    with user_errors("profile_prefix"):
        main()
