"""LoRA training on packed shared-prefix sequences.

One sequence holds a note's prefix and many questions: `[prefix | q1 | q2 | ...]`. Positions restart at P for
every question and a block mask lets each question token see the prefix and its own question only, so each
question is computed exactly as in its own `[prefix | q]` sequence, for P + sum(len q) tokens instead of
n * P + sum(len q). The loss is binary cross-entropy on the yes/no score (cec.engine.heads: l_yes - l_no after the final
norm) at each question's last token; no full-vocabulary logits are built. Questions that do not fit in
`max_tokens` go to further sequences, each restating the prefix. Text that all questions of a note start with
(Fig. 3's "### Question: Is the note above ... concept '") joins the prefix, as cec.engine.cache does at inference.

An optimizer step takes `grad_accum` notes per process (one note per micro-batch, split into as many packs as
it needs); the loss is the mean over every question of the step, across processes. Under torchrun each rank
trains on its own notes of the step with DistributedDataParallel; rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
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

from cec.engine.cache import common_prefix_len, head_for
from cec.errors import CECError
from cec.io import atomic_write_text
from cec.engine.lora import (META_FILE, WEIGHTS_FILE, LoraConfig, lora_parameters, lora_state_dict, model_fingerprint,
                      save_adapter, tensor_mismatch)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


class TrainingError(CECError):
    """Training that cannot go on: a non-finite loss, a checkpoint that does not fit this run."""


# ---------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Pack:
    ids: torch.Tensor  # [T] token ids: prefix then questions
    positions: torch.Tensor  # [T] prefix 0..P-1, each question P..P+L-1
    segments: torch.Tensor  # [T] 0 for the prefix, i + 1 for question i of the pack
    answers: torch.Tensor  # [n] index of each question's last token
    labels: torch.Tensor  # [n] float 0/1

    @property
    def tokens(self) -> int:
        return self.ids.numel()

    def mask(self) -> torch.Tensor:
        """[T, T] True where a query may see a key: the prefix, or its own question (causality by position)."""
        s = self.segments
        return (s.view(-1, 1) == s.view(1, -1)) | (s.view(1, -1) == 0)

    def to(self, device) -> "Pack":
        return Pack(*(t.to(device) for t in (self.ids, self.positions, self.segments, self.answers, self.labels)))


def make_pack(prefix: list[int], questions: list[list[int]], labels: list[int]) -> Pack:
    p = len(prefix)
    ids, pos, seg, ans = list(prefix), list(range(p)), [0] * p, []
    for i, q in enumerate(questions):
        ids += q
        pos += range(p, p + len(q))
        seg += [i + 1] * len(q)
        ans.append(len(ids) - 1)
    return Pack(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                torch.tensor(seg, dtype=torch.long), torch.tensor(ans, dtype=torch.long),
                torch.tensor(labels, dtype=torch.float32))


def pack_questions(prefix: list[int], questions: list[list[int]], labels: list[int], max_tokens: int,
                   share_question_prefix: bool = True) -> tuple[list[Pack], int]:
    """Packs of at most max_tokens tokens, questions in order; returns (packs, prefix tokens cut off).

    A prefix too long to leave room for the longest question is cut at its end (the note's tail), with the
    number of tokens cut returned so the caller can report it.
    """
    if not questions:
        return [], 0
    if any(len(q) == 0 for q in questions):
        raise ValueError("every question needs at least one token")
    shared = common_prefix_len(questions) if share_question_prefix and len(questions) > 1 else 0
    rest = [q[shared:] for q in questions]
    room = max_tokens - shared - max(len(q) for q in rest)
    if room < 1:
        raise TrainingError(f"a question of {shared + max(len(q) for q in rest)} tokens does not fit in "
                            f"--max-tokens {max_tokens}")
    cut = max(0, len(prefix) - room)
    full_prefix = list(prefix[: len(prefix) - cut]) + list(questions[0][:shared])
    packs, cur, cur_labels, used = [], [], [], len(full_prefix)
    for q, y in zip(rest, labels):
        if cur and used + len(q) > max_tokens:
            packs.append(make_pack(full_prefix, cur, cur_labels))
            cur, cur_labels, used = [], [], len(full_prefix)
        cur.append(q)
        cur_labels.append(y)
        used += len(q)
    packs.append(make_pack(full_prefix, cur, cur_labels))
    return packs, cut


def pack_scores(model, head, pack: Pack) -> torch.Tensor:
    """Yes/no scores [n] (float32, differentiable) of a pack's questions in one forward pass."""
    hidden = model(pack.ids.view(1, -1), positions=pack.positions, mask=pack.mask(), final_norm=False)[0]
    return head.scores(hidden[pack.answers])


def pack_loss(model, head, pack: Pack) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed binary cross-entropy of the pack's questions, their scores)."""
    scores = pack_scores(model, head, pack)
    return F.binary_cross_entropy_with_logits(scores, pack.labels.to(scores.device), reduction="sum"), scores


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block in the backward pass instead of storing its activations (torch.utils.checkpoint,
    non-reentrant: dropout masks are replayed and DDP works). The module tree and names are unchanged."""
    from torch.utils.checkpoint import checkpoint

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


# ---------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------
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


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup, config.steps, config.schedule))
        self.step, self.notes_seen, self.last_checkpoint = 0, 0, None
        self.prefix_cut_notes = 0
        self._encode_question = lru_cache(maxsize=50_000)(lambda q: tuple(tokenizer.encode(q, add_bos=False)))

    # -- data -------------------------------------------------------------------------------------------
    def note_at(self, position: int) -> tuple[dict, int]:
        """The note at a position of the endless training stream, and its epoch; each epoch a new order."""
        n = len(self.notes)
        epoch = position // n
        order = list(range(n))
        random.Random(f"{self.cfg.seed}/order/{epoch}").shuffle(order)
        return self.notes[order[position % n]], epoch

    def encode(self, note: dict, epoch: int) -> Encoded:
        ex = self.make_examples(note, epoch)  # ids as cec.coding.prompts.encode makes them: BOS on the prefix only
        prefix = self.tokenizer.encode(ex.prefix, add_bos=True)
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
        from cec.evaluation.metrics import roc_auc

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

    def save_checkpoint(self) -> Path | None:
        """checkpoints/step-NNNNNN/: adapter (fp32), optimizer, scheduler, RNG states of every rank, data
        position. Written to a temporary folder and renamed, so a crash never leaves half a checkpoint."""
        d = self.dist
        rng = [_rng_state(self.device)]
        if d.on:
            rng = [None] * d.world
            dist.all_gather_object(rng, {k: (v.cpu() if torch.is_tensor(v) else v)
                                         for k, v in _rng_state(self.device).items()})
        path = self.out / CHECKPOINTS / f"step-{self.step:06d}"
        if d.rank == 0:
            root = self.out / CHECKPOINTS
            for stale in root.glob(".tmp-step-*"):  # left by a process killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp = root / f".tmp-step-{self.step:06d}-{os.getpid()}"
            tmp.mkdir(parents=True)
            try:
                save_adapter(self.model, tmp, self.lora_config, meta=self._lora_meta())
                state = {"step": self.step, "notes_seen": self.notes_seen, "world_size": d.world,
                         "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "rng": rng, "config": asdict(self.cfg), "lora": asdict(self.lora_config)}
                with open(tmp / STATE_FILE, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                if path.exists():
                    shutil.rmtree(path)
                os.replace(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._prune()
        if d.on:
            dist.barrier()
        self.last_checkpoint = path
        return path

    def _prune(self) -> None:
        done = sorted(latest_checkpoints(self.out))
        for old in done[: max(0, len(done) - max(1, self.cfg.keep_checkpoints))]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint; one that is damaged or made for another base model or LoRA setup is a
        TrainingError (one line), never a half-restored run."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        def unreadable(name, e):
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return TrainingError(f"checkpoint {path}: unreadable {name} ({detail[:200]}); remove that folder to "
                                 "resume from the checkpoint before it")

        try:  # our own file, loaded without unpickling code (weights_only)
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- torch raises RuntimeError, UnpicklingError, EOFError, OSError...
            raise unreadable(STATE_FILE, e) from None
        if not isinstance(state, dict) or not {"optimizer", "scheduler", "step", "notes_seen", "rng"} <= set(state):
            raise unreadable(STATE_FILE, ValueError("keys missing"))
        saved_lora = state.get("lora", {})
        for key in ("r", "target_modules", "use_rslora"):
            if key in saved_lora and saved_lora[key] != asdict(self.lora_config)[key]:
                raise TrainingError(f"checkpoint {path} has LoRA {key}={saved_lora[key]!r}, this run "
                                    f"{asdict(self.lora_config)[key]!r}: resume with the same options")
        try:
            saved_meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            saved_meta = {}
        saved_meta = saved_meta if isinstance(saved_meta, dict) else {}
        for key in ("stage", "code_system", "concept_set", "concept_set_codes"):
            if key in saved_meta and key in self.meta and saved_meta[key] != self.meta[key]:
                what = "another code set" if key == "concept_set_codes" else f"{key} {saved_meta[key]!r}"
                raise TrainingError(f"checkpoint {path} was made for {what}, this run has "
                                    f"{'other codes' if key == 'concept_set_codes' else repr(self.meta[key])}: "
                                    "resume with the same --stage and --concepts")
        saved_model = saved_meta.get("model")
        ours = model_fingerprint(self.model)
        if saved_model and ours:
            diff = [f"{k} {v} vs {ours[k]}" for k, v in saved_model.items() if k in ours and v != ours[k]]
            if diff:
                raise TrainingError(f"checkpoint {path} was made for another base model ({', '.join(diff)}): "
                                    "resume with the --model it was trained with")
        try:
            tensors = load_file(str(path / WEIGHTS_FILE))
        except (SafetensorError, OSError) as e:
            raise unreadable(WEIGHTS_FILE, e) from None
        params = lora_state_dict(self.model, peft_names=True)
        problem = tensor_mismatch(tensors, params)
        if problem:
            raise TrainingError(f"checkpoint {path} {problem}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k].to(p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.notes_seen = state["step"], state["notes_seen"]
        rng = state["rng"]
        if len(rng) == self.dist.world:
            _set_rng_state(rng[self.dist.rank], self.device)
        else:
            self.log(f"checkpoint was written by {len(rng)} processes, this run has {self.dist.world}: "
                     "dropout draws will differ from an uninterrupted run")
            torch.manual_seed(self.cfg.seed + 1000 * self.step + self.dist.rank)
        self.last_checkpoint = path

    # -- logging ----------------------------------------------------------------------------------------
    def _write_log(self, entry: dict) -> None:
        if self.dist.rank == 0:
            with open(self.out / LOG_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _trim_log(self) -> None:
        """After a resume, drop log lines of steps past the checkpoint (they will be run again)."""
        path = self.out / LOG_FILE
        if self.dist.rank == 0 and path.is_file():
            keep = []
            for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    step = json.loads(ln)["step"]
                except (ValueError, KeyError, TypeError):  # a line torn by a crash mid-write
                    continue
                if step <= self.step:
                    keep.append(ln)
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        """Run to cfg.steps (or cfg.stop_at); returns the last dev metrics (or {})."""
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
            from tqdm import tqdm

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


def latest_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (temporary folders of a crash are ignored)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())

