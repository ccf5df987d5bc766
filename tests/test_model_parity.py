"""Our forward pass equals HF transformers' for every family: full sequence, and step by step with the cache."""
import pytest
import torch

from hf_tiny import FAMILIES, hf_model, ours_from_hf

TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    hf = hf_model(request.param)
    return request.param, hf, ours_from_hf(hf)


def test_config_flags(pair):
    family, hf, ours = pair
    cfg = ours.config
    assert cfg.norm_offset == (0.0 if family.startswith("llama") else 1.0)
    assert cfg.llama_norm == family.startswith("llama")
    if family == "gemma3":
        assert cfg.qk_norm and cfg.rope_local_theta == 10000.0 and cfg.rope_scaling["factor"] == 8.0
        assert cfg.layer_types.count("full_attention") == 1  # 7 layers, 5:1 pattern
    if family == "gemma2":
        assert cfg.attn_softcap == 50.0 and cfg.final_softcap == 30.0 and cfg.attn_scale == 24 ** -0.5
    if family == "llama3_scaled":
        assert cfg.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("length", [5, 37])  # 37 is longer than the sliding window of 8
def test_full_sequence_logits(pair, length):
    _, hf, ours = pair
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours.logits(ours(ids))
    assert (out - ref).abs().max().item() < TOL


def test_incremental_decoding_with_cache(pair):
    _, hf, ours = pair
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits[0]
        cache = ours.new_cache(30)
        ours(ids[:, :11], cache=cache)  # a prefill chunk, then one token at a time past the window
        steps = [ours.logits(ours(ids[:, i: i + 1], cache=cache))[0, 0] for i in range(11, 30)]
    assert (torch.stack(steps) - ref[11:]).abs().max().item() < TOL


def test_chunked_prefill_equals_one_pass(pair):
    _, _, ours = pair
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2))
    _, last_chunked = ours.prefill(ids, chunk=7)
    _, last_once = ours.prefill(ids, chunk=4096)
    assert (last_chunked - last_once).abs().max().item() < TOL


def test_greedy_generate_matches_hf(pair):
    _, hf, ours = pair
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert ours.generate(ids[0].tolist(), max_new_tokens=12, eos_ids=[]) == ref


def test_generate_stops_at_eos(pair):
    _, _, ours = pair
    ids = [5, 6, 7]
    first = ours.generate(ids, max_new_tokens=3, eos_ids=[])
    assert ours.generate(ids, max_new_tokens=3, eos_ids=[first[0]]) == []


def test_packed_block_mask_equals_separate_sequences(pair):
    """Two questions packed after one prefix, positions restarting: each sees the prefix and itself only."""
    _, _, ours = pair
    g = torch.Generator().manual_seed(4)
    prefix, q1, q2 = (torch.randint(0, 300, (n,), generator=g) for n in (12, 4, 6))
    packed = torch.cat([prefix, q1, q2]).view(1, -1)
    pos = torch.cat([torch.arange(12), torch.arange(12, 16), torch.arange(12, 18)])
    seg = torch.tensor([0] * 12 + [1] * 4 + [2] * 6)
    mask = (seg.view(-1, 1) == seg.view(1, -1)) | (seg.view(1, -1) == 0)
    with torch.no_grad():
        h = ours(packed, positions=pos, mask=mask)[0]
        h1 = ours(torch.cat([prefix, q1]).view(1, -1))[0]
        h2 = ours(torch.cat([prefix, q2]).view(1, -1))[0]
    assert (h[12:16] - h1[12:]).abs().max().item() < TOL
    assert (h[16:] - h2[12:]).abs().max().item() < TOL


def test_last_rows_only_equals_full_output(pair):
    """With `last`, the final layer computes one row per sequence; it equals that row of the full forward."""
    _, _, ours = pair
    ids = torch.randint(0, 300, (3, 21), generator=torch.Generator().manual_seed(5))
    last = torch.tensor([20, 3, 11])
    with torch.no_grad():
        full = ours(ids, final_norm=False)
        cut = ours(ids, final_norm=False, last=last)
        pos = torch.arange(21).expand(3, 21)  # per-sequence positions take the [B, 1, T, D] RoPE path
        cut2 = ours(ids, positions=pos, final_norm=False, last=last)
    want = full[torch.arange(3), last]
    assert cut.shape == (3, 1, full.shape[-1])
    assert (cut[:, 0] - want).abs().max().item() < TOL
    assert (cut2[:, 0] - want).abs().max().item() < TOL
