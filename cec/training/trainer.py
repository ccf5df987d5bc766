"""LoRA training on packed shared-prefix sequences (cec.training.packing): the loop, optimizer and schedule, dev
evaluation and the train log; checkpoints are cec.training.checkpoint's.

An optimizer step takes `grad_accum` notes per process (one note per micro-batch, split into as many packs as
it needs); the loss is the mean over every question of the step, across processes. Under torchrun each rank
trains on its own notes of the step with DistributedDataParallel; rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from cec.coding.stages import prefix_ids, question_ids
from cec.engine.scorer import head_for
from cec.engine.lora import LoraConfig, lora_parameters, save_adapter
from cec.evaluation.metrics import roc_auc
from cec.io import AppendJsonl
from cec.training.checkpoint import (CHECKPOINTS, TrainingError, checkpoint_folder, latest_checkpoints,
                                     read_checkpoint, rng_states, set_rng_state, write_checkpoint)
from cec.training.packing import Pack, make_pack, pack_loss, pack_questions, pack_scores

LOG_FILE = "train_log.jsonl"


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block in the backward pass instead of storing its activations (torch.utils.checkpoint,
    non-reentrant: dropout masks are replayed and DDP works). The module tree and names are unchanged."""
    for block in model.model.layers:
        if getattr(block, "_checkpointed", False):
            continue
        inner = block.forward
        block.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)
        block._checkpointed = True


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 2e-4
    warmup: int = 0  # steps of linear warmup
    schedule: str = "linear"  # linear | cosine | constant
    grad_accum: int = 4  # notes per process per optimizer step
    max_grad_norm: float = 1.0  # 0 = no clipping
    weight_decay: float = 0.0
    max_tokens: int = 4096  # longest packed sequence
    seed: int = 0
    eval_every: int = 0  # 0 = only at the end (when there is a dev set)
    save_every: int = 50  # 0 = only at the end
    keep_checkpoints: int = 2
    dev_notes: int | None = 64  # evaluate on at most this many dev notes (None = all)
    gradient_checkpointing: bool = False
    share_question_prefix: bool = True
    stop_at: int | None = None  # stop after this step (checkpointed) and leave the rest for a resumed run
    save_dtype: str = "float32"  # dtype of the final adapter's tensors (float32 | bfloat16)
    progress: bool = True


@dataclass
class Encoded:
    packs: list[Pack]
    questions: int
    cut: int = 0


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def on(self) -> bool:
        return self.world > 1

    @classmethod
    def current(cls) -> "DistInfo":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()


class Trainer:
    """Trains the LoRA layers already injected into `model` (see cec.engine.lora.inject_lora).

    make_examples(note, epoch) -> cec.training.examples.NoteExamples builds a note's questions; the same note and epoch
    must give the same examples (they do in cec.training.examples, seeded per note).
    """

    def __init__(self, model, tokenizer, yes_ids: list[int], no_ids: list[int], train_notes: list[dict],
                 make_examples: Callable, out_dir: str | Path, config: TrainConfig, lora_config: LoraConfig,
                 dev_notes: list[dict] | None = None, meta: dict | None = None, log: Callable = print):
        if not train_notes:
            raise TrainingError("no training notes")
        if not lora_parameters(model):
            raise TrainingError("the model has no LoRA layers to train")
        self.model, self.tokenizer, self.cfg, self.lora_config = model, tokenizer, config, lora_config
        self.notes, self.dev = train_notes, (dev_notes or [])[: config.dev_notes]
        self.make_examples, self.meta, self.log = make_examples, meta or {}, log
        self.out = Path(out_dir)
        self.dist = DistInfo.current()
        self.device = model.device
        self.head = head_for(model, yes_ids, no_ids)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else nullcontext())
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.params = lora_parameters(model)
        self.ddp = model
        if self.dist.on:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup, config.steps, config.schedule))
        self.step, self.notes_seen, self.last_checkpoint = 0, 0, None
        self.prefix_cut_notes = 0
        self.train_log = AppendJsonl(self.out / LOG_FILE)  # written by rank 0 only
        self._encode_question = lru_cache(maxsize=50_000)(lambda q: tuple(question_ids(tokenizer, q)))

    # -- data -------------------------------------------------------------------------------------------
    def note_at(self, position: int) -> tuple[dict, int]:
        """The note at a position of the endless training stream, and its epoch; each epoch a new order."""
        n = len(self.notes)
        epoch = position // n
        order = list(range(n))
        random.Random(f"{self.cfg.seed}/order/{epoch}").shuffle(order)
        return self.notes[order[position % n]], epoch

    def encode(self, note: dict, epoch: int) -> Encoded:
        ex = self.make_examples(note, epoch)
        prefix = prefix_ids(self.tokenizer, ex.prefix)  # ids as cec.coding.stages builds them everywhere
        questions = [list(self._encode_question(q)) for q in ex.questions]
        packs, cut = pack_questions(prefix, questions, ex.labels, self.cfg.max_tokens,
                                    self.cfg.share_question_prefix)
        return Encoded([p.to(self.device) for p in packs], len(questions), cut)

    # -- one optimizer step -----------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, d = self.cfg, self.dist
        t0 = time.perf_counter()
        micro = []
        for j in range(cfg.grad_accum):
            note, epoch = self.note_at(self.notes_seen + j * d.world + d.rank)
            enc = self.encode(note, epoch)
            self.prefix_cut_notes += enc.cut > 0
            micro.append(enc)
        counts = torch.tensor([float(sum(m.questions for m in micro)),
                               float(sum(p.tokens for m in micro for p in m.packs))], dtype=torch.float64)
        if d.on:  # nccl reduces CUDA tensors only
            counts = counts.to(self.device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        n_questions = max(float(counts[0]), 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        packs = [p for m in micro for p in m.packs]
        self.model.train()
        for i, pack in enumerate(packs):
            sync = not d.on or i == len(packs) - 1
            with (nullcontext() if sync else self.ddp.no_sync()), self.autocast:
                loss, _ = pack_loss(self.ddp, self.head, pack)
            (loss * (d.world / n_questions)).backward()
            loss_sum += loss.detach().double()
        if not packs and d.on:  # a rank without questions this step still joins the gradient all-reduce
            with self.autocast:
                loss, _ = pack_loss(self.ddp, self.head, make_pack([0], [[0]], [0]).to(self.device))
            (loss * 0.0).backward()
        if d.on:
            dist.all_reduce(loss_sum)
        loss = float(loss_sum) / n_questions
        clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = self.last_checkpoint or "none written yet"
            raise TrainingError(f"loss {loss} / gradient norm {grad_norm} at step {self.step + 1}: stopped; "
                                f"last good checkpoint: {where}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.notes_seen += cfg.grad_accum * d.world
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "questions": int(counts[0]),
                "tokens": int(counts[1]), "epoch": round(self.notes_seen / len(self.notes), 3),
                "seconds": round(time.perf_counter() - t0, 3)}

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean BCE, ROC AUC and accuracy (score > 0) over the questions of the dev notes (epoch 0 examples)."""
        d = self.dist
        self.model.eval()
        scores, labels = [], []
        for note in self.dev[d.rank:: d.world]:
            for pack in self.encode(note, 0).packs:
                with self.autocast:
                    s = pack_scores(self.model, self.head, pack)
                scores += s.float().cpu().tolist()
                labels += pack.labels.tolist()
        self.model.train()
        if d.on:
            gathered = [None] * d.world
            dist.all_gather_object(gathered, (scores, labels))
            scores = [s for g in gathered for s in g[0]]
            labels = [y for g in gathered for y in g[1]]
        if not scores:
            return {}
        s, y = torch.tensor(scores, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64)
        return {"step": self.step, "dev_loss": float(F.binary_cross_entropy_with_logits(s, y)),
                "dev_auc": roc_auc(y.numpy(), s.numpy()),
                "dev_accuracy": float(((s > 0).double() == y).double().mean()),
                "dev_questions": len(scores), "dev_notes": len(self.dev)}

    # -- checkpoints ------------------------------------------------------------------------------------
    def _lora_meta(self) -> dict:
        return {**self.meta, "steps": self.step}

    def save_checkpoint(self) -> Path:
        """checkpoints/step-NNNNNN/ (cec.training.checkpoint), with the RNG states of every rank."""
        d = self.dist
        rng = rng_states(self.device, d.world)
        path = checkpoint_folder(self.out, self.step)
        if d.rank == 0:
            state = {"step": self.step, "notes_seen": self.notes_seen, "world_size": d.world,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rng, "config": asdict(self.cfg), "lora": asdict(self.lora_config)}
            write_checkpoint(path, self.model, self.lora_config, self._lora_meta(), state, self.cfg.keep_checkpoints)
        if d.on:
            dist.barrier()
        self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint; one that is damaged or made for another base model or LoRA setup is a
        TrainingError (one line), never a half-restored run."""
        state = read_checkpoint(path, self.model, self.lora_config, self.meta)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.notes_seen = state["step"], state["notes_seen"]
        rng = state["rng"]
        if len(rng) == self.dist.world:
            set_rng_state(rng[self.dist.rank], self.device)
        else:
            self.log(f"checkpoint was written by {len(rng)} processes, this run has {self.dist.world}: "
                     "dropout draws will differ from an uninterrupted run")
            torch.manual_seed(self.cfg.seed + 1000 * self.step + self.dist.rank)
        self.last_checkpoint = path

    # -- logging ----------------------------------------------------------------------------------------
    def _write_log(self, entry: dict) -> None:
        if self.dist.rank == 0:
            self.train_log.append(entry)

    def _trim_log(self) -> None:
        """After a resume, drop the log lines of steps past the checkpoint (they are run again) and any line
        torn by a crash."""
        if self.dist.rank == 0 and self.train_log.path.is_file():
            records, _ = self.train_log.read()
            self.train_log.rewrite([r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)
                                    and r["step"] <= self.step])

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        """Run to cfg.steps (or cfg.stop_at); returns the last dev metrics (or {})."""
        with self.train_log:  # closed however the run ends
            return self._train(resume)

    def _train(self, resume: bool) -> dict:
        cfg, d = self.cfg, self.dist
        if d.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            found = latest_checkpoints(self.out)
            if found:
                self.load_checkpoint(found[-1])
                self._trim_log()
                self.log(f"resumed from {found[-1]} (step {self.step})")
            else:
                self.log(f"no checkpoint in {self.out / CHECKPOINTS}: starting from step 0")
        elif d.rank == 0 and (self.out / LOG_FILE).exists():
            (self.out / LOG_FILE).unlink()
        end = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
        bar = None
        if cfg.progress and d.rank == 0:
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        metrics, saved_at = {}, self.step if resume else -1
        try:
            while self.step < end:
                entry = self.train_step()
                self._write_log(entry)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
                if self.dev and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    metrics = self.evaluate()
                    if metrics:
                        self._write_log(metrics)
                    if bar is not None:
                        bar.write(json.dumps(metrics), file=sys.stderr)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
        except KeyboardInterrupt:
            if not d.on and self.step > max(saved_at, 0):
                self.log(f"interrupted: saving step {self.step} for --resume")
                self.save_checkpoint()
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.step >= cfg.steps:
            if self.dev:
                metrics = self.evaluate()
                if metrics:
                    self._write_log(metrics)
                if d.rank == 0:
                    self.log(json.dumps(metrics))
            if saved_at != self.step:
                self.save_checkpoint()
            self.save_final()
        elif saved_at != self.step:
            self.save_checkpoint()
            self.log(f"stopped at step {self.step} of {cfg.steps}; continue with --resume")
        if self.prefix_cut_notes and d.rank == 0:
            self.log(f"{self.prefix_cut_notes} notes were longer than --max-tokens allows; their tails were cut")
        return metrics

    def save_final(self) -> None:
        if self.dist.rank == 0:
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.cfg.save_dtype]
            save_adapter(self.model, self.out, self.lora_config, dtype=dtype, meta=self._lora_meta())
            self.log(f"adapter written to {self.out}")
        if self.dist.on:
            dist.barrier()

