"""Shared-prefix scores equal naive full-sequence scores, by our model and by HF transformers, per family."""
import pytest
import torch

from cec.coding.pipeline import fold_lora, share_base
from cec.engine.lora import inject_lora, lora_layers
from cec.engine.scorer import PrefixScorer, batches_by_length, common_prefix_len, head_for, score_naive
from hf_tiny import FAMILIES, hf_model, ours_from_hf

TOL = 1e-4
YES, NO = [7, 11], [13]


def hf_scores(hf, prefix, questions):
    """Independent oracle: HF's full logits of prefix+question, logsumexp over the answer ids."""
    out = []
    with torch.no_grad():
        for q in questions:
            logits = hf(torch.tensor([prefix + q])).logits[0, -1].float()
            out.append(torch.logsumexp(logits[YES], 0) - torch.logsumexp(logits[NO], 0))
    return torch.stack(out)


def make_questions(seed, n, lo, hi, common=()):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [list(common) + torch.randint(1, 300, (k,), generator=g).tolist() for k in lens]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    hf = hf_model(request.param, seed=5)
    return hf, ours_from_hf(hf)


@pytest.mark.parametrize("prefix_len", [6, 29])  # 29 > sliding window 8: prefix partial is window-masked
def test_shared_equals_naive_and_hf(pair, prefix_len):
    hf, ours = pair
    prefix = torch.randint(1, 300, (prefix_len,), generator=torch.Generator().manual_seed(prefix_len)).tolist()
    questions = make_questions(prefix_len, 9, 1, 12, common=[3, 4])  # mixed lengths, a shared start
    head = head_for(ours, YES, NO)
    scorer = PrefixScorer(ours, head, batch_tokens=24, chunk=5)  # several batches and prefill chunks
    shared = scorer.score(prefix, questions)
    assert scorer.stats.shared_question_tokens == 2
    naive = score_naive(ours, head, prefix, questions)
    ref = hf_scores(hf, prefix, questions)
    assert (shared - naive).abs().max().item() < TOL
    assert (shared - ref).abs().max().item() < TOL


def test_padding_and_batching_never_change_a_score(pair):
    _, ours = pair
    head = head_for(ours, YES, NO)
    prefix = list(range(20, 45))
    questions = make_questions(9, 7, 1, 15)
    alone = torch.cat([PrefixScorer(ours, head).score(prefix, [q]) for q in questions])
    together = PrefixScorer(ours, head, batch_tokens=10_000, share_question_prefix=False).score(prefix, questions)
    assert (alone - together).abs().max().item() < TOL


def test_common_prefix_len_leaves_a_token():
    assert common_prefix_len([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix_len([[1, 2], [1, 2, 3]]) == 1
    assert common_prefix_len([[5, 6, 7]]) == 2
    assert common_prefix_len([[1], [2]]) == 0


def test_batches_respect_budget_and_cover_all():
    lengths = [5, 1, 9, 3, 3, 8, 2]
    batches = batches_by_length(lengths, max_tokens=12, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= max(12, max(lengths[i] for i in b))


def test_prefix_cache_is_not_copied_per_question(pair):
    """Peak extra memory grows with the question tokens in a batch, not with batch x prefix length."""
    _, ours = pair
    head = head_for(ours, YES, NO)
    scorer = PrefixScorer(ours, head, batch_tokens=10_000)
    prefix = list(range(1, 120))
    cache = scorer.encode_prefix(prefix)
    before = sum(t.numel() for t in cache.k + cache.v)
    scorer.score_cached(cache, make_questions(2, 16, 3, 3))
    assert sum(t.numel() for t in cache.k + cache.v) == before and cache.length == len(prefix)


def test_folded_lora_scores_equal_lora_layers_and_leave_the_base_alone():
    hf = hf_model("gemma3", seed=7)
    base = ours_from_hf(hf)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = share_base(base)
    inject_lora(adapted, "all-linear", r=4, alpha=8)
    torch.manual_seed(0)
    for layer in lora_layers(adapted).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    adapted.eval()
    prefix, questions = list(range(30, 50)), make_questions(11, 6, 2, 9)
    with_lora = PrefixScorer(adapted, head_for(adapted, YES, NO)).score(prefix, questions)
    fold_lora(adapted)
    assert not lora_layers(adapted)
    folded = PrefixScorer(adapted, head_for(adapted, YES, NO)).score(prefix, questions)
    assert (with_lora - folded).abs().max().item() < TOL
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
