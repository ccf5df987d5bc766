"""ModelConfig: one dataclass for Llama 3.x and Gemma 1/2/3; family differences are flags."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cec.errors import ConfigError

SUPPORTED = ("llama", "gemma", "gemma2", "gemma3_text")


@dataclass
class ModelConfig:
    family: str  # "llama" | "gemma" | "gemma2" | "gemma3_text" (HF model_type)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # Gemma 3: base of sliding-window layers
    rope_scaling: dict | None = None  # HF rope_scaling dict of the global layers (llama3 / linear)
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    # family flags
    norm_offset: float = 0.0  # Gemma norms multiply by (1 + w)
    # the cast rule of every RMSNorm, the final one in the yes/no head and its kernel included: Llama's casts the
    # normalized fp32 to the input dtype, then scales in the weight's dtype; Gemma's (False) scales in fp32, then casts
    llama_norm: bool = True
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden) rounded to dtype
    activation: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    post_norms: bool = False  # Gemma 2/3: post-attention and post-feedforward norms
    qk_norm: bool = False  # Gemma 3
    attn_softcap: float | None = None  # Gemma 2
    final_softcap: float | None = None  # Gemma 2
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma 2/3)
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from an HF config.json dict (LlamaConfig, GemmaConfig, Gemma2Config, Gemma3(Text)Config)."""
        if hf.get("model_type") == "gemma3" and "text_config" in hf:  # multimodal wrapper: take the text part
            hf = {**hf["text_config"], "model_type": "gemma3_text"}
        mt = hf.get("model_type")
        if mt not in SUPPORTED:
            raise ConfigError(f"unsupported architecture {mt!r}; supported: {', '.join(SUPPORTED)}")
        try:
            n_layers = hf["num_hidden_layers"]
            n_heads = hf["num_attention_heads"]
            common = dict(
                family=mt,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=n_layers,
                num_heads=n_heads,
                num_kv_heads=hf.get("num_key_value_heads") or n_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=_rope_theta(hf),
                max_position_embeddings=hf.get("max_position_embeddings", 8192),
                tie_word_embeddings=hf.get("tie_word_embeddings", mt != "llama"),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks {e.args[0]!r}") from None
        if mt == "llama":
            return cls(**common, rope_scaling=_rope_scaling(hf), activation="silu")
        gemma = dict(norm_offset=1.0, llama_norm=False, embed_scale=True, activation="gelu_tanh")
        if mt == "gemma":
            return cls(**common, **gemma)
        window = hf.get("sliding_window")
        if mt == "gemma2":
            types = hf.get("layer_types") or [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
            return cls(**common, **gemma, post_norms=True, attn_softcap=hf.get("attn_logit_softcapping"),
                       final_softcap=hf.get("final_logit_softcapping"),
                       query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
                       sliding_window=window, layer_types=types)
        # gemma3_text
        pattern = hf.get("sliding_window_pattern", 6)
        types = hf.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
        local = hf.get("rope_local_base_freq")
        rp = hf.get("rope_parameters") or {}
        if local is None and isinstance(rp.get("sliding_attention"), dict):
            local = rp["sliding_attention"].get("rope_theta")
        return cls(**common, **gemma, post_norms=True, qk_norm=True,
                   attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
                   query_pre_attn_scalar=hf.get("query_pre_attn_scalar"), sliding_window=window,
                   layer_types=types, rope_local_theta=local or 10000.0, rope_scaling=_rope_scaling(hf))

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        try:
            return cls.from_hf(json.loads(Path(path).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from None


def _rope_theta(hf: dict) -> float:
    """rope_theta of the global layers; transformers 5 nests it under rope_parameters."""
    rp = hf.get("rope_parameters") or {}
    if isinstance(rp.get("full_attention"), dict):
        rp = rp["full_attention"]
    return float(hf.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def _rope_scaling(hf: dict) -> dict | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if isinstance(rs, dict) and isinstance(rs.get("full_attention"), dict):
        rs = rs["full_attention"]
    if not isinstance(rs, dict):
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear"):
        raise ConfigError(f"unsupported rope scaling {kind!r}; supported: llama3, linear")
    return {k: v for k, v in rs.items() if k != "rope_theta"} | {"rope_type": kind}
