"""Soak test of batch coding: N generated notes coded by `infer.py --notes IN --out OUT` (a real subprocess), with
its peak memory at note 100 and at the last note, and notes per second. Prints JSON; exits 1 when the peak grew
by more than --max-growth between the two, or the output is not one whole line per note.

    python scripts/soak_batch.py                         # 1000 notes, a tiny random pipeline built in a temp folder
    python scripts/soak_batch.py --pipeline DIR -n 200   # a real pipeline (Gemma 3 270M: ~30 s a note on 2 cores)
    python scripts/soak_batch.py --model gemma3-270m     # the tiny concept set on another base model

Peak memory is the child's VmHWM (/proc/PID/status, Linux), read when the output first holds --mark lines, and
its ru_maxrss when it exits. Notes per second are counted from note --mark to the last (the steady state, model
loading excluded) and over the whole run. The notes are synthetic (a discharge-summary template filled with
random findings; nothing copied from a dataset), of similar length throughout, so a growing peak means a leak.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# code: (description, parent (code, description), parent-level concepts, leaf-level concepts, findings in notes)
CODES = {
    "I10": ("Essential (primary) hypertension", ("I10-I1A", "Hypertensive diseases"),
            ["high blood pressure", "cardiovascular risk"], ["on lisinopril", "elevated systolic pressure"],
            ["blood pressure has been poorly controlled at home", "he ran out of amlodipine two weeks ago"]),
    "E11.9": ("Type 2 diabetes mellitus without complications", ("E11", "Type 2 diabetes mellitus"),
              ["high blood glucose", "insulin resistance"], ["on metformin", "elevated hemoglobin A1c"],
              ["fingerstick glucose was 245 on arrival", "she reports polyuria and polydipsia"]),
    "N18.9": ("Chronic kidney disease, unspecified", ("N18", "Chronic kidney disease (CKD)"),
              ["kidney injury", "reduced renal function"], ["low filtration rate", "rising creatinine"],
              ["creatinine is 2.1, baseline 1.8", "estimated GFR of 38"]),
    "J18.9": ("Pneumonia, unspecified organism", ("J18", "Pneumonia, unspecified organism"),
              ["lung infection", "respiratory infection"], ["productive cough", "infiltrate on chest x-ray"],
              ["chest x-ray shows a right lower lobe infiltrate", "crackles at the right base"]),
    "R50.9": ("Fever, unspecified", ("R50", "Fever of other and unknown origin"),
              ["fever", "systemic inflammation"], ["night sweats", "chills"],
              ["temperature spiked to 38.9 overnight", "he reports chills and night sweats"]),
    "I50.9": ("Heart failure, unspecified", ("I50", "Heart failure"),
              ["heart failure", "fluid overload"], ["leg swelling", "reduced ejection fraction"],
              ["bilateral pitting edema to the knees", "echo shows an ejection fraction of 30 percent"]),
    "J44.9": ("Chronic obstructive pulmonary disease, unspecified", ("J44", "Other chronic obstructive "
                                                                     "pulmonary disease"),
              ["chronic lung disease", "airflow obstruction"], ["wheezing", "long smoking history"],
              ["diffuse expiratory wheezes", "40 pack-year smoking history"]),
    "N39.0": ("Urinary tract infection, site not specified", ("N39", "Other disorders of urinary system"),
              ["urinary infection", "bladder inflammation"], ["painful urination", "positive urine culture"],
              ["urinalysis with many white cells and nitrites", "she reports dysuria and frequency"]),
}
COMPLAINTS = ["shortness of breath", "chest pain", "fever", "weakness", "abdominal pain", "cough", "dizziness"]
DURATIONS = ["two days", "three days", "one week", "several hours", "ten days"]
EXAMS = ["Lungs clear to auscultation.", "Regular rate and rhythm, no murmurs.", "Abdomen soft, non-tender.",
         "No focal neurological deficits.", "Mild jugular venous distension."]
PLANS = ["Continue home medications.", "Follow up with primary care in one week.", "Repeat labs in the morning.",
         "Physical therapy evaluation.", "Dietary counselling given."]
NOTE = """Chief Complaint:
{complaint}

History of Present Illness:
{age}-year-old {sex} presenting with {complaint} for {duration}. {findings}

Past Medical History:
{history}

Physical Exam:
BP {sbp}/{dbp} mmHg, HR {hr}, T {temp} C, SpO2 {spo2}% on room air. {exam}

Assessment and Plan:
{assessment} {plan}
"""


# -- notes ------------------------------------------------------------------------------------------------
def generate_notes(n: int, seed: int = 0) -> list[dict]:
    """n synthetic notes {"id", "text", "labels"}, 1 to 3 codes of CODES each, about 120 words."""
    rng = random.Random(seed)
    notes = []
    for i in range(n):
        labels = rng.sample(list(CODES), rng.randint(1, 3))
        findings = [f for c in labels for f in rng.sample(CODES[c][4], 2)]
        rng.shuffle(findings)
        text = NOTE.format(
            complaint=rng.choice(COMPLAINTS), age=rng.randint(25, 92), sex=rng.choice(["man", "woman"]),
            duration=rng.choice(DURATIONS), findings=" ".join(f[0].upper() + f[1:] + "." for f in findings),
            history=", ".join(CODES[c][0].split(",")[0].lower() for c in labels) + ".",
            sbp=rng.randint(95, 190), dbp=rng.randint(55, 110), hr=rng.randint(52, 128),
            temp=round(rng.uniform(36.1, 39.4), 1), spo2=rng.randint(86, 100), exam=" ".join(rng.sample(EXAMS, 2)),
            assessment=" ".join(f"{CODES[c][0]}." for c in labels), plan=" ".join(rng.sample(PLANS, 2)))
        notes.append({"id": f"soak-{i:06d}", "text": text, "labels": labels})
    return notes


# -- a tiny random pipeline --------------------------------------------------------------------------------
def tiny_concept_set():
    from cec.coding.concepts import Concept, ConceptSet

    texts, levels, ids = [], {}, {"parent": {}, "leaf": {}}
    for code, (_, _, parents, leaves, _) in CODES.items():
        for level, phrases in (("parent", parents), ("leaf", leaves)):
            for p in phrases:
                if p not in levels:
                    texts.append(p)
                    levels[p] = level
            ids[level][code] = [texts.index(p) for p in phrases]
    concepts = [Concept(i, t, levels[t]) for i, t in enumerate(texts)]
    return ConceptSet("soak-tiny", "icd10cm", list(CODES), {c: v[0] for c, v in CODES.items()},
                      {c: v[1] for c, v in CODES.items()}, concepts, ids["parent"], ids["leaf"])


def tiny_tokenizer(vocab_size: int = 1024):
    """Byte-level BPE learned from the prompt templates, the concept set and generated notes."""
    from cec.coding import prompts
    from cec.engine.tokenizer import train_byte_bpe

    templates = [prompts.CONCEPT_INSTRUCTION, prompts.CONCEPT_QUESTION, prompts.LABEL_INSTRUCTION,
                 prompts.LABEL_CONCEPTS_INTRO, prompts.LABEL_CONCEPT_LINE, prompts.LABEL_QUESTION,
                 prompts.DIRECT_INSTRUCTION, prompts.DIRECT_QUESTION]
    words = [" ".join(v[2] + v[3] + [v[0]]) for v in CODES.values()]
    corpus = templates * 10 + words * 10 + [n["text"] for n in generate_notes(100, seed=12345)]
    return train_byte_bpe(corpus, vocab_size, source="soak-tiny")


def tiny_model_config(vocab_size: int, **over) -> dict:
    """config.json of a tiny Gemma 3 (2 layers, hidden 64): one sliding and one global layer."""
    return {"model_type": "gemma3_text", "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
            "query_pre_attn_scalar": 16, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
            "sliding_window": 64, "sliding_window_pattern": 2, "max_position_embeddings": 8192,
            "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, **over}


def write_tiny_model(folder: str | Path, seed: int = 0, tokenizer=None, **config_over) -> Path:
    """An HF folder (config.json, model.safetensors, tokenizer files) of a tiny random Gemma 3, built with our
    engine (no transformers needed)."""
    import torch
    from safetensors.torch import save

    from cec.engine.config import ModelConfig
    from cec.io import atomic_write_bytes, atomic_write_json
    from cec.engine.model import Transformer

    folder = Path(folder)
    tok = tokenizer or tiny_tokenizer()
    config = tiny_model_config(tok.vocab_size, **config_over)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    atomic_write_bytes(folder / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_json(folder / "config.json", config)
    tok.save(folder)
    return folder


def write_tiny_pipeline(folder: str | Path, seed: int = 0, max_note_tokens: int = 256, tokenizer=None) -> Path:
    """A pipeline folder: model/ (tiny random Gemma 3), concepts.json (CODES), cec_pipeline.json (absolute
    paths); no adapters."""
    from cec.coding.pipeline import PipelineConfig

    folder = Path(folder).resolve()
    write_tiny_model(folder / "model", seed=seed, tokenizer=tokenizer)
    tiny_concept_set().save(folder / "concepts.json")
    PipelineConfig(base_model=str(folder / "model"), concept_set=str(folder / "concepts.json"),
                   max_note_tokens=max_note_tokens).save(folder)
    return folder


# -- the soak run ------------------------------------------------------------------------------------------
def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class LineCounter:
    """Counts the newlines appended to a file since the last call (the batch output grows by whole lines)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.lines = path, 0, 0

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.lines
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return self.lines


def soak(args) -> dict:
    from cec.data import write_notes

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cec-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    pipeline = Path(args.pipeline) if args.pipeline else write_tiny_pipeline(work / "pipeline", seed=args.seed)
    notes = generate_notes(args.notes, seed=args.seed)
    notes_path, out = work / "notes.jsonl", work / "preds.jsonl"
    write_notes(notes_path, notes)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "infer.py"), "--pipeline", str(pipeline), "--notes", str(notes_path),
           "--out", str(out), "--device", "cpu"]
    if args.model:
        cmd += ["--model", args.model]
    if args.concepts:
        cmd += ["--concepts", args.concepts]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    print(f"[soak] coding {len(notes)} notes with {pipeline} in {work}", file=sys.stderr, flush=True)
    counter = LineCounter(out)
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr_tail: list[bytes] = []

    def drain():  # keep the child's stderr (progress bar) from filling the pipe; remember its end
        for line in iter(lambda: child.stderr.readline(), b""):
            stderr_tail.append(line)
            del stderr_tail[:-20]

    threading.Thread(target=drain, daemon=True).start()
    at_mark, last_rss = None, 0
    while True:
        done = counter.poll()
        if at_mark is None and done >= args.mark:
            at_mark = {"note": done, "seconds": time.perf_counter() - t0,
                       "peak_kb": proc_status_kb(child.pid, "VmHWM"), "rss_kb": proc_status_kb(child.pid, "VmRSS")}
        last_rss = proc_status_kb(child.pid, "VmRSS") or last_rss
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid == child.pid:
            break
        time.sleep(args.poll)
    elapsed = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    done = counter.poll()
    result = {"notes": len(notes), "coded": done, "pipeline": str(pipeline), "model": args.model,
              "threads": args.threads, "seconds": round(elapsed, 2),
              "notes_per_s_overall": round(done / elapsed, 2)}
    if child.returncode != 0:
        tail = b"".join(stderr_tail).decode("utf-8", "replace").strip().splitlines()[-3:]
        result["error"] = f"infer.py exited with {child.returncode}: {' | '.join(tail)}"
        return result
    peak_end_kb = usage.ru_maxrss  # kilobytes on Linux
    result["lines_ok"] = check_output(out, notes)
    if at_mark is None or not at_mark["peak_kb"]:
        result["error"] = f"could not sample the child's memory at note {args.mark} (not Linux, or too few notes)"
        return result
    steady = (done - at_mark["note"]) / max(elapsed - at_mark["seconds"], 1e-9)
    growth = (peak_end_kb - at_mark["peak_kb"]) / at_mark["peak_kb"]
    result.update({
        "mark": at_mark["note"],
        "peak_rss_mb_at_mark": round(at_mark["peak_kb"] / 1024, 1),
        "rss_mb_at_mark": round((at_mark["rss_kb"] or 0) / 1024, 1),
        "peak_rss_mb_at_end": round(peak_end_kb / 1024, 1),
        "rss_mb_before_exit": round(last_rss / 1024, 1),
        "peak_growth": round(growth, 4),
        "max_growth": args.max_growth,
        "notes_per_s": round(steady, 2),
        "seconds_to_mark": round(at_mark["seconds"], 2),
    })
    return result


def check_output(out: Path, notes: list[dict]) -> bool:
    """One whole JSON line per note, in input order, none twice."""
    raw = out.read_bytes()
    if not raw.endswith(b"\n"):
        return False
    ids = [json.loads(line)["id"] for line in raw.decode("utf-8").split("\n")[:-1]]
    return ids == [n["id"] for n in notes]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("-n", "--notes", type=int, default=1000, help="notes to generate and code (default: %(default)s)")
    ap.add_argument("--mark", type=int, default=100, help="note at which the first peak is read (default: %(default)s)")
    ap.add_argument("--pipeline", metavar="DIR", help="pipeline folder (default: a tiny random one, built here)")
    ap.add_argument("--model", help="base model for infer.py --model (default: the pipeline's)")
    ap.add_argument("--concepts", metavar="SET", help="concept set for infer.py --concepts (default: the pipeline's)")
    ap.add_argument("--workdir", metavar="DIR", help="where notes, predictions (and the tiny pipeline) go "
                                                     "(default: a new temporary folder)")
    ap.add_argument("--max-growth", type=float, default=0.10,
                    help="largest allowed growth of the peak RSS from --mark to the end (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of infer.py (default: %(default)s)")
    ap.add_argument("--poll", type=float, default=0.02, help="seconds between samples (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.notes < args.mark or args.mark < 1:
        ap.error(f"need --notes >= --mark >= 1, got --notes {args.notes} --mark {args.mark}")
    result = soak(args)
    ok = "error" not in result and result["lines_ok"] and result["peak_growth"] <= args.max_growth
    result["ok"] = bool(ok)
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
