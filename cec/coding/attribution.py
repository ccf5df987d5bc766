"""Model-grounded evidence: the sentences of the note that a code's answers depend on.

A sentence's effect on a yes/no question is its drop, and with gain=True its drop + gain, both read off the
cached note:
- drop (is it needed?): the question's score (l_yes - l_no) with the whole note minus its score when the
  question's tokens may not attend to that sentence's tokens;
- gain (does it say so on its own?): the score when of the note's sentences the question may read only that one,
  minus the score when it may read none of them.
Drop and gain are ERASER's comprehensiveness and sufficiency (DeYoung et al. 2020) read as logit changes. Gains
double the questions and, measured against CodiEsp-X gold on held-out dev notes, ranked no better than drops alone
(README "Evidence"), so they are off by default (scripts/evidence_eval.py --gain reports both).
Nothing of the note is re-encoded per sentence: every (question, visible sentences) pair is one more
short question against the stage's prefix (PrefixScorer.score(..., hide)), and that prefix is the very cache coding
filled (the pipeline's scorers keep their last one). Only the question's reading of the note is masked: the tokens
encoded after a sentence, which read it then, keep what they read -- the later note tokens and the question header
every question of the stage shares ("### Question: Is the note above relevant with the concept '"), which coding
cached with the note. So a gain is what the question reads from that sentence's tokens, not a note of one sentence.

A code's sentence score is sum_i w_i * effect_i over its concepts (evidence_weights), plus the effect on the code's
own stage-2 question while stage 2 is the label LLM, or on its direct question (times its weight) while a linear
stage 2 reads one, and on its lexical prior's logit (times its weight, cec.coding.lexical) when it reads that.
For a linear concept bottleneck (code logit = b + sum_i w_i * logit(p_i)) the concept part of
the drop is the drop of the code's logit carried by the concepts asked, and of the gain the code logit's rise from
that sentence alone. Which concepts are asked: the PER_CODE of each code whose term has the most room to fall,
w_i * (x_i + CLIP) with w_i > 0 (a Yes concept at x = +6 can fall by 14, a No at -6 by 2); per_code=None asks all
of them (on CodiEsp dev note 0, 784 questions instead of 210).

    result = pipe.code_note(text, note_id)
    doc = note_json(result, text, pipe)      # cec.coding.output
    add_evidence(doc, pipe, text, result)    # "spans" on each predicted code, "sentence" on its asked concepts
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from cec.coding.bottleneck import CLIP, concept_logits, side_inputs
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


def _ask(scorer, prefix_ids: list[int], header: int, questions: list[list[int]], hide: list) -> torch.Tensor:
    """Scores of questions[q] for each (q, hidden ranges) of `hide`. The first `header` tokens of every question (the
    header all of the stage's questions share, which coding cached with the prefix) go with the prefix, so the
    cache coding left is reused. One scorer call."""
    prefix = list(prefix_ids) + list(questions[0][:header])
    return scorer.score(prefix, [questions[q][header:] for q, _ in hide], [h for _, h in hide])


def drops(scorer, prefix_ids: list[int], header: int, questions: list[list[int]], ranges) -> torch.Tensor:
    """[len(questions), len(ranges)]: score with the whole prefix minus score with each range hidden (0 for a
    range that is None); the unhidden questions and every (question, range) pair in one scorer call."""
    pairs = [(q, s) for q in range(len(questions)) for s, r in enumerate(ranges) if r is not None]
    out = torch.zeros(len(questions), len(ranges))
    if not questions:
        return out
    scores = _ask(scorer, prefix_ids, header, questions,
                  [(q, None) for q in range(len(questions))] + [(q, ranges[s]) for q, s in pairs])
    if pairs:
        q, s = torch.tensor(pairs).T
        out[q, s] = scores[q] - scores[len(questions):]
    return out


def gains(scorer, prefix_ids: list[int], header: int, questions: list[list[int]], ranges) -> torch.Tensor:
    """[len(questions), len(ranges)]: score when of the ranges only that one is visible minus score when none is
    (0 for a range that is None); the rest of the prefix (the prompt around the note) stays visible. One scorer
    call."""
    live = [r for r in ranges if r is not None]
    pairs = [(q, s) for q in range(len(questions)) for s, r in enumerate(ranges) if r is not None]
    out = torch.zeros(len(questions), len(ranges))
    if not pairs:
        return out
    scores = _ask(scorer, prefix_ids, header, questions, [(q, live) for q in range(len(questions))]
                  + [(q, [r for r in live if r != ranges[s]]) for q, s in pairs])
    q, s = torch.tensor(pairs).T
    out[q, s] = scores[len(questions):] - scores[q]
    return out


MEASURES = {"drop": drops, "gain": gains}


def lexical_effects(pipe, text: str, code_indices: list[int], spans, measure: str = "drop") -> torch.Tensor:
    """[len(code_indices), len(spans)] drops (or gains) of the codes' lexical-prior logits (clipped, as the
    bottleneck reads them): the fitted note against it with the sentence blanked (or that sentence alone against
    none of them). No model runs: the prior re-reads the edited texts."""
    fitted = pipe.fit_note(text)
    where = fitted_spans(pipe.readable(text), fitted, spans)
    live = [s for s, r in enumerate(where) if r is not None]

    def blank(keep_only: set[int] | None, drop: int | None = None) -> str:
        chars = list(fitted)
        for s in live:
            if s == drop or (keep_only is not None and s not in keep_only):
                a, b = where[s]
                chars[a:b] = " " * (b - a)
        return "".join(chars)

    if measure == "drop":
        texts = [fitted] + [blank(None, s) for s in live]
    else:
        texts = [blank(set())] + [blank({s}) for s in live]
    z = side_inputs(lexical_z=pipe.bottleneck.prior.logits(texts)[:, code_indices])["lexical"].float()
    out = torch.zeros(len(code_indices), len(spans))
    if live:
        sign = 1 if measure == "drop" else -1
        out[:, live] = sign * (z[:1] - z[1:]).T
    return out


def concept_effects(pipe, text: str, concept_ids: list[int], spans, measure: str = "drop") -> torch.Tensor:
    """[len(concept_ids), len(spans)] drops (or gains: measure="gain") of the concept questions (stage 1) per
    sentence."""
    prefix, ranges = _prefix(pipe, "concept", text, spans)
    header = pipe.concept_scorer.shared_len(pipe.concept_questions)  # what coding moved into the prefix
    return MEASURES[measure](pipe.concept_scorer, prefix, header, [pipe.concept_questions[i] for i in concept_ids],
                             ranges)


def code_question_effects(pipe, text: str, result, code_indices: list[int], spans, measure: str = "drop"
                          ) -> torch.Tensor:
    """[len(code_indices), len(spans)] drops (or gains) of the codes' stage-2 questions (label prefix)."""
    prefix, ranges = _prefix(pipe, "label", text, spans)
    questions = pipe.label_question_ids(result.concept_probs, result.shown)
    return MEASURES[measure](pipe.label_scorer, prefix, pipe.label_scorer.shared_len(questions),
                             [questions[j] for j in code_indices], ranges)


def direct_question_effects(pipe, text: str, code_indices: list[int], spans, measure: str = "drop") -> torch.Tensor:
    """[len(code_indices), len(spans)] drops (or gains) of the codes' direct-FT questions (direct prefix)."""
    prefix, ranges = _prefix(pipe, "direct", text, spans)
    scorer = pipe.direct_scorers[True]
    return MEASURES[measure](scorer, prefix, scorer.shared_len(pipe.direct_questions),
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


@dataclass
class Attribution:
    """What `attribute` measured: per asked concept and per code, the drop and the gain of each sentence."""
    spans: list[tuple[int, int]]  # the note's sentences (character offsets)
    concept_ids: list[int]  # the concepts asked, ascending
    concept_drops: torch.Tensor  # [concepts, sentences]
    concept_gains: torch.Tensor  # [concepts, sentences]; zeros when measured without gains
    code_drops: torch.Tensor  # [codes, sentences]: weighted concept drops (+ the code/direct question's drop)
    code_gains: torch.Tensor  # [codes, sentences]: the same for gains

    @property
    def concept_scores(self) -> torch.Tensor:
        return self.concept_drops + self.concept_gains

    @property
    def scores(self) -> torch.Tensor:
        """[codes, sentences]: each sentence's evidence score for each code, drop + gain."""
        return self.code_drops + self.code_gains


def attribute(pipe, text: str, result, code_indices: list[int], spans=None, per_code: int | None = PER_CODE,
              gain: bool = False) -> Attribution:
    """Drops of the note's sentences for the codes `code_indices`, and with gain=True their gains too (twice the
    questions); one scorer call per measure and question kind."""
    spans = note_sentences(text) if spans is None else spans
    weights = [strongest(evidence_weights(pipe, result, j), result.concept_probs, per_code) for j in code_indices]
    concept_ids = sorted({i for w in weights for i in w})
    row = {i: r for r, i in enumerate(concept_ids)}
    w = torch.zeros(len(code_indices), len(concept_ids))
    for k, wk in enumerate(weights):
        for i, v in wk.items():
            w[k, row[i]] = v
    parts = []
    for measure in ("drop", "gain") if gain else ("drop",):
        cpart = concept_effects(pipe, text, concept_ids, spans, measure)
        code = w @ cpart
        if stage2_is_llm(pipe) and code_indices:
            code = code + code_question_effects(pipe, text, result, code_indices, spans, measure)
        if result.direct_probs is not None and code_indices:
            code = code + pipe.bottleneck.direct * direct_question_effects(pipe, text, code_indices, spans, measure)
        if result.lexical_logits is not None and code_indices:
            code = code + pipe.bottleneck.lexical * lexical_effects(pipe, text, code_indices, spans, measure)
        parts.append((cpart, code))
    if not gain:
        parts.append((torch.zeros_like(parts[0][0]), torch.zeros_like(parts[0][1])))
    (cdrops, drop), (cgains, gained) = parts
    return Attribution(spans, concept_ids, cdrops, cgains, drop, gained)


def _span(text: str, span: tuple[int, int], score: float) -> dict:
    return {"start": span[0], "end": span[1], "text": text[span[0]:span[1]], "score": round(float(score), 4)}


def ranked(text: str, spans, scores: torch.Tensor, top: int | None = TOP) -> list[dict]:
    """The spans with a positive score, best first (at most `top`; None: all)."""
    order = [s for s in torch.argsort(scores, descending=True, stable=True).tolist() if scores[s] > 0]
    return [_span(text, spans[s], scores[s]) for s in order[:top]]


def explain(pipe, text: str, result, codes: list[str] | None = None, top: int | None = TOP,
            per_code: int | None = PER_CODE, gain: bool = False) -> dict[str, list[dict]]:
    """{code: [{"start", "end", "text", "score"}, ...] best first} for `codes` (default: the predicted ones)."""
    if codes is None:
        codes = [c["code"] for c in code_list(result, pipe) if c["predicted"]]
    index = {c: j for j, c in enumerate(pipe.cs.codes)}
    a = attribute(pipe, text, result, [index[c] for c in codes], per_code=per_code, gain=gain)
    return {c: ranked(text, a.spans, a.scores[k], top) for k, c in enumerate(codes)}


def add_evidence(doc: dict, pipe, text: str, result, top: int | None = TOP, per_code: int | None = PER_CODE,
                 gain: bool = False) -> dict:
    """Adds `spans` to each predicted code of the infer.py JSON object `doc` and `sentence` (the span with the
    largest effect on that concept's answer: its drop, plus its gain with gain=True; None for a concept not asked
    or with no positive one) to each of its evidence concepts. Returns doc."""
    t0 = time.perf_counter()
    index = {c: j for j, c in enumerate(pipe.cs.codes)}
    predicted = [c for c in doc["codes"] if c["predicted"]]
    a = attribute(pipe, text, result, [index[c["code"]] for c in predicted], per_code=per_code, gain=gain)
    by_text = {pipe.cs.concepts[i].text: r for r, i in enumerate(a.concept_ids)}
    for k, c in enumerate(predicted):
        c["spans"] = ranked(text, a.spans, a.scores[k], top)
        for ev in c["evidence"]:
            r = by_text.get(ev["concept"])
            best = ranked(text, a.spans, a.concept_scores[r], 1) if r is not None else []
            ev["sentence"] = best[0] if best else None
    if "timing" in doc:
        doc["timing"]["evidence_seconds"] = round(time.perf_counter() - t0, 3)
    return doc
