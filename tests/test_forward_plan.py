"""The forward plan (positions, RoPE, masks, kept rows, cache or prefix), built once per forward, and cascade
attention: the prefix partial merged with the suffix partial equals attention over all keys at once."""
import pytest
import torch

from cec.engine.attention import LayerMasks, attend_with_lse, cascade_attend, position_mask
from cec.engine.scorer import visible
from hf_tiny import hf_model, ours_from_hf

TOL = 1e-4


@pytest.fixture(scope="module")
def gemma2():
    """Sliding window 8 on every other layer, attention soft-cap: every kind of mask in one model."""
    return ours_from_hf(hf_model("gemma2", seed=2))


@pytest.mark.parametrize("softcap", [None, 50.0])
@pytest.mark.parametrize("window", [None, 5])
def test_cascade_equals_attention_over_prefix_and_suffix(softcap, window):
    g = torch.Generator().manual_seed(0)
    b, h, hkv, p, t, d = 3, 4, 2, 7, 5, 8
    q = torch.randn(b, h, t, d, generator=g)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    pk, pv = torch.randn(1, hkv, p, d, generator=g), torch.randn(1, hkv, p, d, generator=g)
    q_pos, p_pos = torch.arange(p, p + t), torch.arange(p)
    seen = visible(p, [None, (1, 4), (0, p)], None)  # the third question sees no prefix key at all
    prefix_mask = position_mask(q_pos.expand(b, t).reshape(-1), p_pos, window) & seen.repeat_interleave(t, 0)
    suffix_mask = position_mask(q_pos, q_pos, window).view(1, 1, t, t)
    got = cascade_attend(q, k, v, pk, pv, d ** -0.5, LayerMasks(suffix_mask, prefix_mask), softcap)
    # one question at a time against its keys laid end to end, in float64
    all_k, all_v = torch.cat([pk.expand(b, -1, -1, -1), k], 2), torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    mask = torch.cat([prefix_mask.view(b, 1, t, p), suffix_mask.expand(b, 1, t, t)], -1)
    want, _ = attend_with_lse(q.double(), all_k.double(), all_v.double(), d ** -0.5, mask, softcap)
    assert (got - want.float()).abs().max().item() < 1e-5


def test_plan_masks_have_one_shape(gemma2):
    """attn [B or 1, 1, Tq, S] (None only for causal by index where no window bites), prefix [B*Tq, P];
    the kept rows: attn [B, 1, 1, S], prefix [B, P], RoPE [B, 1, 1, D]."""
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    plan = gemma2.plan(ids, last=torch.tensor([11, 4]))
    assert plan.queries.masks[None].attn is None and plan.queries.masks[8].attn.shape == (1, 1, 12, 12)
    assert all(m.attn.shape == (2, 1, 1, 12) for m in plan.final.masks.values())
    assert all(c.shape == (2, 1, 1, 16) for cs in plan.final.rope.values() for c in cs)
    cache = gemma2.new_cache(40)
    gemma2(torch.randint(0, 300, (1, 20)), cache=cache)
    prefix = cache.as_prefix()
    plan = gemma2.plan(ids, prefix=prefix, prefix_visible=visible(20, [(2, 5), None]), last=torch.tensor([11, 4]))
    # the window-8 layers read prefix slots 13.. only (the earliest query, at 20, reaches back to 13)
    assert plan.queries.masks[None].attn.shape == (1, 1, 12, 12) and plan.queries.masks[8].prefix.shape == (24, 7)
    assert plan.queries.masks[8].prefix_start == 13 and plan.queries.masks[None].prefix_start == 0
    assert plan.final.masks[None].prefix.shape == (2, 20) and plan.final.masks[8].attn.shape == (2, 1, 1, 12)
    assert plan.final.masks[8].prefix.shape == (2, 7) and plan.final.masks[8].prefix_start == 13
    untrimmed = gemma2.plan(ids, prefix=prefix, last=torch.tensor([11, 4]), trim=False)
    assert untrimmed.queries.masks[8].prefix.shape == (24, 20) and untrimmed.queries.masks[8].prefix_start == 0
    with torch.no_grad():  # the same scores either way
        assert torch.allclose(gemma2(ids, plan=plan), gemma2(ids, plan=gemma2.plan(
            ids, prefix=prefix, prefix_visible=visible(20, [(2, 5), None]), last=torch.tensor([11, 4]), trim=False)),
            atol=1e-5)
    assert plan.positions.tolist() == list(range(20, 32)) and plan.prefix is prefix and plan.cache is None


def test_given_plan_equals_plan_built_in_forward(gemma2):
    ids = torch.randint(0, 300, (3, 14), generator=torch.Generator().manual_seed(2))
    last = torch.tensor([13, 2, 9])
    with torch.no_grad():
        assert torch.equal(gemma2(ids, plan=gemma2.plan(ids, last=last)), gemma2(ids, last=last))


def test_kept_rows_with_a_cache_equal_the_full_forward(gemma2):
    """Chunked prefill that keeps one row of the chunk: the row the whole sequence at once gives."""
    ids = torch.randint(0, 300, (1, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = gemma2(ids, final_norm=False)[0]
        cache = gemma2.new_cache(23)
        gemma2(ids[:, :11], cache=cache)
        row = gemma2(ids[:, 11:], cache=cache, final_norm=False, last=torch.tensor([7]))
    assert row.shape == (1, 1, full.shape[-1]) and cache.length == 23
    assert (row[0, 0] - full[18]).abs().max().item() < TOL
