"""LoRA: `LoRALinear`, injection by module name, merge/unmerge, and adapters in PEFT's on-disk format.

A wrapped layer keeps the base weight under its own name (`q_proj.weight`), so the base state dict is unchanged;
the adapter adds `q_proj.lora_A.weight` [r, in] and `q_proj.lora_B.weight` [out, r]. On disk the keys are PEFT's:
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, beside an `adapter_config.json` that
`peft.PeftModel.from_pretrained` reads, so adapters move both ways between this engine and PEFT.
`cec_adapter.json` (ours, ignored by PEFT) records the base model's shape and what the adapter was trained for.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save as safetensors_bytes

from cec.errors import AdapterError
from cec.io import atomic_write_bytes, atomic_write_json

PEFT_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE, META_FILE = "adapter_config.json", "adapter_model.safetensors", "cec_adapter.json"
FINGERPRINT_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"  # suffixes of module names, a regex, or "all-linear"
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    base_model: str | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft(self) -> dict:
        """adapter_config.json as PEFT writes it (the fields PEFT's LoraConfig needs to rebuild the adapter)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "target_modules": targets,
            "use_rslora": self.use_rslora, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
            "lora_bias": False, "revision": None,
        }

    @classmethod
    def from_peft(cls, d: dict, where: str = "adapter_config.json") -> "LoraConfig":
        if d.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{where}: peft_type {d.get('peft_type')!r} is not LORA")
        unsupported = {"use_dora": True, "lora_bias": True, "fan_in_fan_out": True}
        for key, bad in unsupported.items():
            if d.get(key) == bad:
                raise AdapterError(f"{where}: {key}={bad} is not supported")
        for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                    "target_parameters", "layer_replication", "trainable_token_indices"):
            if d.get(key):
                raise AdapterError(f"{where}: {key} is not supported")
        if d.get("bias", "none") != "none":
            raise AdapterError(f"{where}: bias={d['bias']!r} is not supported (only 'none')")
        try:
            targets = d["target_modules"]
            return cls(r=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout") or 0.0),
                       target_modules=targets if isinstance(targets, str) else list(targets),
                       use_rslora=bool(d.get("use_rslora", False)), base_model=d.get("base_model_name_or_path"))
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterError(f"{where}: missing or bad field ({e})") from None


class LoRALinear(nn.Module):
    """y = x W^T + scaling * B(A(dropout(x))); W frozen, A Kaiming-uniform (a=sqrt(5), as PEFT), B zeros."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if r <= 0:
            raise AdapterError(f"LoRA rank must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (lora * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Exact in fp32; in bf16 the round trip loses the low bits, as PEFT's does."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


def _matches(name: str, targets, all_linear: bool) -> bool:
    if all_linear:
        return ".layers." in f".{name}" and not name.endswith("lm_head")
    if isinstance(targets, str):  # PEFT: a string is a regex matched against the whole module name
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, target_modules: list[str] | str = "all-linear", r: int = 8, alpha: float = 8,
                dropout: float = 0.0, use_rslora: bool = False, *, base_model: str | None = None,
                dtype: torch.dtype = torch.float32) -> LoraConfig:
    """Wrap every matching nn.Linear in a LoRALinear and freeze all other parameters.

    target_modules: "all-linear" (every Linear of the transformer layers, not lm_head, as PEFT), a list of
    name suffixes (["k_proj", "v_proj"]), or a regex matched against full module names (PEFT's rule).
    Returns the config with target_modules resolved to the suffixes actually wrapped.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise AdapterError("the model already has LoRA layers; remove_lora() first")
    all_linear = target_modules == "all-linear"
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and _matches(n, target_modules, all_linear)]
    if not found:
        raise AdapterError(f"no Linear layer matches target modules {target_modules!r}")
    model.requires_grad_(False)
    for name, lin in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(lin, r, alpha, dropout, use_rslora, dtype=dtype))
    suffixes = sorted({n.rpartition(".")[2] for n, _ in found})
    targets = suffixes if all_linear or not isinstance(target_modules, str) else target_modules
    return LoraConfig(r=r, alpha=alpha, dropout=dropout, target_modules=targets, use_rslora=use_rslora,
                      base_model=base_model)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def lora_state_dict(model: nn.Module, peft_names: bool = False) -> dict[str, torch.Tensor]:
    """The adapter tensors; with peft_names, under PEFT's keys (`base_model.model.<module>.lora_A.weight`)."""
    out = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            out[PEFT_PREFIX + key if peft_names else key] = getattr(layer, part).weight
    return out


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = False) -> None:
    """Put plain nn.Linear layers back (with the adapter merged into them if merge=True, else without it)."""
    for name, layer in lora_layers(model).items():
        layer.merge() if merge else layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.to_linear())


def model_fingerprint(model: nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "hidden_size"):
        return None
    return {k: getattr(cfg, k) for k in FINGERPRINT_FIELDS if hasattr(cfg, k)}


def save_adapter(model: nn.Module, folder: str | Path, config: LoraConfig, *, dtype: torch.dtype | None = None,
                 meta: dict | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's format) and cec_adapter.json, each file
    atomically. dtype (e.g. torch.bfloat16) converts the tensors on the way out; default keeps theirs."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to save")
    if any(layer.merged for layer in layers.values()):
        raise AdapterError("unmerge the LoRA layers before saving")
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
               for k, v in lora_state_dict(model, peft_names=True).items()}
    atomic_write_bytes(folder / WEIGHTS_FILE, safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_json(folder / CONFIG_FILE, config.to_peft())
    atomic_write_json(folder / META_FILE, {"base_model": config.base_model, "model": model_fingerprint(model),
                                           **(meta or {})})


def read_adapter_config(folder: str | Path) -> tuple[LoraConfig, dict]:
    """(LoraConfig, cec_adapter.json contents or {}) of an adapter folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise AdapterError(f"{folder}: no {CONFIG_FILE}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{folder / CONFIG_FILE}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{folder / CONFIG_FILE}: expected a JSON object")
    meta = {}
    if (folder / META_FILE).is_file():
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdapterError(f"{folder / META_FILE}: unreadable ({e})") from None
    return LoraConfig.from_peft(cfg, str(folder / CONFIG_FILE)), meta


def _our_key(peft_key: str) -> str:
    key = peft_key[len(PEFT_PREFIX):] if peft_key.startswith(PEFT_PREFIX) else peft_key
    key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    return key.replace("model.language_model.", "model.")  # adapters of Gemma3ForConditionalGeneration


def tensor_mismatch(tensors: dict, expected: dict) -> str | None:
    """Why saved LoRA tensors cannot be copied into a model's (names -> parameters), or None when they can."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        return (f"has tensors this model lacks, e.g. {unexpected[0]} ({len(unexpected)} in all): "
                "made for another base model?")
    if missing:
        return f"lacks {len(missing)} LoRA tensors, e.g. {missing[0]}"
    for key, param in expected.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            return (f"has {key} of shape {tuple(tensors[key].shape)}, this model needs {tuple(param.shape)}: "
                    "made for another base model or rank?")
    return None


def load_lora_tensors(model: nn.Module, weights: str | Path) -> None:
    """Copy an adapter_model.safetensors (PEFT's keys or ours) into the model's LoRA layers, all or nothing.
    AdapterError (one line) when the file is unreadable or its tensors do not fit the layers."""
    weights = Path(weights)
    try:
        tensors = {_our_key(k): v for k, v in load_file(str(weights)).items()}
    except (SafetensorError, OSError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdapterError(f"{weights}: unreadable safetensors file ({detail[:200]})") from None
    expected = lora_state_dict(model)
    problem = tensor_mismatch(tensors, expected)
    if problem:
        raise AdapterError(f"{weights.parent}: adapter {problem}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(param.dtype))


def load_adapter(model: nn.Module, folder: str | Path, *, dtype: torch.dtype = torch.float32,
                 dropout: float | None = None) -> tuple[LoraConfig, dict]:
    """Inject LoRA layers as the adapter's config says and load its weights (safetensors only).

    A model that already has LoRA layers gets new weights in place (their rank and targets must agree).
    Raises AdapterError, one line, on a missing file, a base-model mismatch, missing or unexpected tensors
    or a shape mismatch, and leaves a model it injected layers into without them. Returns (LoraConfig,
    cec_adapter.json contents or {}).
    """
    folder = Path(folder)
    config, meta = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if any((folder / n).is_file() for n in ("adapter_model.bin", "adapter_model.pt")):
            raise AdapterError(f"{folder}: only {WEIGHTS_FILE} is accepted (pickled .bin adapters can run code); "
                               "convert it with safetensors first")
        raise AdapterError(f"{folder}: no {WEIGHTS_FILE}")
    ours, theirs = model_fingerprint(model), meta.get("model")
    if ours and theirs:
        diff = [f"{k} {theirs[k]} vs {ours[k]}" for k in theirs if k in ours and theirs[k] != ours[k]]
        if diff:
            raise AdapterError(f"{folder}: adapter was trained for another base model "
                               f"({meta.get('base_model') or 'unnamed'}: {', '.join(diff)})")
    injected = not lora_layers(model)
    if injected:
        inject_lora(model, config.target_modules, config.r, config.alpha,
                    config.dropout if dropout is None else dropout, config.use_rslora,
                    base_model=config.base_model, dtype=dtype)
    try:
        load_lora_tensors(model, weights)
    except AdapterError:
        if injected:
            remove_lora(model)
        raise
    for layer in lora_layers(model).values():
        layer.scaling = config.scaling
        layer.r, layer.alpha, layer.use_rslora = config.r, config.alpha, config.use_rslora
    return config, meta
