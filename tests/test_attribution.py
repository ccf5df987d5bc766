"""Hidden prefix ranges in shared-prefix scoring, and the sentence attribution built on them (cec.coding.attribution)."""
import json

import pytest
import torch

from cec.coding.attribution import (add_evidence, drops, explain, fitted_spans, gains, note_sentences, token_ranges)
from cec.coding.output import note_json
from cec.engine.scorer import PrefixScorer, common_prefix_len, head_for, score_naive
from hf_tiny import FAMILIES, hf_model, ours_from_hf

TOL = 1e-4
YES, NO = [7, 11], [13]


pytestmark = pytest.mark.usefixtures("one_thread")


def rand_ids(seed, n):
    return torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def ours(request):
    return ours_from_hf(hf_model(request.param, seed=3))


@pytest.mark.parametrize("prefix_len", [6, 29])  # 29 > sliding window 8: hidden keys inside and outside it
def test_hidden_ranges_equal_a_full_forward_with_those_keys_masked(ours, prefix_len):
    head = head_for(ours, YES, NO)
    prefix = rand_ids(prefix_len, prefix_len)
    questions = [[3, 4] + rand_ids(i, 1 + i % 5) for i in range(8)]  # a shared start, mixed lengths
    hide = [None, (1, 3), (0, prefix_len), None, (prefix_len - 4, prefix_len), (2, 3), (1, prefix_len - 1),
            [(0, 2), (4, prefix_len)]]  # a range, or a list of ranges
    scorer = PrefixScorer(ours, head, batch_tokens=20, chunk=5)  # several batches, hidden and not mixed
    got = scorer.score(prefix, questions, hide)
    ref = score_naive(ours, head, prefix, questions, hide=hide)
    assert (got - ref).abs().max().item() < TOL
    plain = score_naive(ours, head, prefix, questions)
    assert (got - plain).abs()[[1, 2, 4, 6, 7]].max().item() > 10 * TOL  # the mask changes answers
    assert (got - plain).abs()[[0, 3]].max().item() < TOL


def test_without_hidden_ranges_scores_are_bit_identical(ours):
    head = head_for(ours, YES, NO)
    prefix, questions = rand_ids(1, 29), [[3, 4] + rand_ids(i, 3 + i) for i in range(5)]
    scorer = PrefixScorer(ours, head, batch_tokens=20)
    plain = scorer.score(prefix, questions)
    assert scorer.stats.shared_question_tokens == 2
    assert torch.equal(plain, scorer.score(prefix, questions, [None] * 5))
    assert scorer.stats.shared_question_tokens == 2  # all None: the unhidden path, question prefix still shared


def test_a_hidden_question_scores_the_same_alone_or_batched(ours):
    head = head_for(ours, YES, NO)
    prefix, questions = rand_ids(2, 20), [rand_ids(10 + i, 2 + i) for i in range(6)]
    hide = [(i, i + 3) for i in range(6)]
    alone = torch.cat([PrefixScorer(ours, head).score(prefix, [q], [h]) for q, h in zip(questions, hide)])
    together = PrefixScorer(ours, head, batch_tokens=10_000).score(prefix, questions, hide)
    assert (alone - together).abs().max().item() < TOL


def test_drops_are_score_minus_score_with_the_range_hidden(ours):
    head = head_for(ours, YES, NO)
    prefix, questions = rand_ids(4, 24), [[3, 4] + rand_ids(20 + i, 4) for i in range(3)]
    ranges = [(1, 8), None, (8, 24)]
    d = drops(PrefixScorer(ours, head), prefix, 2, questions, ranges)
    assert d.shape == (3, 3) and torch.equal(d[:, 1], torch.zeros(3))
    # the 2-token header goes with the prefix: it reads the whole prefix, the questions' own tokens are masked
    with_header, own = prefix + [3, 4], [q[2:] for q in questions]
    for s in (0, 2):
        ref = score_naive(ours, head, with_header, own) - score_naive(ours, head, with_header, own,
                                                                      hide=[ranges[s]] * 3)
        assert (d[:, s] - ref).abs().max().item() < TOL


def test_gains_are_score_with_only_the_range_visible_minus_score_with_none(ours):
    head = head_for(ours, YES, NO)
    prefix, questions = rand_ids(5, 24), [[3, 4] + rand_ids(30 + i, 4) for i in range(3)]
    ranges = [(1, 8), None, (8, 20), (20, 24)]
    g = gains(PrefixScorer(ours, head), prefix, 2, questions, ranges)
    assert g.shape == (3, 4) and torch.equal(g[:, 1], torch.zeros(3))
    with_header, own = prefix + [3, 4], [q[2:] for q in questions]
    live = [r for r in ranges if r is not None]
    none = score_naive(ours, head, with_header, own, hide=[live] * 3)  # token 0 (BOS) stays visible
    for s in (0, 2, 3):
        alone = score_naive(ours, head, with_header, own, hide=[[r for r in live if r != ranges[s]]] * 3)
        assert (g[:, s] - (alone - none)).abs().max().item() < TOL
    assert g[:, [0, 2, 3]].abs().max().item() > 10 * TOL


def test_keep_last_reuses_the_prefilled_cache_only_for_the_same_ids(ours, monkeypatch):
    head = head_for(ours, YES, NO)
    prefix, questions = rand_ids(5, 20), [[3, 4] + rand_ids(30 + i, 3) for i in range(4)]
    for keep in (True, False):
        scorer = PrefixScorer(ours, head, keep_last=keep)
        calls = []
        real = scorer.encode_prefix
        monkeypatch.setattr(scorer, "encode_prefix", lambda ids, extra=0: calls.append(len(ids)) or real(ids, extra))
        first = scorer.score(prefix, questions)
        again = scorer.score(prefix + [3, 4], [q[2:] for q in questions])  # the ids the first call prefilled
        assert (first - again).abs().max().item() < TOL
        scorer.score(prefix[:-1], questions)  # other ids: prefilled anew
        assert calls == ([22, 21] if keep else [22, 22, 21])
        scorer.forget()
        scorer.score(prefix[:-1], questions)
        assert len(calls) == (3 if keep else 4)


def test_sentences_are_lines_and_long_lines_are_cut():
    text = "  Fever since monday; no cough.  \n\nBP 150/90.\n" + "He smokes. " * 40 + "\n---\n"
    spans = note_sentences(text)
    assert [text[a:b] for a, b in spans[:2]] == ["Fever since monday; no cough.", "BP 150/90."]
    assert [text[a:b] for a, b in spans[2:]] == ["He smokes."] * 40  # a 440-character line, by sentence
    assert note_sentences("") == [] and note_sentences("\n \n") == []


def test_token_ranges_cover_each_sentence_and_touch():
    from tiny_train import tiny_tokenizer

    tok = tiny_tokenizer(600)
    note = "patient has fever.\nchest pain and cough.\nrenal failure."
    prefix = "### Note: " + note + "\n### Question"
    spans = note_sentences(note)
    ranges = token_ranges(tok, prefix, len("### Note: "), spans)
    ids = tok.encode(prefix, add_bos=True)
    for (a, b), (s, e) in zip(ranges, spans):
        assert tok.decode(ids[a:b]).strip() == note[s:e]
    assert all(r1[1] == r2[0] for r1, r2 in zip(ranges, ranges[1:]))


def test_spans_cut_from_a_fitted_note_are_none():
    text = "A one.\nB two.\nC three."
    spans = note_sentences(text)
    assert fitted_spans(text, text, spans) == spans
    assert fitted_spans(text, "A one.\nC three.", spans) == [(0, 6), None, (7, 15)]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from tiny_train import save_tiny_model, tiny_concept_set

    from cec.coding.pipeline import CECPipeline

    d = tmp_path_factory.mktemp("attr")
    save_tiny_model(d / "model", vocab_size=600)
    cs = tiny_concept_set()
    cs.save(d / "concepts.json")
    (d / "p").mkdir()
    (d / "p" / "cec_pipeline.json").write_text(json.dumps(
        {"base_model": str(d / "model"), "concept_set": str(d / "concepts.json"), "concept_threshold": 0.0}))
    return CECPipeline.load(d / "p")


NOTE = "Patient has fever and chills.\nHigh blood pressure on lisinopril.\nChronic kidney disease stage four."


def test_code_scores_are_weighted_concept_effects_plus_the_code_question_effect(pipe):
    from cec.coding.attribution import attribute, code_question_effects, concept_effects, evidence_weights

    result = pipe.code_note(NOTE)
    spans = note_sentences(NOTE)
    j = 2
    w = evidence_weights(pipe, result, j)
    own = set(pipe.cs.concept_ids(pipe.cs.codes[j]))
    assert w and set(w) <= own and all(result.concept_probs[i] >= pipe.config.concept_threshold for i in w)
    a = attribute(pipe, NOTE, result, [j], per_code=None, gain=True)
    assert a.concept_ids == sorted(w)
    for measure, got in (("drop", a.code_drops[0]), ("gain", a.code_gains[0])):
        want = (torch.tensor([w[i] for i in a.concept_ids]) @ concept_effects(pipe, NOTE, a.concept_ids, spans, measure)
                + code_question_effects(pipe, NOTE, result, [j], spans, measure)[0])
        assert (got - want).abs().max().item() < TOL
    assert torch.allclose(a.scores, a.code_drops + a.code_gains)
    assert a.code_gains.abs().max() > 0
    only_drops = attribute(pipe, NOTE, result, [j], per_code=None)  # the default: drops only
    assert torch.allclose(only_drops.scores, a.code_drops, atol=TOL) and not only_drops.concept_gains.any()


def test_per_code_asks_the_concepts_whose_terms_can_fall_most(pipe):
    from cec.coding.attribution import attribute, concept_effects, strongest
    from cec.coding.bottleneck import CLIP, concept_logits

    x = concept_logits(torch.tensor([0.9, 0.2, 0.99, 0.5]))
    weights = {0: 1.0, 1: 3.0, 2: 0.5, 3: -2.0}
    room = {i: w * (float(x[i]) + CLIP) for i, w in weights.items() if w > 0}
    assert list(strongest(weights, torch.tensor([0.9, 0.2, 0.99, 0.5]), 2)) == sorted(room, key=lambda i: -room[i])[:2]
    assert strongest(weights, torch.tensor([0.9, 0.2, 0.99, 0.5]), None) == weights
    result = pipe.code_note(NOTE)
    spans = note_sentences(NOTE)
    j = 2
    a = attribute(pipe, NOTE, result, [j], per_code=1)
    assert len(a.concept_ids) == 1
    assert torch.allclose(a.concept_drops, concept_effects(pipe, NOTE, a.concept_ids, spans), atol=TOL)
    assert not a.concept_gains.any()  # no gains by default


def test_concept_drops_equal_rescoring_with_the_sentence_masked(pipe):
    from cec.coding import prompts, stages
    from cec.coding.attribution import concept_effects

    spans = note_sentences(NOTE)
    d = concept_effects(pipe, NOTE, [0, 5], spans)
    prefix_text = prompts.concept_prefix(NOTE)
    ranges = token_ranges(pipe.tokenizer, prefix_text, len(prompts.CONCEPT_INSTRUCTION), spans)
    sc = pipe.concept_scorer
    # the header every concept question starts with is read with the whole note (coding cached it so)
    header = common_prefix_len(pipe.concept_questions)
    assert header > 0
    prefix = stages.prefix_ids(pipe.tokenizer, prefix_text) + pipe.concept_questions[0][:header]
    qs = [pipe.concept_questions[0][header:], pipe.concept_questions[5][header:]]
    base = score_naive(sc.model, sc.head, prefix, qs)
    for s, r in enumerate(ranges):
        assert (d[:, s] - (base - score_naive(sc.model, sc.head, prefix, qs, hide=[r, r]))).abs().max() < TOL


def test_json_gets_spans_per_predicted_code_and_a_sentence_per_yes_concept(pipe):
    from cec.coding.attribution import evidence_weights

    pipe.config.threshold = 0.0  # every code predicted
    result = pipe.code_note(NOTE)
    doc = note_json(result, NOTE, pipe)
    add_evidence(doc, pipe, NOTE, result)
    assert "evidence_seconds" in doc["timing"]
    spans = explain(pipe, NOTE, result)
    assert set(spans) == {c["code"] for c in doc["codes"]}
    for c in doc["codes"]:
        assert c["spans"] == spans[c["code"]] and len(c["spans"]) <= 3
        scores = [s["score"] for s in c["spans"]]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
        for s in c["spans"]:
            assert NOTE[s["start"]:s["end"]] == s["text"] and s["text"] in NOTE.split("\n")
        j = pipe.cs.codes.index(c["code"])
        yes = {pipe.cs.concepts[i].text for i in evidence_weights(pipe, result, j)}
        for ev in c["evidence"]:
            assert "sentence" in ev
            if ev["concept"] not in yes:
                continue
            if ev["sentence"] is not None:
                assert NOTE[ev["sentence"]["start"]:ev["sentence"]["end"]] == ev["sentence"]["text"]
    # gain=True: the same contract, spans ranked by drop + gain
    with_gain = add_evidence(note_json(result, NOTE, pipe), pipe, NOTE, result, gain=True)
    assert {c["code"]: c["spans"] for c in with_gain["codes"]} == explain(pipe, NOTE, result, gain=True)


def test_evidence_reads_the_cache_coding_filled(pipe, monkeypatch):
    from cec.coding.attribution import attribute

    result = pipe.code_note(NOTE)
    calls = []
    real = pipe.concept_scorer.encode_prefix
    monkeypatch.setattr(pipe.concept_scorer, "encode_prefix", lambda ids, extra=0: calls.append(1) or real(ids, extra))
    attribute(pipe, NOTE, result, [0, 1, 2])
    assert calls == []  # stage 1's note is not prefilled again
    attribute(pipe, NOTE + "\nMore text.", pipe.code_note(NOTE + "\nMore text."), [0])
    assert len(calls) == 1  # a new note: prefilled once, by its coding
