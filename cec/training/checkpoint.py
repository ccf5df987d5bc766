"""Training checkpoints: RUN/checkpoints/step-NNNNNN/ holds the adapter (fp32, PEFT's format plus cec_adapter.json)
and trainer_state.pt (optimizer, scheduler, RNG states of every rank, data position, the run's config).

Each folder is written whole or not at all (cec.io.atomic_folder), so --resume always finds a complete one. A
checkpoint that is damaged or made for another base model, LoRA setup, stage or concept set is refused with one
line, before anything of it is restored.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from cec.engine.lora import META_FILE, WEIGHTS_FILE, load_lora_tensors, model_fingerprint, save_adapter
from cec.errors import AdapterError, CECError
from cec.io import TMP_PREFIX, atomic_folder

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
STATE_KEYS = {"optimizer", "scheduler", "step", "notes_seen", "rng"}


class TrainingError(CECError):
    """Training that cannot go on: a non-finite loss, a checkpoint that does not fit this run."""


def checkpoint_folder(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (temporary folders of a crash are ignored)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


# -- RNG states ------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_states(device: torch.device, world: int) -> list[dict]:
    """The RNG states of every rank, in rank order; under torchrun a collective that every rank calls."""
    if world == 1:
        return [_rng_state(device)]
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: (v.cpu() if torch.is_tensor(v) else v)
                                      for k, v in _rng_state(device).items()})
    return gathered


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -- writing ---------------------------------------------------------------------------------------------
def write_checkpoint(path: Path, model, lora_config, meta: dict, state: dict, keep: int) -> None:
    """Write one checkpoint folder whole (rank 0 only), then remove all but the newest `keep` checkpoints."""
    root = path.parent
    for stale in root.glob(f"{TMP_PREFIX}step-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_folder(path) as tmp:
        save_adapter(model, tmp, lora_config, meta=meta)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    done = latest_checkpoints(root.parent)
    for old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)


# -- reading ---------------------------------------------------------------------------------------------
def _unreadable(path: Path, name: str, e: BaseException) -> TrainingError:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return TrainingError(f"checkpoint {path}: unreadable {name} ({detail[:200]}); remove that folder to resume "
                         "from the checkpoint before it")


def read_checkpoint(path: Path, model, lora_config, meta: dict) -> dict:
    """Check a checkpoint against this run, copy its adapter into the model's LoRA layers and return its
    trainer state (optimizer, scheduler, step, notes_seen, rng, ...). Raises TrainingError (one line) before
    touching the model when the checkpoint is damaged or made for another run."""
    try:  # our own file, loaded without unpickling code (weights_only)
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises RuntimeError, UnpicklingError, EOFError, OSError...
        raise _unreadable(path, STATE_FILE, e) from None
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        raise _unreadable(path, STATE_FILE, ValueError("keys missing"))
    saved_lora, ours_lora = state.get("lora", {}), asdict(lora_config)
    for key in ("r", "target_modules", "use_rslora"):
        if key in saved_lora and saved_lora[key] != ours_lora[key]:
            raise TrainingError(f"checkpoint {path} has LoRA {key}={saved_lora[key]!r}, this run "
                                f"{ours_lora[key]!r}: resume with the same options")
    try:
        saved_meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        saved_meta = {}
    saved_meta = saved_meta if isinstance(saved_meta, dict) else {}
    for key in ("stage", "code_system", "concept_set", "concept_set_codes"):
        if key in saved_meta and key in meta and saved_meta[key] != meta[key]:
            what = "another code set" if key == "concept_set_codes" else f"{key} {saved_meta[key]!r}"
            raise TrainingError(f"checkpoint {path} was made for {what}, this run has "
                                f"{'other codes' if key == 'concept_set_codes' else repr(meta[key])}: "
                                "resume with the same --stage and --concepts")
    saved_model, ours = saved_meta.get("model"), model_fingerprint(model)
    if saved_model and ours:
        diff = [f"{k} {v} vs {ours[k]}" for k, v in saved_model.items() if k in ours and v != ours[k]]
        if diff:
            raise TrainingError(f"checkpoint {path} was made for another base model ({', '.join(diff)}): "
                                "resume with the --model it was trained with")
    try:
        load_lora_tensors(model, path / WEIGHTS_FILE)
    except AdapterError as e:
        raise TrainingError(f"checkpoint {e}; remove {path} to resume from the checkpoint before it") from None
    return state
