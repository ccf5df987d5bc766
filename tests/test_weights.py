"""Weight loading: HF folders (single and sharded safetensors), GGUF conversion against transformers' own GGUF
loader, the conversion cache, and one clear exception for every kind of bad input."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from cec.errors import ConfigError, WeightsError
from cec.engine.weights import (_llama3_scaling_from_freqs, gguf_to_hf_name, load_hf_folder, load_model, resolve)
from hf_tiny import hf_model

TOL = 1e-4


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CEC_CACHE", str(tmp_path / "cec_cache"))


def _save(hf, folder, **kw):
    hf.save_pretrained(str(folder), safe_serialization=True, **kw)
    return folder


def _same_params(ours, hf):
    ref = hf.state_dict()
    for name, p in ours.state_dict().items():
        assert p.device.type == "cpu", name
        assert torch.equal(p, ref[name].to(p.dtype)), name


# -- HF folders ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])  # untied + GQA, and tied + QK-norm
def test_hf_folder_loads_exactly(family, tmp_path):
    hf = hf_model(family)
    ours = load_hf_folder(_save(hf, tmp_path / family))
    _same_params(ours, hf)
    assert ours.config.tie_word_embeddings == (family != "llama")
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max().item() < TOL


def test_sharded_folder_and_dtype(tmp_path):
    hf = hf_model("gemma2")
    folder = _save(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    ours = load_hf_folder(folder)
    _same_params(ours, hf)
    half = load_hf_folder(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    _same_params(half, hf)


def test_loaded_weights_do_not_write_back_to_the_file(tmp_path):
    """Tensors come from a private mapping of the file: changing them in place (LoRA merge) leaves it alone."""
    hf = hf_model("llama")
    folder = _save(hf, tmp_path / "m")
    before = (folder / "model.safetensors").read_bytes()
    ours = load_hf_folder(folder)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    assert (folder / "model.safetensors").read_bytes() == before


def test_load_model_from_folder_returns_tokenizer(tmp_path):
    from test_tokenizer import CORPUS
    from tokenizers import Tokenizer as Backend, pre_tokenizers, trainers
    from tokenizers.models import BPE

    folder = _save(hf_model("llama"), tmp_path / "m")
    backend = Backend(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False))
    backend.save(str(folder / "tokenizer.json"))
    model, tok = load_model(folder)
    assert tok.bos_id == 1  # tiny LlamaConfig's bos_token_id, as no tokenizer_config.json names one
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    model, tok = load_model(folder)
    assert tok.bos_id == 0 and tok.encode("BP 120/80")[0] == 0
    assert not model.training


# -- bad input ----------------------------------------------------------------------------------------
@pytest.fixture
def llama_folder(tmp_path):
    return _save(hf_model("llama"), tmp_path / "llama")


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_inputs(tmp_path):
    with pytest.raises(WeightsError, match="no such model"):
        resolve(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json and no .gguf"):
        resolve(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(hf_model("llama").config.to_dict()))
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_hf_folder(tmp_path / "noweights")


def test_truncated_and_corrupt_safetensors(llama_folder):
    path = llama_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_hf_folder(llama_folder)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_hf_folder(llama_folder)


def test_config_that_does_not_match_the_weights(llama_folder):
    _edit_config(llama_folder, num_hidden_layers=3)
    with pytest.raises(ConfigError, match=r"model\.layers\.3\..*does not describe"):
        load_hf_folder(llama_folder)
    _edit_config(llama_folder, num_hidden_layers=5)
    with pytest.raises(WeightsError, match=r"lack 'model\.layers\.4\."):
        load_hf_folder(llama_folder)
    _edit_config(llama_folder, num_hidden_layers=4, intermediate_size=128)
    with pytest.raises(ConfigError, match=r"down_proj.weight' has shape \[64, 96\], config.json implies \[64, 128\]"):
        load_hf_folder(llama_folder)
    _edit_config(llama_folder, intermediate_size=96, model_type="mixtral")
    with pytest.raises(ConfigError, match="unsupported architecture 'mixtral'"):
        load_hf_folder(llama_folder)


def test_pickles_are_refused(llama_folder):
    (llama_folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, llama_folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="refusing to load pickles.*safetensors or GGUF"):
        load_hf_folder(llama_folder)
    with pytest.raises(WeightsError, match="refusing to load pickled weights"):
        resolve(llama_folder / "pytorch_model.bin")


def test_hub_repo_offline_and_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="'nobody/no-such-model' is no local path, cannot be downloaded.*not in the Hugging Face cache"):
        resolve("nobody/no-such-model")


def test_corrupt_gguf(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 100)
    with pytest.raises(WeightsError, match="cannot read GGUF file"):
        resolve(tmp_path / "bad.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(WeightsError, match=r"bad\.gguf: not a GGUF file \(it does not start with the GGUF magic"):
        resolve(tmp_path / "bad.gguf")


# -- GGUF ---------------------------------------------------------------------------------------------
def test_gguf_names():
    assert gguf_to_hf_name("token_embd.weight", "gemma3") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("blk.3.attn_q.weight", "llama") == "model.layers.3.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.0.post_attention_norm.weight", "gemma2") == \
        "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("blk.1.post_ffw_norm.weight", "gemma3") == "model.layers.1.post_feedforward_layernorm.weight"
    assert gguf_to_hf_name("blk.1.attn_k_norm.weight", "gemma3") == "model.layers.1.self_attn.k_norm.weight"
    assert gguf_to_hf_name("output.weight", "llama") == "lm_head.weight"
    assert gguf_to_hf_name("rope_freqs.weight", "llama") is None
    with pytest.raises(WeightsError, match="blk.0.ffn_gate_exps.weight"):
        gguf_to_hf_name("blk.0.ffn_gate_exps.weight", "llama")


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows for llama (independent of our inverse)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llamacpp_rope_freqs(head_dim, theta, sc):
    """llama.cpp's rope_freqs tensor for a llama3 RoPE scaling (as convert_hf_to_gguf computes it)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old = sc["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old / sc["low_freq_factor"], old / sc["high_freq_factor"]
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < hi_wavelen:
            out.append(1.0)
        elif wavelen > lo_wavelen:
            out.append(sc["factor"])
        else:
            smooth = (old / wavelen - sc["low_freq_factor"]) / (sc["high_freq_factor"] - sc["low_freq_factor"])
            out.append(1 / ((1 - smooth) / sc["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(hf, arch: str, path, quantize: bool = True):
    """Write a tiny HF model as llama.cpp's converter would: its names, Gemma norms + 1, llama Q/K permuted,
    llama3 RoPE scaling as a rope_freqs tensor, 2-D weights as Q8_0 when `quantize`."""
    import gguf

    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = cfg.rope_parameters
    rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(rope["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    vocab = cfg.vocab_size
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"tok{i}" for i in range(4, vocab)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 4 + [-float(i) for i in range(4, vocab)])
    w.add_token_types([3, 3, 3, 2] + [1] * (vocab - 4))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    gemma = arch.startswith("gemma")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "post_attention_norm" if gemma else "ffn_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{block[rest.removesuffix('.weight')]}.weight"
        else:
            gname = names[name]
        a = t.detach().float().numpy().copy()
        if gemma and name.endswith("norm.weight"):
            a = a + 1.0
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = _llamacpp_permute(a, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            a = _llamacpp_permute(a, cfg.num_key_value_heads)
        if quantize and a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(gname, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a)
    if arch == "llama" and rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llamacpp_rope_freqs(head_dim, rope["rope_theta"], rope))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gemma3_gguf_matches_transformers_gguf_loader(tmp_path):
    """Quantized (Q8_0) tiny Gemma 3: our conversion equals transformers' reading of the same file, and the
    cache makes the second load skip the conversion."""
    from transformers import AutoModelForCausalLM

    import cec.engine.weights as W

    hf = hf_model("gemma3", head_dim=256, query_pre_attn_scalar=256, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=128,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    path = write_gguf(hf, "gemma3", tmp_path / "tiny-gemma3.gguf")
    ours, tok = load_model(path)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    assert ours.config.sliding_window == 8 and ours.config.query_pre_attn_scalar == 256
    assert ours.config.layer_types.count("full_attention") == 1
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.vocab_size) == (2, [1], 0, 300)
    _same_params(ours, ref)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))  # > sliding window
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - ref(ids).logits).abs().max().item() < TOL
        # and close to the unquantized original (Q8_0 error only)
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max().item() < 0.05

    cache = resolve(path)
    assert (cache / "config.json").is_file() and (cache / "tokenizer.json").is_file()

    def no_conversion(*a, **k):
        raise AssertionError("converted again despite the cache")

    original = W.convert_gguf
    W.convert_gguf = no_conversion
    try:
        again, _ = load_model(path)
    finally:
        W.convert_gguf = original
    _same_params(again, ref)


def test_llama_gguf_matches_transformers_gguf_loader(tmp_path):
    """Tiny Llama with llama.cpp's Q/K permutation, quantized: equal to transformers' reading of the file."""
    from transformers import AutoModelForCausalLM

    hf = hf_model("llama", intermediate_size=128)
    path = write_gguf(hf, "llama", tmp_path / "tiny-llama.gguf")
    ours, _ = load_model(path)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    assert not ours.config.tie_word_embeddings
    _same_params(ours, ref)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - ref(ids).logits).abs().max().item() < TOL


def test_llama3_rope_scaling_gguf_equals_original(tmp_path):
    """Unquantized tiny Llama 3.1-style model (rope_freqs tensor): our conversion gives back the HF model."""
    hf = hf_model("llama3_scaled")
    ours, _ = load_model(write_gguf(hf, "llama", tmp_path / "tiny-llama31.gguf", quantize=False))
    sc = ours.config.rope_scaling
    assert (sc["rope_type"], sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]) == ("llama3", 8, 1, 4)
    _same_params(ours, hf)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - hf(ids).logits).abs().max().item() < TOL


def test_llama3_scaling_recovered_from_rope_freqs():
    sc = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    got = _llama3_scaling_from_freqs(_llamacpp_rope_freqs(128, 500000.0, sc), 128, 500000.0)
    assert got == sc  # Llama 3.2's parameters come back exactly
    with pytest.raises(ConfigError, match="rope_freqs"):
        _llama3_scaling_from_freqs(np.linspace(3, 1, 64, dtype=np.float32), 128, 500000.0)


def test_gguf_with_unknown_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'mamba'"):
        resolve(tmp_path / "x.gguf")
    assert not any(p.name.startswith(".") for p in (tmp_path / "cec_cache").glob("*")), "temp folder left"


def test_gguf_metadata_that_does_not_match_its_tensors(tmp_path):
    hf = hf_model("llama")
    hf.config.intermediate_size = 128  # metadata says 128, tensors are 96 wide
    with pytest.raises(ConfigError, match="blk.0.ffn_gate.weight.*has shape"):
        resolve(write_gguf(hf, "llama", tmp_path / "bad.gguf", quantize=False))
    leftovers = list((tmp_path / "cec_cache").iterdir()) if (tmp_path / "cec_cache").exists() else []
    assert not leftovers, leftovers
    shutil.rmtree(tmp_path / "cec_cache", ignore_errors=True)


def test_truncated_gguf_and_gguf_without_vocabulary(tmp_path):
    import gguf

    from cec.errors import TokenizerError

    hf = hf_model("llama")
    path = write_gguf(hf, "llama", tmp_path / "full.gguf", quantize=False)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(WeightsError, match="cannot read GGUF file"):
        resolve(tmp_path / "cut.gguf")

    reader = gguf.GGUFReader(path)  # the same model, its vocabulary left out
    w = gguf.GGUFWriter(str(tmp_path / "novocab.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama.") and len(field.types) == 1:
            vtype = field.types[0]
            w.add_key_value(key, field.contents(), vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match="no vocabulary"):
        resolve(tmp_path / "novocab.gguf")
