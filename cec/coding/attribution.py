"""Model-grounded evidence: the sentences of the note that a code's answers depend on.

A sentence's drop for a yes/no question is the question's score (l_yes - l_no) with the whole note minus its
score when the question's tokens may not attend to that sentence's tokens of the cached note
(PrefixScorer.score(..., hide)). Nothing of the note is re-encoded per sentence: every (question, sentence) pair
is one more short question against the stage's prefix, and that prefix is the very cache coding filled (the
pipeline's scorers keep their last one). The hidden keys are those of the sentence only: the tokens encoded
after it, which read it then, stay visible -- the later note tokens and the question header every question of
the stage shares ("### Question: Is the note above relevant with the concept '"), which coding cached with the
note.

A code's sentence score is sum_i w_i * drop_i over its concepts (evidence_weights), plus the drop of the code's
own stage-2 question while stage 2 is the label LLM, or the drop of its direct question (times its weight) while
a linear stage 2 reads one. For a linear concept bottleneck (code logit =
b + sum_i w_i * logit(p_i)) the concept part is the drop of the code's logit carried by the concepts asked.
Which concepts are asked: the PER_CODE of each code whose term has the most room to fall, w_i * (x_i + CLIP)
with w_i > 0 (a Yes concept at x = +6 can fall by 14, a No at -6 by 2); per_code=None asks all of them (exact;
on CodiEsp dev note 0, 784 questions instead of 210).

    result = pipe.code_note(text, note_id)
    doc = note_json(result, text, pipe)      # cec.coding.output
    add_evidence(doc, pipe, text, result)    # "spans" on each predicted code, "sentence" on its asked concepts
"""
from __future__ import annotations

import re
import time

import torch

from cec.coding.bottleneck import CLIP, concept_logits
from cec.coding.output import code_list
from cec.coding.report import sentence_spans
from cec.coding.stages import prefix_ids

LONG_LINE = 300  # characters: a longer line is cut into sentences, a shorter one is one sentence
TOP = 3  # spans kept per code
PER_CODE = 3  # concepts asked per code (see the module's docstring); None: all


def note_sentences(text: str, long: int = LONG_LINE) -> list[tuple[int, int]]:
    """(start, end) character spans: one per non-blank line (CodiEsp's English is one sentence a line), a line
    longer than `long` cut at . ! ? ; (cec.coding.report.sentence_spans); whitespace trimmed."""
    out = []
    for m in re.finditer(r"[^\n]+", text):
        pieces = [(m.start() + a, m.start() + b) for a, b in sentence_spans(m.group())]
        if pieces and len(m.group()) <= long:
            pieces = [(pieces[0][0], pieces[-1][1])]
        out.extend(pieces)
    return out


def token_ranges(tokenizer, prefix_text: str, note_at: int, spans: list[tuple[int, int] | None]
                 ) -> list[tuple[int, int] | None]:
    """Token positions [a, b) of each character span of the note inside prefix_text (the note starts at
    character note_at), by encoding the prefix up to each boundary (with BOS, as the prefix is encoded).
    Whitespace before a span goes with it, as BPE glues a space to the word after it, so the ranges of
    adjacent sentences touch."""
    def count(i):
        while i > 0 and prefix_text[i - 1].isspace():
            i -= 1
        return len(prefix_ids(tokenizer, prefix_text[:i]))

    out = []
    for span in spans:
        if span is None:
            out.append(None)
            continue
        a = count(note_at + span[0])
        out.append((a, max(count(note_at + span[1]), a + 1)))
    return out


def read(piece: str) -> bool:
    """Whether a span has anything left to read (a word or a number, not only blanks and punctuation)."""
    return any(ch.isalnum() for ch in piece)


def fitted_spans(text: str, fitted: str, spans: list[tuple[int, int]]) -> list[tuple[int, int] | None]:
    """The spans of `text` where they are in `fitted` (the note cut to the token budget), None where cut or
    with nothing left to read (blanked by negation handling)."""
    if fitted == text:
        return [span if read(text[span[0]:span[1]]) else None for span in spans]
    out, at = [], 0
    for a, b in spans:
        if not read(text[a:b]):  # wholly blanked (cec.coding.negation): nothing of it is read
            out.append(None)
            continue
        i = fitted.find(text[a:b], at)
        out.append(None if i < 0 else (i, i + b - a))
        at = i + b - a if i >= 0 else at
    return out


def _prefix(pipe, stage: str, text: str, spans):
    """(prefix ids, token range per span or None) of a stage's prefix around the fitted note."""
    fitted = pipe.fit_note(text)
    prefix_text = pipe.stages[stage].prefix(fitted)
    note_at = pipe.stages[stage].prefix("\0").index("\0")
    # the spans' offsets hold in the readable note (negation blanks keep offsets), which the fitted note is cut from
    ranges = token_ranges(pipe.tokenizer, prefix_text, note_at, fitted_spans(pipe.readable(text), fitted, spans))
    return prefix_ids(pipe.tokenizer, prefix_text), ranges


def drops(scorer, prefix_ids: list[int], header: int, questions: list[list[int]], ranges) -> torch.Tensor:
    """[len(questions), len(ranges)]: score with the whole prefix minus score with each range hidden (0 for a
    range that is None). The first `header` tokens of every question (the header all of the stage's questions
    share, which coding cached with the prefix) go with the prefix, so the cache coding left is reused. One
    scorer call: the unhidden questions and every (question, range) pair."""
    pairs = [(q, s) for q in range(len(questions)) for s, r in enumerate(ranges) if r is not None]
    out = torch.zeros(len(questions), len(ranges))
    if not questions:
        return out
    prefix = list(prefix_ids) + list(questions[0][:header])
    own = [q[header:] for q in questions]
    scores = scorer.score(prefix, own + [own[q] for q, _ in pairs],
                          [None] * len(questions) + [ranges[s] for _, s in pairs])
    if pairs:
        q, s = torch.tensor(pairs).T
        out[q, s] = scores[q] - scores[len(questions):]
    return out


def concept_drops(pipe, text: str, concept_ids: list[int], spans) -> torch.Tensor:
    """[len(concept_ids), len(spans)] drops of the concept questions (stage 1) for each hidden sentence."""
    prefix, ranges = _prefix(pipe, "concept", text, spans)
    header = pipe.concept_scorer.shared_len(pipe.concept_questions)  # what coding moved into the prefix
    return drops(pipe.concept_scorer, prefix, header, [pipe.concept_questions[i] for i in concept_ids], ranges)


def code_question_drops(pipe, text: str, result, code_indices: list[int], spans) -> torch.Tensor:
    """[len(code_indices), len(spans)] drops of the codes' stage-2 questions (label prefix) per hidden sentence."""
    prefix, ranges = _prefix(pipe, "label", text, spans)
    questions = pipe.label_question_ids(result.concept_probs, result.shown)
    return drops(pipe.label_scorer, prefix, pipe.label_scorer.shared_len(questions),
                 [questions[j] for j in code_indices], ranges)


def direct_question_drops(pipe, text: str, code_indices: list[int], spans) -> torch.Tensor:
    """[len(code_indices), len(spans)] drops of the codes' direct-FT questions (direct prefix) per hidden sentence."""
    prefix, ranges = _prefix(pipe, "direct", text, spans)
    scorer = pipe.direct_scorers[True]
    return drops(scorer, prefix, scorer.shared_len(pipe.direct_questions),
                 [pipe.direct_questions[j] for j in code_indices], ranges)


def evidence_weights(pipe, result, code_index: int) -> dict[int, float]:
    """The weight of each concept in code `code_index`'s (index into pipe.cs.codes) answer: the linear stage's
    coefficients, or with the label LLM 1.0 for each of its own concepts shown to stage 2 and answered Yes. The
    one place that says how concepts weigh in a code."""
    if getattr(pipe, "bottleneck", None) is not None:
        # linear stage 2: the code's logit moves by sum_i coef_i * (drop of concept i's logit), so the sentence
        # score is the drop of the code's own logit (exact while no concept logit reaches the clip)
        return pipe.bottleneck.coefficients(result.concept_probs, code_index)
    own = set(pipe.cs.concept_ids(pipe.cs.codes[code_index]))
    yes = result.concept_probs >= pipe.config.concept_threshold
    return {i: 1.0 for i in result.shown[code_index] if i in own and bool(yes[i])}


def stage2_is_llm(pipe) -> bool:
    """Whether stage 2 is the label LLM, whose own question also reads the note (then its drop counts too)."""
    return getattr(pipe.config, "label_stage", "llm") == "llm"


def strongest(weights: dict[int, float], concept_p, n: int | None) -> dict[int, float]:
    """The n concepts of `weights` whose terms have the most room to fall, w_i * (x_i + CLIP) with w_i > 0 (all of
    them for n=None)."""
    if n is None:
        return weights
    x = concept_logits(concept_p)
    room = {i: w * (float(x[i]) + CLIP) for i, w in weights.items() if w > 0}
    return {i: weights[i] for i in sorted(room, key=lambda i: -room[i])[:n]}


def attribute(pipe, text: str, result, code_indices: list[int], spans=None, per_code: int | None = PER_CODE):
    """(spans, concept ids, concept drops [C, S], code scores [len(code_indices), S]); two scorer calls."""
    spans = note_sentences(text) if spans is None else spans
    weights = [strongest(evidence_weights(pipe, result, j), result.concept_probs, per_code) for j in code_indices]
    concept_ids = sorted({i for w in weights for i in w})
    cdrops = concept_drops(pipe, text, concept_ids, spans)
    row = {i: r for r, i in enumerate(concept_ids)}
    w = torch.zeros(len(code_indices), len(concept_ids))
    for k, wk in enumerate(weights):
        for i, v in wk.items():
            w[k, row[i]] = v
    scores = w @ cdrops
    if stage2_is_llm(pipe) and code_indices:
        scores = scores + code_question_drops(pipe, text, result, code_indices, spans)
    if result.direct_probs is not None and code_indices:
        scores = scores + pipe.bottleneck.direct * direct_question_drops(pipe, text, code_indices, spans)
    return spans, concept_ids, cdrops, scores


def _span(text: str, span: tuple[int, int], score: float) -> dict:
    return {"start": span[0], "end": span[1], "text": text[span[0]:span[1]], "score": round(float(score), 4)}


def ranked(text: str, spans, scores: torch.Tensor, top: int | None = TOP) -> list[dict]:
    """The spans with a positive score, best first (at most `top`; None: all)."""
    order = [s for s in torch.argsort(scores, descending=True, stable=True).tolist() if scores[s] > 0]
    return [_span(text, spans[s], scores[s]) for s in order[:top]]


def explain(pipe, text: str, result, codes: list[str] | None = None, top: int | None = TOP,
            per_code: int | None = PER_CODE) -> dict[str, list[dict]]:
    """{code: [{"start", "end", "text", "score"}, ...] best first} for `codes` (default: the predicted ones)."""
    if codes is None:
        codes = [c["code"] for c in code_list(result, pipe) if c["predicted"]]
    index = {c: j for j, c in enumerate(pipe.cs.codes)}
    spans, _, _, scores = attribute(pipe, text, result, [index[c] for c in codes], per_code=per_code)
    return {c: ranked(text, spans, scores[k], top) for k, c in enumerate(codes)}


def add_evidence(doc: dict, pipe, text: str, result, top: int | None = TOP, per_code: int | None = PER_CODE) -> dict:
    """Adds `spans` to each predicted code of the infer.py JSON object `doc` and `sentence` (the span whose
    hiding lowers that concept's answer most; None for a concept not asked or with no span that lowers it) to
    each of its evidence concepts. Returns doc."""
    t0 = time.perf_counter()
    index = {c: j for j, c in enumerate(pipe.cs.codes)}
    predicted = [c for c in doc["codes"] if c["predicted"]]
    spans, concept_ids, cdrops, scores = attribute(pipe, text, result, [index[c["code"]] for c in predicted],
                                                   per_code=per_code)
    by_text = {pipe.cs.concepts[i].text: r for r, i in enumerate(concept_ids)}
    for k, c in enumerate(predicted):
        c["spans"] = ranked(text, spans, scores[k], top)
        for ev in c["evidence"]:
            r = by_text.get(ev["concept"])
            best = ranked(text, spans, cdrops[r], 1) if r is not None else []
            ev["sentence"] = best[0] if best else None
    if "timing" in doc:
        doc["timing"]["evidence_seconds"] = round(time.perf_counter() - t0, 3)
    return doc
