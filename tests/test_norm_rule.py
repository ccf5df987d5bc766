"""One flag, ModelConfig.llama_norm, sets the cast rule of every RMSNorm: the model's, the yes/no head's final norm
and the kernel's. Whatever the norm offset, head scores equal l_yes - l_no of the model's own logits."""
import dataclasses

import pytest
import torch

from cec.engine.config import ModelConfig
from cec.engine.heads import YesNoHead
from cec.engine.model import Transformer
from cec.engine.scorer import head_for
from hf_tiny import hf_model

YES, NO = [7, 11], [13]


def model_with_rule(family: str, llama_norm: bool, device="cpu") -> Transformer:
    """A tiny model of `family` whose norms follow the given rule, in bf16, where the cast order shows."""
    hf = hf_model(family, seed=3)
    cfg = dataclasses.replace(ModelConfig.from_hf(hf.config.to_dict()), llama_norm=llama_norm)
    model = Transformer(cfg).eval()
    model.load_state_dict(hf.state_dict(), strict=False)
    model.tie_weights()
    return model.to(device, torch.bfloat16)


def own_logit_scores(model, ids):
    """(l_yes - l_no from the model's full logits at the last position, the pre-final-norm hidden there)."""
    with torch.no_grad():
        logits = model.logits(model(ids))[:, -1].float()
        hidden = model(ids, final_norm=False)[:, -1]
    return torch.logsumexp(logits[:, YES], -1) - torch.logsumexp(logits[:, NO], -1), hidden


def test_families_set_their_rule():
    for family in ("llama", "gemma", "gemma2", "gemma3"):
        cfg = ModelConfig.from_hf(hf_model(family).config.to_dict())
        assert cfg.llama_norm == (family == "llama")


# llama/False: offset 0 with Gemma's fp32 casts; gemma/True: offset 1 with Llama's casts; then the shipped pairs
@pytest.mark.parametrize("family,llama_norm", [("llama", False), ("gemma", True), ("llama", True), ("gemma", False)])
def test_head_scores_equal_the_models_own_logits(family, llama_norm):
    model = model_with_rule(family, llama_norm)
    assert model.model.norm.llama_norm == llama_norm and model.model.norm.offset == model.config.norm_offset
    ids = torch.randint(0, 300, (6, 9), generator=torch.Generator().manual_seed(1))
    want, hidden = own_logit_scores(model, ids)
    got = head_for(model, YES, NO).scores(hidden)
    assert torch.equal(got, want)
    # the other rule rounds differently, so the equality above is the rule's doing
    other = dataclasses.replace(model.config, llama_norm=not llama_norm)
    flipped = YesNoHead.from_config(other, model.model.norm.weight, model.lm_head.weight, YES, NO).scores(hidden)
    assert not torch.equal(flipped, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family,llama_norm", [("llama", False), ("gemma", True), ("llama", True), ("gemma", False)])
def test_kernel_scores_match_the_models_own_logits_cuda(family, llama_norm):
    pytest.importorskip("triton")
    model = model_with_rule(family, llama_norm, "cuda")
    ids = torch.randint(0, 300, (6, 9), generator=torch.Generator().manual_seed(1)).cuda()
    want, hidden = own_logit_scores(model, ids)
    got = head_for(model, YES, NO).scores(hidden)  # CUDA tensors: the Triton kernel
    # the kernel rounds where the reference does, its fp32 sums in another order: a logit may be a bf16 step off
    torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item() + 1e-2, rtol=0.0)
