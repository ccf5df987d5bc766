"""Our LoRA against PEFT: adapters move both ways with equal logits; merge, unmerge and errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cec.errors import AdapterError
from cec.engine.lora import (LoRALinear, inject_lora, load_adapter, lora_parameters, lora_state_dict, merge_lora,
                      remove_lora, save_adapter, unmerge_lora)
from hf_tiny import hf_model, ours_from_hf

TOL = 1e-4
peft = pytest.importorskip("peft")


def ids(n=9, seed=0):
    return torch.randint(0, 300, (2, n), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("family,targets,rslora", [("llama", "all-linear", False),
                                                   ("gemma3", ["k_proj", "v_proj"], True),
                                                   ("gemma2", ["q_proj", "down_proj"], False)])
def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path, family, targets, rslora):
    hf = hf_model(family)
    ours = ours_from_hf(hf)
    cfg = inject_lora(ours, targets, r=4, alpha=16, dropout=0.05, use_rslora=rslora, base_model="tiny")
    randomize_lora(ours)
    save_adapter(ours, tmp_path, cfg)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys or family == "gemma3"
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    ours.eval()
    x = ids()
    with torch.no_grad():
        ref = peft_model(input_ids=x).logits
        out = ours.logits(ours(x))
    assert (out - ref).abs().max().item() < TOL
    plain = ours_from_hf(hf_model(family))
    with torch.no_grad():  # the adapter really changes the output
        assert (plain.logits(plain(x)) - out).abs().max().item() > 1e-3


@pytest.mark.parametrize("family,rslora", [("llama", False), ("gemma3", True)])
def test_peft_adapter_loads_in_ours_with_equal_logits(tmp_path, family, rslora):
    hf = hf_model(family)
    ours = ours_from_hf(hf)
    torch.manual_seed(1)
    conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.1,
                           init_lora_weights=False, use_rslora=rslora)  # random non-zero B
    peft_model = peft.get_peft_model(hf, conf).eval()
    peft_model.save_pretrained(str(tmp_path))
    config, _ = load_adapter(ours, tmp_path)
    assert config.r == 4 and config.use_rslora == rslora
    assert set(config.target_modules) == {"q_proj", "v_proj", "up_proj"}
    ours.eval()
    x = ids(seed=1)
    with torch.no_grad():
        ref = peft_model(input_ids=x).logits
        out = ours.logits(ours(x))
    assert (out - ref).abs().max().item() < TOL


def test_inject_freezes_base_and_starts_at_identity():
    ours = ours_from_hf(hf_model("llama"))
    x = ids(seed=2)
    with torch.no_grad():
        before = ours(x)
    cfg = inject_lora(ours, "all-linear", r=2, alpha=4)
    assert sorted(cfg.target_modules) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert not isinstance(ours.lm_head, LoRALinear)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * ours.config.num_layers
    with torch.no_grad():
        assert torch.equal(ours(x), before)  # B = 0
    assert "model.layers.0.self_attn.q_proj.weight" in ours.state_dict()  # base names unchanged


def test_merge_equals_unmerged_and_unmerge_restores():
    ours = ours_from_hf(hf_model("gemma3")).eval()
    inject_lora(ours, ["q_proj", "o_proj", "gate_proj"], r=4, alpha=32)
    randomize_lora(ours, seed=3)
    w0 = ours.model.layers[0].self_attn.q_proj.weight.clone()
    x = ids(seed=3)
    with torch.no_grad():
        unmerged = ours(x)
        merge_lora(ours)
        merged = ours(x)
        assert not torch.equal(ours.model.layers[0].self_attn.q_proj.weight, w0)
        unmerge_lora(ours)
        again = ours(x)
    assert (merged - unmerged).abs().max().item() < TOL
    assert (ours.model.layers[0].self_attn.q_proj.weight - w0).abs().max().item() < 1e-6
    assert (again - unmerged).abs().max().item() < 1e-5
    with torch.no_grad():
        remove_lora(ours, merge=True)
        assert not lora_state_dict(ours) and (ours(x) - unmerged).abs().max().item() < TOL


def test_bf16_save_and_reload(tmp_path):
    ours = ours_from_hf(hf_model("llama"))
    cfg = inject_lora(ours, ["v_proj"], r=2, alpha=2)
    randomize_lora(ours, seed=4)
    save_adapter(ours, tmp_path, cfg, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "adapter_model.safetensors").values())
    other = ours_from_hf(hf_model("llama"))
    load_adapter(other, tmp_path)
    for k, v in lora_state_dict(other).items():
        assert torch.equal(v, lora_state_dict(ours)[k].to(torch.bfloat16).float())


def test_errors_are_adapter_errors(tmp_path):
    small = ours_from_hf(hf_model("llama"))
    cfg = inject_lora(small, ["q_proj"], r=2, alpha=2)
    save_adapter(small, tmp_path / "a", cfg)
    wider = ours_from_hf(hf_model("llama", hidden_size=32, intermediate_size=48))
    with pytest.raises(AdapterError, match="another base model"):  # fingerprint in cec_adapter.json
        load_adapter(wider, tmp_path / "a")
    (tmp_path / "a" / "cec_adapter.json").unlink()
    with pytest.raises(AdapterError, match="shape"):  # a PEFT adapter without our metadata: shapes decide
        load_adapter(ours_from_hf(hf_model("llama", hidden_size=32, intermediate_size=48)), tmp_path / "a")
    # a .bin adapter is refused
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="only adapter_model.safetensors"):
        load_adapter(ours_from_hf(hf_model("llama")), tmp_path / "b")
    # missing tensors, unknown tensors, missing folder, non-LoRA config
    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    save_file(dict(list(sd.items())[1:]), tmp_path / "c" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="adapter lacks"):
        load_adapter(ours_from_hf(hf_model("llama")), tmp_path / "c")
    save_file({**sd, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": sd[next(iter(sd))].clone()},
              tmp_path / "c" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="tensors this model lacks"):
        load_adapter(ours_from_hf(hf_model("llama")), tmp_path / "c")
    (tmp_path / "c" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    plain = ours_from_hf(hf_model("llama"))
    with pytest.raises(AdapterError, match=r"c/adapter_model\.safetensors: unreadable safetensors file \(") as e:
        load_adapter(plain, tmp_path / "c")
    assert "\n" not in str(e.value)
    assert not lora_parameters(plain)  # a failed load leaves no LoRA layers it injected
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(small, tmp_path / "nope")
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(ours_from_hf(hf_model("llama")), tmp_path / "a")
    with pytest.raises(AdapterError, match="no Linear"):
        inject_lora(ours_from_hf(hf_model("llama")), ["nothing_proj"])
