"""Tiny random HF models of each family, built locally (no download), and ours with the same weights."""
import torch

from cec.engine.config import ModelConfig
from cec.engine.model import Transformer

FAMILIES = ["llama", "llama3_scaled", "gemma", "gemma2", "gemma3"]


def hf_config(family: str, **over):
    import transformers as tf

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  attn_implementation="eager")
    if family == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False)
    elif family == "llama3_scaled":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    elif family == "gemma":
        cfg = tf.GemmaConfig(**{**common, "num_key_value_heads": 1}, head_dim=24, hidden_act="gelu")
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 7}, head_dim=32, query_pre_attn_scalar=32,
                                  sliding_window=8, rope_parameters={
                                      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    else:
        raise ValueError(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def hf_model(family: str, seed: int = 0, **over):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, **over)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random norm weights, so the norm numerics are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def ours_from_hf(hf) -> Transformer:
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    model = Transformer(cfg).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if k != "lm_head.weight"], missing
    model.tie_weights()
    return model
