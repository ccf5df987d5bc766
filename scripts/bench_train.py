"""Benchmark: LoRA training throughput (question-answer pairs per second), packed shared-prefix sequences
against one sequence per question, with the losses of both compared question by question.

Gemma 3 270M (embedded) with the concept stage's LoRA (r=32, alpha=32, all linear layers; dropout 0 so both
ways compute the same function), on CodiEsp-length notes (about 500 prefix tokens with the Fig. 3
instruction) with 40 concept questions each. Packed: one forward and backward pass over
[prefix | q1 | ... | q40] per note. Naive: one forward and backward pass over [prefix | q] per question, timed on
--naive-questions of them per note (its cost per question does not depend on how many are timed).
Prints one JSON object.

    .venv/bin/python scripts/bench_train.py [--notes 2] [--questions 40] [--naive-questions 8] [--device cpu]
"""
import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cec.cli import add_runtime_args, runtime, user_errors  # noqa: E402
from cec.coding import prompts, stages  # noqa: E402
from cec.engine.scorer import head_for  # noqa: E402
from cec.engine.lora import inject_lora  # noqa: E402
from cec.training.packing import pack_questions, pack_scores  # noqa: E402

CODIESP = ROOT.parent / "shared" / "data" / "codiesp" / "train" / "text_files_en"
FALLBACK = (
    "A 58-year-old man with a history of hypertension and type 2 diabetes presented with fever, productive "
    "cough and right pleuritic chest pain of four days. Temperature 38.9 C, blood pressure 100/60 mmHg, "
    "heart rate 112, oxygen saturation 90% on room air. Crackles at the right base. Leukocytosis of 18,000 "
    "with neutrophilia, C-reactive protein 240 mg/L, creatinine 1.9 mg/dL. Chest X-ray: right lower lobe "
    "consolidation with a small effusion. Blood cultures grew Streptococcus pneumoniae. He received "
    "ceftriaxone and azithromycin, fluids and oxygen, with defervescence on day three; renal function "
    "recovered. ")


def pick_notes(tok, n: int, target: int) -> list[str]:
    """n notes whose Fig. 3 prefix is closest to `target` tokens: CodiEsp when ../shared is there."""
    if CODIESP.is_dir():
        texts = [p.read_text(encoding="utf-8").strip() for p in sorted(CODIESP.glob("*.txt"))[:200]]
        scored = sorted(texts, key=lambda t: abs(len(tok.encode(prompts.concept_prefix(t))) - target))
        return scored[:n]
    text = FALLBACK
    while len(tok.encode(prompts.concept_prefix(text))) < target:
        text += FALLBACK
    return [text] * n


def concept_texts(seed: int) -> list[str]:
    from cec.coding.concepts import load_concept_set

    cs = load_concept_set("codiesp-d50")
    texts = [c.text for c in cs.concepts]
    random.Random(seed).shuffle(texts)
    return texts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--notes", type=int, default=2, help="notes timed each way")
    ap.add_argument("--questions", type=int, default=40, help="concept questions per note")
    ap.add_argument("--naive-questions", type=int, default=8, help="questions per note timed one sequence each")
    ap.add_argument("--repeats", type=int, default=2, help="packed passes per note (naive questions in between)")
    ap.add_argument("--prefix-tokens", type=int, default=500, help="target prefix length (CodiEsp-like)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    add_runtime_args(ap, dtypes=("float32", "bfloat16"))
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from cec.engine.weights import load_model

    device, dtype = runtime(args)
    model, tok = load_model(args.model, device=device, dtype=dtype)
    torch.manual_seed(args.seed)
    inject_lora(model, "all-linear", r=32, alpha=32, dropout=0.0)
    if args.gradient_checkpointing:
        from cec.training.trainer import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model.train()
    yes, no = stages.CONCEPT.answer_ids(tok)
    head = head_for(model, yes, no)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    concepts = concept_texts(args.seed)
    rng = random.Random(args.seed)

    notes = []
    for i, text in enumerate(pick_notes(tok, args.notes, args.prefix_tokens)):
        qs = concepts[i * args.questions: (i + 1) * args.questions]
        prefix, questions = stages.encode(tok, prompts.concept_prefix(text), [prompts.concept_question(c) for c in qs])
        notes.append((prefix, questions, [rng.randint(0, 1) for _ in qs]))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def packed_step(prefix, questions, labels):
        packs, _ = pack_questions(prefix, questions, labels, args.max_tokens)
        losses, tokens = [], 0
        for pack in packs:
            pack = pack.to(device)
            with autocast:
                scores = pack_scores(model, head, pack)
            per_q = F.binary_cross_entropy_with_logits(scores, pack.labels, reduction="none")
            per_q.sum().backward()
            losses += per_q.detach().cpu().tolist()
            tokens += pack.tokens
        return losses, tokens

    def naive_step(prefix, q, y):
        ids = torch.tensor([prefix + q], device=device)
        with autocast:
            score = head.scores(model(ids, final_norm=False)[0, -1:])
        loss = F.binary_cross_entropy_with_logits(score, torch.tensor([float(y)], device=device))
        loss.backward()
        return loss.item(), ids.numel()

    packed_step(*notes[0])  # warm-up: allocator, kernels, caches
    model.zero_grad(set_to_none=True)

    # Packed and naive alternate in small slices (a packed pass, a few naive questions, again), so background
    # load on a shared machine hits both alike; totals and medians are both reported.
    packed_times, naive_times = [], []  # seconds per packed pass of a note / per naive question
    packed_tokens = naive_tokens = 0
    diffs = []
    for prefix, questions, labels in notes:
        todo = list(range(min(args.naive_questions, len(questions))))
        chunk = -(-len(todo) // args.repeats) if todo else 0
        for r in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            ref, tokens = packed_step(prefix, questions, labels)
            model.zero_grad(set_to_none=True)
            sync()
            packed_times.append(time.perf_counter() - t0)
            packed_tokens += tokens
            for j in todo[r * chunk: (r + 1) * chunk]:
                t0 = time.perf_counter()
                loss, tokens = naive_step(prefix, questions[j], labels[j])
                model.zero_grad(set_to_none=True)
                sync()
                naive_times.append(time.perf_counter() - t0)
                diffs.append(abs(loss - ref[j]))
                naive_tokens += tokens

    n_q = sum(len(q) for _, q, _ in notes)
    per_pass = n_q / len(notes)
    packed_s, naive_s = sum(packed_times), sum(naive_times)
    packed_rate = per_pass * len(packed_times) / packed_s
    naive_rate = len(naive_times) / naive_s
    packed_median = per_pass / statistics.median(packed_times)
    naive_median = 1.0 / statistics.median(naive_times)
    print(json.dumps({
        "model": args.model, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "gradient_checkpointing": args.gradient_checkpointing,
        "lora": {"r": 32, "alpha": 32, "targets": "all-linear"},
        "notes": len(notes), "questions_per_note": args.questions, "packed_passes_per_note": args.repeats,
        "prefix_tokens_mean": round(sum(len(p) for p, _, _ in notes) / len(notes), 1),
        "question_tokens_mean": round(sum(len(x) for _, q, _ in notes for x in q) / n_q, 1),
        "packed": {"passes": len(packed_times), "questions": int(per_pass * len(packed_times)),
                   "tokens": packed_tokens, "seconds": round(packed_s, 2), "qa_per_s": round(packed_rate, 3),
                   "qa_per_s_median_pass": round(packed_median, 3),
                   "tokens_per_s": round(packed_tokens / packed_s, 1)},
        "one_sequence_per_question": {"questions": len(naive_times), "tokens": naive_tokens,
                                      "seconds": round(naive_s, 2), "qa_per_s": round(naive_rate, 3),
                                      "qa_per_s_median_question": round(naive_median, 3),
                                      "tokens_per_s": round(naive_tokens / naive_s, 1)},
        "speedup": round(packed_rate / naive_rate, 2),
        "speedup_medians": round(packed_median / naive_median, 2),
        "loss_max_abs_diff": max(diffs) if diffs else None,
    }, indent=1))


if __name__ == "__main__":
    with user_errors("bench_train.py"):
        main()
