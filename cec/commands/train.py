"""Fine-tune a LoRA adapter for one CEC stage on packed shared-prefix sequences.

    python train.py --stage concept --data train.jsonl --dev dev.jsonl --concepts codiesp-d50 --out runs/concept
    python train.py --stage label   --data train.jsonl --concepts codiesp-d50 --out runs/label
    torchrun --nproc_per_node 2 train.py --stage concept ...        (data parallel: gloo on CPU, nccl on CUDA)

Stages (paper Sec. 3.3, 3.4, Table 2): `concept` answers "is concept c relevant to the note" (Fig. 3), `label`
answers "does the patient have code y" given concept answers (Fig. 4), `direct` asks about code descriptions.
Defaults follow the paper's Appendix A: concept and direct r=32, alpha=32, dropout 0.05 on all linear layers;
label alpha=128 on k_proj and v_proj; gradient accumulation 4. One optimizer step takes --grad-accum notes per
process, each note with all its questions (so one step sees tens of question-answer pairs, not one).
The run folder gets the adapter (adapter_config.json + adapter_model.safetensors, PEFT's format; cec_adapter.json),
checkpoints/step-N/ for --resume, and train_log.jsonl (loss per step, dev loss/AUC/accuracy).

The label stage shows each code question concept answers: pseudo answers from the gold codes (the paper, App. C;
the default), or with --concept-answers predicted --concept-adapter DIR the concept model's own answers, every
concept of every training note scored first (kept in the run folder, concept_scores.jsonl) and the concepts
shown chosen as inference chooses them (cec.training.concept_answers); cec_adapter.json records which.
The concept stage's negatives are random (the paper); --related-negatives and --confused-negatives add harder
ones (concepts of codes near the true ones in the ICD tree, and a concept adapter's own false positives on the
note: cec.training.hard_negatives).

Notes files must be UTF-8, as JSON requires (a line that is not is an error naming the file and line). Bad input
(a missing or malformed file, an unknown code, weights or a checkpoint of another model) is one line on stderr and
exit status 2. A run killed at any point resumes from its last checkpoint with --resume and ends with the same
adapter; a loss that is not finite stops the run and names the last good checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from cec.cli import add_runtime_args, runtime, user_errors
from cec.coding import negation, stages
from cec.coding.concepts import load_concept_set
from cec.coding.pipeline import SAMPLING, PipelineConfig
from cec.data import read_notes
from cec.engine.lora import META_FILE, WEIGHTS_FILE, inject_lora, load_adapter
from cec.engine.weights import load_model
from cec.errors import ConfigError, DataError
from cec.evaluation.systems import adapter_hash
from cec.training.concept_answers import CONCEPT_ANSWERS, SCORES_FILE, PredictedAnswers, score_notes
from cec.training.checkpoint import latest_checkpoints
from cec.training.examples import ExampleOptions, build_examples, check_labels
from cec.training.hard_negatives import HardNegatives
from cec.training.trainer import TrainConfig, Trainer


def parse_args(argv=None, prog: str = "train.py") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n\n")[1:]))
    g = ap.add_argument_group("what to train")
    g.add_argument("--stage", required=True, choices=stages.NAMES, help="which model of the pipeline")
    g.add_argument("--data", required=True, metavar="JSONL",
                   help='training notes, one {"id", "text", "labels": [code, ...]} object per line')
    g.add_argument("--dev", metavar="JSONL", help="dev notes for evaluation during training (optional)")
    g.add_argument("--concepts", required=True, metavar="SET",
                   help="a built concept set: a shipped name (mimic3-50, mimic3-rare50, codiesp-d50) or a path")
    g.add_argument("--model", default="gemma3-270m",
                   help="base model: embedded name (gemma3-270m), HF folder, .gguf file or hub id "
                        "(default: %(default)s)")
    g.add_argument("--out", required=True, metavar="DIR", help="run folder: adapter, checkpoints, train_log.jsonl")
    g.add_argument("--negation", choices=negation.MODES, default="off",
                   help="on: train on the notes as a pipeline with negation on reads them, their negated, past and "
                        "family clauses blanked (cec.coding.negation); give it notes whose labels a coder would "
                        "assign from what is left (scripts/negation_gold.py --coder-notes) (default: %(default)s)")
    g.add_argument("--drop-unknown-codes", action="store_true",
                   help="ignore note labels that are not in the concept set (default: they are an error)")

    g = ap.add_argument_group("optimization")
    g.add_argument("--steps", type=int, help="optimizer steps (default: concept 500, label 2000, direct 100)")
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of AdamW (default: %(default)s)")
    g.add_argument("--warmup", type=int, help="linear warmup steps (default: 5%% of --steps)")
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear",
                   help="decay after warmup, to 0 at the last step (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=4,
                   help="notes per process per optimizer step (default: %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=4096,
                   help="longest packed sequence; a note's questions beyond it go to further sequences that "
                        "restate the note, and a note too long for it loses its tail (default: %(default)s)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block in the backward pass: less memory, the cost of one more forward pass")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of LoRA init, data order and sampling (default: %(default)s)")

    # option names never abbreviate a torchrun option (--r, --m would make torchrun's parser fail)
    g = ap.add_argument_group("LoRA (defaults per stage: the paper's Appendix A)")
    g.add_argument("--lora-r", dest="r", type=int, help="rank (default: 32)")
    g.add_argument("--lora-alpha", dest="alpha", type=float,
                   help="scaling numerator (default: concept/direct 32, label 128)")
    g.add_argument("--lora-dropout", dest="dropout", type=float, help="dropout on the LoRA input (default: 0.05)")
    g.add_argument("--lora-targets", dest="targets", help="comma-separated module names, or all-linear "
                                     "(default: concept/direct all-linear, label k_proj,v_proj)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--init-adapter", metavar="DIR",
                   help="start from this adapter's weights (its rank, alpha and targets; --lora-dropout still applies), "
                        "e.g. to continue training or to adapt it to another prompt layout")

    g = ap.add_argument_group("examples (paper Sec. 3.3-3.4, App. C)")
    g.add_argument("--neg-ratio", type=float, default=1.0,
                   help="concept/direct: negatives sampled per positive (default: %(default)s)")
    g.add_argument("--min-negatives", type=int, default=5,
                   help="concept/direct: at least this many negatives per note (default: %(default)s)")
    g.add_argument("--related-negatives", type=float, default=0.0, metavar="R",
                   help="concept: R more negatives per positive from the concepts of false codes that share an ICD "
                        "ancestor with a true code, the closest first (category, block, chapter) (default: 0)")
    g.add_argument("--confused-negatives", type=float, default=0.0, metavar="R",
                   help="concept: R more negatives per positive from the concepts --confused-from answers Yes to "
                        "(P >= 0.5) on the note though none of its codes has them (default: 0)")
    g.add_argument("--confused-from", metavar="DIR",
                   help="concept, --confused-negatives: the concept-stage adapter whose false positives are drawn; "
                        "its scores are kept in the run folder (concept_scores.jsonl) and reused by later runs")
    g.add_argument("--label-k", dest="k", type=int, default=5,
                   help="label: concepts of the asked code's set (default: %(default)s)")
    g.add_argument("--label-m", dest="m", type=int, default=2,
                   help="label: concepts from the opposite pseudo set (default: %(default)s)")
    g.add_argument("--false-ratio", type=float, default=1.0,
                   help="label: false codes asked per true code (default: %(default)s)")
    g.add_argument("--min-false", type=int, default=2,
                   help="label: at least this many false codes per note (default: %(default)s)")
    g.add_argument("--max-questions", type=int, help="at most this many questions per note (random subset)")
    g.add_argument("--label-layout", choices=stages.LABEL_LAYOUTS, default="paper",
                   help="label: 'paper' = Fig. 4 verbatim; 'compact' = the code-independent text once in the shared "
                        "prefix, one short line per concept answer (about 3x fewer tokens per code question at "
                        "inference); 'compact-probs' = compact, each answer with the concept model's probability, "
                        "'Yes (0.93)' (needs --concept-answers predicted); the adapter records it and the pipeline "
                        "follows (default: %(default)s)")
    g.add_argument("--concept-answers", choices=CONCEPT_ANSWERS,
                   help="label: the concept answers its questions show: 'pseudo' = from the gold codes (the paper, "
                        "App. C); 'predicted' = the --concept-adapter's own answers on each training note, the "
                        "concepts chosen as inference chooses them (default: pseudo)")
    g.add_argument("--concept-adapter", metavar="DIR",
                   help="label, --concept-answers predicted: the concept-stage adapter whose answers are shown; its "
                        "scores are kept in the run folder (concept_scores.jsonl) and reused by later runs")
    g.add_argument("--label-sampling", choices=SAMPLING,
                   help="label, --concept-answers predicted: which own concepts a question shows, as the pipeline's "
                        "sampling: 'top' = the highest-scoring, 'random' = a random sample (default: top)")
    g.add_argument("--concept-threshold", type=float,
                   help="label, --concept-answers predicted: a concept is answered Yes when its probability is at "
                        "least this (default: 0.5, the pipeline's)")

    g = ap.add_argument_group("evaluation, checkpoints, run")
    g.add_argument("--eval-every", type=int, default=50, help="dev evaluation every N steps, and at the end "
                                                              "(default: %(default)s; 0 = only at the end)")
    g.add_argument("--dev-notes", type=int, default=64, help="evaluate on the first N dev notes (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=50,
                   help="checkpoint every N steps, and at the end (default: %(default)s)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default: %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out (same data order, optimizer and RNG state)")
    g.add_argument("--stop-at", type=int, metavar="STEP",
                   help="stop after this step (checkpointed); finish later with --resume")
    add_runtime_args(g, dtypes=("float32", "bfloat16"))  # on CUDA the forward runs under bfloat16 autocast
    g.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the final adapter file (checkpoints are always float32) (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    for key, value in asdict(stages.get(args.stage).train_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = round(0.05 * args.steps)
    return args


def check_concept_answers(args) -> None:
    """--concept-answers and the flags of its predicted variant: label stage only, and consistent."""
    predicted_flags = {"--concept-adapter": args.concept_adapter, "--label-sampling": args.label_sampling,
                       "--concept-threshold": args.concept_threshold}
    if args.stage != "label":
        given = [name for name, v in {"--concept-answers": args.concept_answers, **predicted_flags}.items()
                 if v is not None]
        if given:
            raise ConfigError(f"{given[0]} is for --stage label, not --stage {args.stage}")
        return
    args.concept_answers = args.concept_answers or "pseudo"
    if args.concept_answers == "pseudo":
        given = [name for name, v in predicted_flags.items() if v is not None]
        if given:
            raise ConfigError(f"{given[0]} is for --concept-answers predicted (this run shows pseudo answers)")
        if stages.get("label", args.label_layout).shows_probabilities:
            raise ConfigError(f"--label-layout {args.label_layout} shows the concept model's probabilities: train it "
                              "with --concept-answers predicted --concept-adapter DIR (pseudo answers have none)")
        return
    if not args.concept_adapter:
        raise ConfigError("--concept-answers predicted needs --concept-adapter DIR (a concept-stage adapter)")
    if not Path(args.concept_adapter).is_dir():
        raise ConfigError(f"--concept-adapter {args.concept_adapter}: no such folder")
    args.label_sampling = args.label_sampling or "top"
    args.concept_threshold = 0.5 if args.concept_threshold is None else args.concept_threshold
    if not 0 <= args.concept_threshold <= 1:
        raise ConfigError(f"--concept-threshold must be in [0, 1], got {args.concept_threshold}")


def check_hard_negatives(args) -> None:
    """--related-negatives, --confused-negatives and --confused-from: concept stage only, and consistent."""
    given = {"--related-negatives": args.related_negatives, "--confused-negatives": args.confused_negatives,
             "--confused-from": args.confused_from}
    if args.stage != "concept":
        named = [name for name, v in given.items() if v]
        if named:
            raise ConfigError(f"{named[0]} is for --stage concept, not --stage {args.stage}")
        return
    if bool(args.confused_negatives) != bool(args.confused_from):
        raise ConfigError("--confused-negatives R and --confused-from DIR go together")
    if args.confused_from and not Path(args.confused_from).is_dir():
        raise ConfigError(f"--confused-from {args.confused_from}: no such folder")


def check_args(args) -> None:
    positive = {"--steps": args.steps, "--grad-accum": args.grad_accum, "--max-tokens": args.max_tokens,
                "--lora-r": args.r, "--keep-checkpoints": args.keep_checkpoints}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    for name, value in {"--lr": args.lr, "--lora-alpha": args.alpha, "--neg-ratio": args.neg_ratio,
                        "--warmup": args.warmup, "--eval-every": args.eval_every, "--save-every": args.save_every,
                        "--label-k": args.k, "--label-m": args.m, "--false-ratio": args.false_ratio,
                        "--related-negatives": args.related_negatives,
                        "--confused-negatives": args.confused_negatives}.items():
        if value < 0:
            raise ConfigError(f"{name} must not be negative, got {value}")
    if not 0 <= args.dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {args.dropout}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    check_concept_answers(args)
    check_hard_negatives(args)


def check_run_folder(args) -> None:
    out = Path(args.out)
    if not args.resume and (latest_checkpoints(out) or (out / WEIGHTS_FILE).exists()):
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
    found = latest_checkpoints(out) if args.resume and args.stage in ("label", "concept") else []
    if not found:
        return
    try:  # the examples a run trains on must not change under it
        saved = json.loads((found[-1] / META_FILE).read_text())
    except (OSError, ValueError):
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    if saved.get("negation", "off") != args.negation:
        raise ConfigError(f"checkpoint {found[-1]} was trained with --negation {saved.get('negation', 'off')}: "
                          "resume with the same --negation")
    if args.stage == "concept":
        if saved.get("hard_negatives", {"related": 0.0, "confused": 0.0}) != hard_negatives_meta(args):
            raise ConfigError(f"checkpoint {found[-1]} was trained with other hard negatives "
                              f"({saved.get('hard_negatives')}): resume with the same --related-negatives, "
                              "--confused-negatives and --confused-from")
    else:
        was = saved.get("concept_answers", "pseudo")
        if was != args.concept_answers:
            raise ConfigError(f"checkpoint {found[-1]} was trained with --concept-answers {was}, this run has "
                              f"{args.concept_answers}: resume with the same --concept-answers")
        if was == "predicted" and saved.get("concept_adapter_sha256") != adapter_hash(Path(args.concept_adapter)):
            raise ConfigError(f"checkpoint {found[-1]} was trained on the answers of another concept adapter "
                              f"({saved.get('concept_adapter')}): resume with the same --concept-adapter")


def hard_negatives_meta(args) -> dict:
    """What cec_adapter.json records of a concept run's hard negatives (the resume check compares it)."""
    return {"related": args.related_negatives, "confused": args.confused_negatives,
            **({"confused_from_sha256": adapter_hash(Path(args.confused_from))} if args.confused_from else {})}


def read_data(args):
    """(concept set, training notes, dev notes), checked; read before the model loads, so a bad file is reported
    at once. Non-UTF-8 bytes in a notes file are an error naming the file and line (cec.data.read_notes)."""
    concept_set = load_concept_set(args.concepts)
    notes = read_notes(args.data)
    if not notes:
        raise DataError(f"{args.data}: no notes")
    dev = read_notes(args.dev) if args.dev else []
    # once, here: the scores of --confused-from / --concept-adapter read these texts too
    notes, dev = negation.readable_notes(notes, args.negation), negation.readable_notes(dev, args.negation)
    try:
        notes = check_labels(notes, concept_set, args.drop_unknown_codes)
    except DataError as e:
        raise DataError(f"{args.data}: {e}") from None
    return concept_set, notes, check_labels(dev, concept_set, True)


def setup_distributed(args):
    """(rank, world, device, dtype) from --device, --dtype, --threads (cec.cli.runtime) and torchrun's
    environment; a plain run is rank 0 of 1. Under torchrun a CUDA process takes the GPU of its local rank."""
    device, dtype = runtime(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device, dtype
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device, dtype


def main(argv=None, prog: str = "train.py") -> None:
    args = parse_args(argv, prog)
    check_args(args)
    concept_set, notes, dev = read_data(args)
    check_run_folder(args)
    rank, world, device, dtype = setup_distributed(args)

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[train] {msg}", file=sys.stderr, flush=True)

    try:
        model, tokenizer = load_model(args.model, device=device, dtype=dtype)
        stage = stages.get(args.stage, args.label_layout if args.stage == "label" else "paper")
        yes_ids, no_ids = stage.answer_ids(tokenizer)
        drawer, drawer_meta = None, {"concept_answers": args.concept_answers} if args.stage == "label" else {}
        if args.concept_answers == "predicted":
            drawer, drawer_meta = predicted_answers(args, model, tokenizer, concept_set, notes, rank, log)
        if args.stage == "concept":
            drawer_meta = {"hard_negatives": hard_negatives_meta(args)}
            if args.related_negatives or args.confused_negatives:
                drawer = hard_negatives(args, model, tokenizer, concept_set, notes, rank, log)
        torch.manual_seed(args.seed)  # the same LoRA init on every rank and in every run
        if args.init_adapter:
            lora_config, _ = load_adapter(model, args.init_adapter, dtype=torch.float32, dropout=args.dropout)
            lora_config.dropout = args.dropout
            log(f"initialized from {args.init_adapter}")
        else:
            targets = args.targets if args.targets == "all-linear" else [
                t.strip() for t in args.targets.split(",") if t.strip()]
            lora_config = inject_lora(model, targets, r=args.r, alpha=args.alpha, dropout=args.dropout,
                                      use_rslora=args.rslora, base_model=str(args.model))
        torch.manual_seed(args.seed + rank)  # dropout draws: one stream per rank
        opts = ExampleOptions(neg_ratio=args.neg_ratio, min_negatives=args.min_negatives, k=args.k, m=args.m,
                              false_ratio=args.false_ratio, min_false=args.min_false,
                              max_questions=args.max_questions)

        scored = {n["id"] for n in notes}

        def make_examples(note, epoch):  # dev notes have no concept scores: they get the stage's own examples
            own = drawer if note["id"] in scored else None
            return build_examples(stage, note, concept_set, seed=args.seed, epoch=epoch, opts=opts, drawer=own)

        config = TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
                             grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
                             weight_decay=args.weight_decay, max_tokens=args.max_tokens, seed=args.seed,
                             eval_every=args.eval_every, save_every=args.save_every,
                             keep_checkpoints=args.keep_checkpoints, dev_notes=args.dev_notes,
                             gradient_checkpointing=args.gradient_checkpointing, stop_at=args.stop_at,
                             save_dtype=args.save_dtype, progress=not args.no_progress)
        meta = {"stage": args.stage, "concept_set": concept_set.name, "code_system": concept_set.code_system,
                "prompts": stage.layout, "yes_answers": list(stage.yes_answers), "no_answers": list(stage.no_answers),
                "train_notes": len(notes), "seed": args.seed, "negation": args.negation,
                "concept_set_codes": list(concept_set.codes),  # what infer.py and evaluate.py check the set against
                **drawer_meta, **({"init_adapter": str(args.init_adapter)} if args.init_adapter else {})}
        log(f"stage {args.stage}: {len(notes)} notes, {len(dev)} dev notes, {world} process(es) on {device}, "
            f"LoRA r={args.r} alpha={args.alpha:g} on {', '.join(lora_config.target_modules)}; "
            f"{args.steps} steps of {args.grad_accum * world} notes")
        trainer = Trainer(model, tokenizer, yes_ids, no_ids, notes, make_examples, args.out, config, lora_config,
                          dev_notes=dev, meta=meta, log=log)
        trainer.train(resume=args.resume)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def scored_notes(args, config: PipelineConfig, model, tokenizer, concept_set, notes, rank, log, why: str):
    """note id -> P(yes) of every concept from config's concept adapter: rank 0 scores the notes the run folder's
    score cache lacks, the other ranks then read them."""
    if rank == 0:
        log(f"{why}: scoring {len(notes)} notes with {config.concept_adapter} (cached in "
            f"{Path(args.out) / SCORES_FILE})")
        probs = score_notes(model, tokenizer, concept_set, config, notes, args.out, not args.no_progress)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank != 0:
        probs = score_notes(model, tokenizer, concept_set, config, notes, args.out, False)
    return probs


def hard_negatives(args, model, tokenizer, concept_set, notes, rank, log) -> HardNegatives:
    """The drawer of --related-negatives / --confused-negatives; the confused ones need every note scored."""
    probs = None
    if args.confused_negatives:
        config = PipelineConfig(base_model=str(args.model), concept_set=concept_set.name,
                                concept_adapter=str(Path(args.confused_from).resolve()))
        probs = scored_notes(args, config, model, tokenizer, concept_set, notes, rank, log, "confused negatives")
    return HardNegatives(concept_set, args.related_negatives, args.confused_negatives, probs)


def predicted_answers(args, model, tokenizer, concept_set, notes, rank, log):
    """(PredictedAnswers, its meta) for --concept-answers predicted."""
    config = PipelineConfig(base_model=str(args.model), concept_set=concept_set.name,
                            concept_adapter=str(Path(args.concept_adapter).resolve()), k=args.k, m=args.m,
                            sampling=args.label_sampling, concept_threshold=args.concept_threshold,
                            seed=args.seed)
    probs = scored_notes(args, config, model, tokenizer, concept_set, notes, rank, log, "concept answers")
    meta = {"concept_answers": "predicted", "concept_adapter": config.concept_adapter,
            "concept_adapter_sha256": adapter_hash(config.adapter("concept")), "sampling": config.sampling,
            "concept_threshold": config.concept_threshold, "max_note_tokens": config.max_note_tokens}
    return PredictedAnswers(config, concept_set, probs), meta


def cli() -> None:
    """The `cec-train` command."""
    with user_errors("cec-train"):
        main(prog="cec-train")
