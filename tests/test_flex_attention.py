"""Shared-prefix scoring by one FlexAttention call per layer (attention="flex") and by the compiled layer stack
(compile=True) gives the scores of cascade attention and of the naive full-sequence forward, per family, hidden
prefix ranges included; the block mask built per block keeps every visible pair and skips what none can see."""
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention

from cec.engine import attention
from cec.engine.attention import FLEX_BLOCK, LayerMasks, QuestionLayout, cascade_attend, flex_attend, position_mask
from cec.engine.cache import FAR
from cec.engine.scorer import PrefixScorer, bucket, fixed_batches, head_for, prefix_slots, score_naive, visible
from hf_tiny import FAMILIES, hf_model, ours_from_hf

TOL = 1e-5
YES, NO = [7, 11], [13]
# eager flex_attention (the dense reference of the compiled kernel) says so once per process
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def listed(num, idx, nk):
    """A BlockMask's (count, indices) of key blocks per query block -> [nq, nk] bool."""
    out = torch.zeros(num.shape[-1], nk, dtype=torch.bool)
    for i, n in enumerate(num[0, 0].tolist()):
        out[i, idx[0, 0, i, :n].long()] = True
    return out


def by_block(dense, block=FLEX_BLOCK):
    """[Tq, S] bool -> ([nq, nk] some pair visible, [nq, nk] every pair visible), the tail blocks padded."""
    tq, s = dense.shape
    nq, nk = -(-tq // block), -(-s // block)
    some = torch.zeros(nq * block, nk * block, dtype=torch.bool)
    every = torch.ones(nq * block, nk * block, dtype=torch.bool)
    some[:tq, :s], every[:tq, :s] = dense, dense
    view = lambda m: m.view(nq, block, nk, block)  # noqa: E731
    return view(some).any(3).any(1), view(every).all(3).all(1)


def layout(b, t, p, pad=0, hide=None, keep=None):
    """b questions of t tokens after a prefix of p tokens (and pad slots at FAR), as in the scorer."""
    positions = torch.arange(p, p + t).expand(b, t)
    prefix_pos = torch.cat([torch.arange(p), torch.full((pad,), FAR)])
    seen = None if hide is None else visible(p + pad, hide)
    lay = QuestionLayout.of(positions, prefix_pos, seen)
    return lay if keep is None else lay.keep(keep)


@pytest.mark.parametrize("window", [None, 5, 130])
@pytest.mark.parametrize("kept", [False, True])
def test_block_mask_lists_every_visible_pair_and_calls_full_only_full_blocks(window, kept):
    b, t, p, pad = 7, 40, 300, 212  # 280 queries, 792 keys: tail blocks on both sides, prefix padded to 512
    hide = [None, (0, 300), (10, 200), None, (250, 260), None, (0, 128)]
    keep = torch.tensor([39, 0, 17, 5, 39, 22, 1]) if kept else None
    lay = layout(b, t, p, pad, hide, keep)
    mask = lay.block_mask(window)
    dense = create_mask(lay.mask_mod(window), 1, 1, lay.q_row.shape[0], lay.k_row.shape[0], "cpu")[0, 0]
    some, every = by_block(dense)
    nk = some.shape[1]
    partial = listed(mask.kv_num_blocks, mask.kv_indices, nk)
    full = listed(mask.full_kv_num_blocks, mask.full_kv_indices, nk)
    assert not (partial & full).any()
    assert not (full & ~every).any(), "a block called full has a hidden pair"
    assert not (some & ~(partial | full)).any(), "a visible pair lies in a skipped block"
    assert not (partial | full)[:, -(-p // FLEX_BLOCK): (p + pad) // FLEX_BLOCK].any()  # padding only: skipped
    if window == 5:  # the window skips the prefix but for the block of its last keys
        assert not (partial | full)[:, : p // FLEX_BLOCK].any()
    if window is None and not kept:  # prefix keys all the questions of a query block see: not masked per element
        assert full.any()


@pytest.mark.parametrize("softcap", [None, 50.0])
@pytest.mark.parametrize("window", [None, 5])
def test_flex_attend_equals_cascade_attend(softcap, window):
    """Eager flex_attention; the compiled kernel is checked in the scores below."""
    g = torch.Generator().manual_seed(0)
    b, h, hkv, p, t, d = 3, 4, 2, 150, 5, 8
    q = torch.randn(b, h, t, d, generator=g)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    pk, pv = torch.randn(1, hkv, p, d, generator=g), torch.randn(1, hkv, p, d, generator=g)
    q_pos, p_pos = torch.arange(p, p + t), torch.arange(p)
    seen = visible(p, [None, (1, 140), (0, p)])  # the third question sees no prefix key at all
    prefix_mask = position_mask(q_pos.expand(b, t).reshape(-1), p_pos, window) & seen.repeat_interleave(t, 0)
    suffix_mask = position_mask(q_pos, q_pos, window).view(1, 1, t, t)
    want = cascade_attend(q, k, v, pk, pv, d ** -0.5, LayerMasks(suffix_mask, prefix_mask), softcap)
    mask = QuestionLayout.of(q_pos.expand(b, t), p_pos, seen).block_mask(window)
    got = flex_attend(q, k, v, pk, pv, d ** -0.5, mask, softcap, kernel=flex_attention)
    assert (got - want).abs().max().item() < TOL


def test_bucket_shapes():
    assert [bucket(n) for n in (1, 8, 9, 12, 13, 16, 17, 25, 33, 49, 100)] == [8, 8, 12, 12, 16, 16, 24, 32, 48, 64,
                                                                               128]
    assert [prefix_slots(n) for n in (1, 256, 257, 3000)] == [256, 256, 512, 4096]
    lengths = [5, 1, 9, 3, 30, 8, 2, 17, 12, 12, 12]
    batches = fixed_batches(lengths, max_tokens=48, max_batch=3)
    assert sorted(i for idx, _, _ in batches for i in idx) == list(range(len(lengths)))
    for idx, rows, width in batches:
        assert width == bucket(max(lengths[i] for i in idx)) and all(bucket(lengths[i]) == width for i in idx)
        assert len(idx) <= rows <= 3 and rows * width <= max(48, width)
    # width 8: 3 rows, then 2 left; width 12: 3 + 1 (48 tokens hold 4, max_batch 3); 24 and 32: one row fits
    assert sorted((rows, width) for _, rows, width in batches) == [(1, 12), (1, 24), (1, 32), (2, 8), (3, 8), (3, 12)]
    assert [len(idx) for idx, rows, width in fixed_batches([3] * 5, 64, 8)] == [5]
    assert [rows for _, rows, _ in fixed_batches([3] * 5, 64, 8)] == [8]  # padding rows up to a power of two


def questions_for(seed, n, lo, hi, common=()):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [list(common) + torch.randint(1, 300, (k,), generator=g).tolist() for k in lens]


HIDE = [None, (2, 9), None, (0, 29), (5, 6), [(0, 4), (12, 29)], None, (10, 20), []]  # a range, or a list of them


# every family with eager flex_attention; the compiled kernel (seconds to compile each) with and without soft-cap
@pytest.mark.parametrize("family, kernel", [(f, "eager") for f in FAMILIES] + [("llama", "compiled"),
                                                                            ("gemma2", "compiled")])
def test_flex_scores_equal_cascade_and_naive(family, kernel, monkeypatch):
    """In the eager stack, at a fixed shape: 9 questions in 16 rows of width 8 (7 padding rows), the prefix of 29
    tokens (more than the window, 8) in a cache of 256 slots."""
    if kernel == "eager":
        monkeypatch.setattr(attention, "_flex_kernel", lambda: flex_attention)
    family_model = ours_from_hf(hf_model(family, seed=5))
    head = head_for(family_model, YES, NO)
    prefix = torch.randint(1, 300, (29,), generator=torch.Generator().manual_seed(3)).tolist()
    questions = questions_for(4, 9, 1, 6, common=[3, 4])
    for hide in (None, HIDE):
        scorer = PrefixScorer(family_model, head, attention="flex")
        flex = scorer.score(prefix, questions, hide)
        assert (scorer.stats.question_tokens, scorer.stats.shapes) == (16 * 8, 1)
        cascade = PrefixScorer(family_model, head).score(prefix, questions, hide)
        naive = score_naive(family_model, head, prefix, questions, hide=hide)
        assert (flex - cascade).abs().max().item() < TOL and (flex - naive).abs().max().item() < TOL


@pytest.mark.parametrize("attention", ["cascade", "flex"])
def test_compiled_stack_scores_equal_eager_and_compile_once(attention):
    """The layer stack compiled (a 2-layer Gemma 2: one sliding-window layer, one full, soft-capped), one fixed
    shape, hidden ranges or not; the second call compiles nothing."""
    model = ours_from_hf(hf_model("gemma2", seed=6, num_hidden_layers=2,
                                  layer_types=["sliding_attention", "full_attention"]))
    head = head_for(model, YES, NO)
    prefix = torch.randint(1, 300, (29,), generator=torch.Generator().manual_seed(5)).tolist()
    questions = questions_for(6, 9, 1, 6, common=[3, 4])
    compiled = PrefixScorer(model, head, attention=attention, compile=True)
    for hide in (None, HIDE):
        first = compiled.score(prefix, questions, hide)
        assert compiled.stats.shapes == 1 and compiled.stats.batches == 1
        again = compiled.score(prefix, questions, hide)
        assert compiled.stats.compile_seconds == 0.0
        eager = PrefixScorer(model, head).score(prefix, questions, hide)
        naive = score_naive(model, head, prefix, questions, hide=hide)
        assert torch.equal(first, again)
        assert (first - eager).abs().max().item() < TOL and (first - naive).abs().max().item() < TOL


def test_padded_prefix_in_cascade_attention_is_hidden():
    """A prefix view over the whole cache buffer (slots past the cached tokens at FAR) scores as the exact one."""
    model = ours_from_hf(hf_model("llama", seed=5))
    cache = model.new_cache(64)
    with torch.no_grad():
        model(torch.randint(1, 300, (1, 21)), cache=cache)
    ids = torch.randint(1, 300, (3, 6))
    padded, exact = cache.as_prefix(whole=True), cache.as_prefix()
    assert padded.padded and padded.length == exact.length == 21 and padded.positions.shape[0] == 64
    with torch.no_grad():
        got = model(ids, plan=model.plan(ids, prefix=padded))
        want = model(ids, plan=model.plan(ids, prefix=exact))
    assert (got - want).abs().max().item() < TOL


def test_flex_plan_has_block_masks_only():
    model = ours_from_hf(hf_model("gemma2", seed=2))
    cache = model.new_cache(20)
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 20)), cache=cache)
    ids = torch.randint(0, 300, (2, 12))
    plan = model.plan(ids, prefix=cache.as_prefix(), last=torch.tensor([11, 4]), attention="flex")
    for queries, n in ((plan.queries, 24), (plan.final, 2)):
        assert set(queries.masks) == {None, 8}
        for m in queries.masks.values():
            assert m.attn is None and m.prefix is None and m.block.seq_lengths == (n, 20 + 24)
    assert plan.positions.tolist() == list(range(20, 32)) and plan.cache is None


def test_unknown_attention_is_refused():
    model = ours_from_hf(hf_model("llama", seed=5))
    with pytest.raises(ValueError, match="attention"):
        PrefixScorer(model, head_for(model, YES, NO), attention="sdpa")


def test_pipeline_and_infer_pass_the_scoring_options_on(tmp_path):
    import json

    from tiny_train import save_tiny_model, tiny_concept_set

    from cec.coding.pipeline import CECPipeline
    from cec.commands.infer import parse_args

    save_tiny_model(tmp_path / "model", vocab_size=600)
    tiny_concept_set().save(tmp_path / "concepts.json")
    (tmp_path / "cec_pipeline.json").write_text(json.dumps(
        {"base_model": str(tmp_path / "model"), "concept_set": str(tmp_path / "concepts.json")}))
    note = "Patient has fever and chills.\nHigh blood pressure on lisinopril."
    torch.set_num_threads(1)
    cascade = CECPipeline.load(tmp_path)
    flex = CECPipeline.load(tmp_path, attention="flex")
    assert {flex.concept_scorer.attention, flex.label_scorer.attention} == {"flex"}
    assert cascade.concept_scorer.attention == "cascade" and not cascade.concept_scorer.compile
    a, b = cascade.code_note(note), flex.code_note(note)
    assert (a.concept_probs - b.concept_probs).abs().max().item() < TOL
    assert (a.code_probs - b.code_probs).abs().max().item() < TOL
    args = parse_args(["--note", "x.txt", "--attention", "flex", "--compile"])
    assert args.attention == "flex" and args.compile
    args = parse_args(["--note", "x.txt"])
    assert args.attention == "cascade" and not args.compile
