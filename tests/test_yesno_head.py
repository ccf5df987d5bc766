"""Yes/no head: the PyTorch reference against a naive full-vocabulary computation, the Triton kernel against the
reference (interpreted on CPU in fp32; compiled in bf16 on a GPU when one is present), and answer token ids."""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # before the kernel module is imported, so the kernel runs (interpreted) on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

from cec.errors import TokenizerError
from cec.engine.heads import NO_SPELLINGS, YES_SPELLINGS, YesNoHead, answer_token_ids, use_kernel, yes_no_scores, \
    yes_no_scores_reference
from cec.engine.model import rms_norm

triton = pytest.importorskip("triton")
from cec_kernels.yesno_head import yes_no_head  # noqa: E402

VOCAB = 300
FAMILIES = {  # name: (llama_norm, norm_offset, softcap)
    "llama": (True, 0.0, None),
    "gemma": (False, 1.0, None),
    "gemma2": (False, 1.0, 30.0),
    "gemma_no_offset": (False, 0.0, None),  # Gemma's fp32 casts without an offset, and the converse
    "llama_offset": (True, 1.0, None),
    "llama_capped": (True, 0.0, 5.0),
}


def make(n, h, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * 3.0 + 0.5
    norm_weight = torch.randn(h, generator=g) * 0.2 + 0.3
    out_weight = torch.randn(VOCAB, h, generator=g) * (4.0 / h**0.5)
    return [t.to(device=device, dtype=dtype) for t in (hidden, norm_weight, out_weight)]


def naive_scores(hidden, norm_weight, out_weight, yes_ids, no_ids, eps, norm_offset, softcap, llama_norm):
    """Written out from HF's modules: final RMSNorm, full lm_head, soft-cap, log-softmax; the chosen ids."""
    x = hidden.float()
    var = (x * x).sum(-1, keepdim=True) / x.shape[-1]
    if llama_norm:
        normed = (norm_weight + norm_offset) * (x / torch.sqrt(var + eps)).to(hidden.dtype)
    else:
        normed = ((x / torch.sqrt(var + eps)) * (1.0 * norm_offset + norm_weight.float())).to(hidden.dtype)
    logits = torch.nn.functional.linear(normed, out_weight)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits.float(), -1)
    p_yes = logp[:, yes_ids].exp().sum(-1)
    p_no = logp[:, no_ids].exp().sum(-1)
    return torch.log(p_yes) - torch.log(p_no)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ids", [([7], [11]), ([3, 250, 42], [9, 100]), ([5], [6, 7, 8])])
def test_reference_matches_full_vocabulary(family, ids):
    llama_norm, offset, cap = FAMILIES[family]
    hidden, w, out = make(6, 96, torch.float64)
    yes, no = ids
    kw = dict(eps=1e-6, norm_offset=offset, softcap=cap, llama_norm=llama_norm)
    got = yes_no_scores(hidden, w, out, yes, no, **kw)
    want = naive_scores(hidden, w, out, yes, no, 1e-6, offset, cap, llama_norm)
    assert got.dtype == torch.float32 and got.shape == (6,)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    assert want.abs().max() > 0.5  # scores far from zero, so a swapped side or a missing cap would show


def test_reference_matches_hf_norm_modules():
    """Our norms against transformers' own LlamaRMSNorm and GemmaRMSNorm, in bf16 where their cast order
    matters, and the full bf16 path against HF-style lm_head logits."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    hidden, w, out = make(8, 64, torch.bfloat16, seed=3)
    ln = llama.LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    gn = gemma.GemmaRMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ln.weight.copy_(w)
        gn.weight.copy_(w)
        assert torch.equal(rms_norm(hidden, w, 1e-5, 0.0, True), ln(hidden))
        assert torch.equal(rms_norm(hidden, w, 1e-6, 1.0, False), gn(hidden))
        for normed, (llama_norm, offset, eps) in ((ln(hidden), (True, 0.0, 1e-5)), (gn(hidden), (False, 1.0, 1e-6))):
            logits = torch.nn.functional.linear(normed, out)
            logits = torch.tanh(logits / 30.0) * 30.0  # Gemma 2's final soft-cap, in the model dtype like HF
            want = torch.logsumexp(logits.float()[:, [1, 2]], -1) - logits.float()[:, 3]
            got = yes_no_scores(hidden, w, out, [1, 2], [3], eps=eps, norm_offset=offset, softcap=30.0,
                                llama_norm=llama_norm)
            assert torch.equal(got, want)


def test_softcap_is_applied_per_logit():
    hidden, w, out = make(4, 64)
    out[1] *= 40.0  # a yes logit far above the cap
    kw = dict(eps=1e-6, norm_offset=0.0, llama_norm=True)
    capped = yes_no_scores(hidden, w, out, [1], [2], softcap=2.0, **kw)
    assert capped.abs().max() <= 4.0 + 1e-5  # each side within (-cap, cap)
    uncapped = yes_no_scores(hidden, w, out, [1], [2], softcap=None, **kw)
    assert uncapped.abs().max() > 4.0


@pytest.mark.parametrize("n,h,blocks", [
    (1, 64, {}), (5, 640, {}), (33, 640, dict(block_n=16, block_h=256)), (3, 3072, {}),
    (33, 3072, dict(block_n=16, block_h=128)), (5, 4096, {})])
@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_matches_reference_fp32(n, h, blocks, family):
    """Default blocks (one row per program, 512-wide chunks: 640 leaves a masked tail) and blocks of several
    rows (33 rows leave a masked tail of rows)."""
    llama_norm, offset, cap = FAMILIES[family]
    hidden, w, out = make(n, h, seed=n + h, device=DEVICE)
    counts = {64: (1, 1), 640: (3, 2), 3072: (2, 3), 4096: (1, 3)}[h]
    yes = [17 + 5 * i for i in range(counts[0])]
    no = [250 - 7 * i for i in range(counts[1])]
    kw = dict(eps=1e-6, norm_offset=offset, softcap=cap, llama_norm=llama_norm)
    want = yes_no_scores_reference(hidden, w, out[yes + no], len(yes), **kw)
    ids = torch.tensor(yes + no, dtype=torch.int32, device=DEVICE)
    got = yes_no_head(hidden, w, out, ids, len(yes), **kw, **blocks)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_kernel_strided_rows_and_head_class(monkeypatch):
    """Rows taken out of [B, T, H] (the answer positions) are strided; YesNoHead gathers its rows once and
    dispatches to the kernel (interpreted on CPU, which CEC_TRITON_INTERPRET asks for)."""
    monkeypatch.setenv("CEC_TRITON_INTERPRET", "1")
    hidden, w, out = make(3 * 7, 640, seed=1, device=DEVICE)
    last = hidden.view(3, 7, 640)[:, -1]  # stride 7 * 640
    assert not last.is_contiguous()
    head = YesNoHead(w, out, [4, 5], [6], eps=1e-6, norm_offset=1.0, softcap=30.0, llama_norm=False)
    assert use_kernel(last, head.norm_weight, head.rows)
    kw = dict(eps=1e-6, norm_offset=1.0, softcap=30.0, llama_norm=False)
    want = yes_no_scores_reference(last.contiguous(), w, out[[4, 5, 6]], 2, **kw)
    torch.testing.assert_close(head.scores(last), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(head.scores(hidden.view(3, 7, 640))[:, -1], want, atol=2e-5, rtol=1e-5)


def test_training_path_has_gradients():
    hidden, w, out = make(4, 64)
    hidden.requires_grad_(True)
    out.requires_grad_(True)  # a model's parameter: the head keeps a detached copy of its rows
    head = YesNoHead(w, out, [1], [2], eps=1e-6, norm_offset=0.0, softcap=None, llama_norm=True)
    for _ in range(2):  # steps of a training loop, each with its own backward
        head.scores(hidden).sum().backward()  # the kernel has no backward: dispatch takes the reference
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    want = torch.func.grad(lambda x: naive_scores(x, w, out.detach(), [1], [2], 1e-6, 0.0, None, True).sum())
    torch.testing.assert_close(hidden.grad, 2 * want(hidden.detach()), atol=1e-5, rtol=1e-4)


def test_bad_ids_are_user_errors():
    _, w, out = make(1, 64)
    kw = dict(eps=1e-6, norm_offset=0.0, softcap=None, llama_norm=True)
    with pytest.raises(TokenizerError, match="share"):
        YesNoHead(w, out, [1, 2], [2], **kw)
    with pytest.raises(TokenizerError, match="outside"):
        YesNoHead(w, out, [1], [VOCAB], **kw)
    with pytest.raises(TokenizerError, match="at least one"):
        YesNoHead(w, out, [], [3], **kw)


def fake_encode(text: str, add_bos: bool) -> list[int]:
    """A word-level tokenizer like SentencePiece's: a word keeps its leading space ("▁Yes" != "Yes"), and
    "Answer:Yes" stays one piece, so the bare word and the word after the prompt differ."""
    vocab = {"<bos>": 1, "Answer": 10, ":": 11, "▁Yes": 20, "Yes": 21, "▁yes": 22, "▁No": 30, "No": 31,
             "▁no": 32, ":Yes": 40, ":No": 41, "▁": 13}
    pieces, i = [], 0
    text = text.replace(" ", "▁")
    while i < len(text):
        for j in range(len(text), i, -1):  # greedy longest match
            if text[i:j] in vocab:
                pieces.append(vocab[text[i:j]])
                i = j
                break
        else:
            raise ValueError(f"cannot tokenize {text[i:]!r}")
    return ([1] if add_bos else []) + pieces


def test_answer_token_ids():
    assert answer_token_ids(fake_encode, "Answer", (":Yes", ":No")) == [40, 41]
    # "Answer:" + "Yes" tokenizes as Answer, ":Yes": the prompt's last token merges with the answer, and the
    # first token that differs from the prompt's (":Yes") is the one taken
    assert answer_token_ids(fake_encode, "Answer:", YES_SPELLINGS) == [20, 40, 22]
    assert answer_token_ids(fake_encode, "Answer:", NO_SPELLINGS) == [30, 41, 32]
    # the prompt's trailing space merges into "▁Yes"; repeated spellings are deduplicated
    assert answer_token_ids(fake_encode, "Answer: ", ("Yes", "yes", "Yes")) == [20, 22]
    # the bare word would be "No" (31) for " No"; after the prompt it is "▁No" (30)
    assert fake_encode("No", False) == [31] and answer_token_ids(fake_encode, "Answer:", [" No"]) == [30]
    with pytest.raises(TokenizerError, match="adds no token"):
        answer_token_ids(fake_encode, "Answer:", [""])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n,h", [(1, 640), (37, 3072), (375, 4096)])
def test_kernel_matches_reference_bf16_cuda(n, h, family):
    llama_norm, offset, cap = FAMILIES[family]
    hidden, w, out = make(n, h, torch.bfloat16, seed=h, device="cuda")
    yes, no = [3, 250, 42], [9, 100]
    kw = dict(eps=1e-6, norm_offset=offset, softcap=cap, llama_norm=llama_norm)
    want = yes_no_scores_reference(hidden, w, out[yes + no], len(yes), **kw)
    got = yes_no_scores(hidden, w, out, yes, no, **kw)  # CUDA tensors dispatch to the kernel
    ref32 = yes_no_scores_reference(hidden.float(), w.float(), out.float()[yes + no], len(yes), **kw)
    # bf16 rounding of the logits is 2**-8 relative; the kernel's fp32 sums round at other places than
    # cuBLAS's, so a logit may land one bf16 step away
    torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item() + 1e-2, rtol=0.0)
    assert (got - want).abs().mean() <= (ref32 - want).abs().mean() + 1e-3
