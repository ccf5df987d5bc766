"""A coded note as the JSON contract (infer.py --format json, batch lines, the HTTP service) and as a table.

    {"note", "code_system", "threshold", "codes": [{"code", "description", "probability", "predicted",
     "evidence": [{"concept", "level", "probability", "role"}]}], "timing": {"prefix_tokens", "questions",
     "seconds"}, "truncation"?: {"note_tokens", "kept_tokens", "kept_percent"}}

With a linear stage 2 that reads the fine-tuned direct question beside the concepts, each code also has
"direct_question": {"probability", "contribution"} (its P(yes) and its term of the code's logit); with one that
reads the lexical prior (cec.coding.lexical), "lexical_prior": {"logit", "contribution", "terms": [{"ngram",
"contribution"}]} (the prior's logit, its term of the code's logit, and the note's n-grams that pushed it up most,
each with its share of that term before clipping).
"role" is "own" for a concept of the code's own set and "outside" for a predicted-negative concept from outside
it; "truncation" is there only when the note was cut to the token budget; "not_read": [{"start", "end", "text",
"kind"}] only when negation handling blanked clauses (kind: negated, past, family). Codes are sorted by probability.
"""
TIMING_KEYS = ("prefix_tokens", "questions", "seconds")
DIGITS = 6  # of probabilities


def _evidence_entry(pipeline, concept_p, i: int, role: str) -> dict:
    c = pipeline.cs.concepts[i]
    return {"concept": c.text, "level": c.level, "probability": round(float(concept_p[i]), DIGITS), "role": role}


def shown_evidence(pipeline, concept_p, shown: list[list[int]]) -> list[list[dict]]:
    """Per code, the concepts the label LLM was shown, most probable first, each with its role."""
    out = []
    for code, ids in zip(pipeline.cs.codes, shown):
        own = set(pipeline.cs.concept_ids(code))
        entries = [_evidence_entry(pipeline, concept_p, i, "own" if i in own else "outside") for i in ids]
        out.append(sorted(entries, key=lambda e: -e["probability"]))
    return out


def bottleneck_evidence(pipeline, concept_p) -> list[list[dict]]:
    """Per code, its k own concepts with the largest terms in the code's logit (cec.coding.bottleneck), largest
    first; "contribution" is that term (positive: pushed the code up)."""
    out = []
    for j in range(len(pipeline.cs.codes)):
        terms = sorted(pipeline.bottleneck.contributions(concept_p, j).items(), key=lambda t: -t[1])
        out.append([{**_evidence_entry(pipeline, concept_p, i, "own"), "contribution": round(w, 4)}
                    for i, w in terms[: pipeline.config.k]])
    return out


def code_list(result, pipeline) -> list[dict]:
    """The codes of a NoteResult, most probable first: {"code", "description", "probability", "predicted",
    "evidence"}."""
    cs, concept_p = pipeline.cs, result.concept_probs
    evidence = (bottleneck_evidence(pipeline, concept_p) if result.shown is None
                else shown_evidence(pipeline, concept_p, result.shown))
    codes = [{"code": code, "description": cs.descriptions[code],
              "probability": round(float(result.code_probs[j]), DIGITS), "predicted": result.predicted[j],
              "evidence": evidence[j]} for j, code in enumerate(cs.codes)]
    if result.direct_probs is not None:
        for j, c in enumerate(codes):
            c["direct_question"] = {"probability": round(float(result.direct_probs[j]), DIGITS),
                                    "contribution": round(pipeline.bottleneck.direct_term(result.direct_probs, j), 4)}
    if result.lexical_logits is not None:
        weight = pipeline.bottleneck.lexical
        for j, c in enumerate(codes):
            c["lexical_prior"] = {
                "logit": round(float(result.lexical_logits[j]), 4),
                "contribution": round(pipeline.bottleneck.lexical_term(result.lexical_logits, j), 4),
                "terms": [{"ngram": g, "contribution": round(weight * t, 4)} for g, t in result.lexical_terms[j]]}
    codes.sort(key=lambda c: -c["probability"])
    return codes


def timing_json(timing: dict) -> dict:
    """A NoteResult's timing with its seconds rounded to milliseconds."""
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()}


def note_json(result, text: str, pipeline, **shape) -> dict:
    """The contract of one NoteResult, shaped by `shaped`'s options."""
    codes = code_list(result, pipeline)
    doc = {"note": text, "code_system": pipeline.cs.code_system, "threshold": pipeline.config.threshold,
           "codes": codes, "timing": {k: timing_json(result.timing)[k] for k in TIMING_KEYS}}
    if result.truncation:
        doc["truncation"] = result.truncation
    if result.not_read:  # what negation handling kept from the model (cec.coding.negation)
        doc["not_read"] = [{"start": b.start, "end": b.end, "text": text[b.start:b.end], "kind": b.kind}
                           for b in result.not_read]
    return shaped(doc, **shape)


def shaped(doc: dict, *, note: bool = True, descriptions: bool = True, only_predicted: bool = False) -> dict:
    """A view of a full contract: note=False leaves out the note text, descriptions=False each code's
    description (both are known to the caller), only_predicted=True the codes under the threshold."""
    codes = [c for c in doc["codes"] if c["predicted"] or not only_predicted]
    if not descriptions:
        codes = [{k: v for k, v in c.items() if k != "description"} for c in codes]
    return {k: v for k, v in doc.items() if note or k != "note"} | {"codes": codes}


def quote(text: str, width: int = 90) -> str:
    one = " ".join(text.split())
    return f'"{one}"' if len(one) <= width else f'"{one[:width - 3]}..."'


def format_table(doc: dict, timing: dict, runners_up: int = 5, top_evidence: int = 3) -> str:
    predicted = [c for c in doc["codes"] if c["predicted"]]
    rest = [c for c in doc["codes"] if not c["predicted"]][:runners_up]
    width = max([len(c["code"]) for c in predicted + rest] + [4])

    def rows(codes):
        for c in codes:
            yield f"  {c['code']:<{width}}  {c['probability']:.3f}  {c.get('description', '')}".rstrip()
            ev = ", ".join(f"{e['concept']} {e['probability']:.2f}" for e in c["evidence"][:top_evidence])
            if "direct_question" in c:
                ev += f"; direct question {c['direct_question']['probability']:.2f}"
            if c.get("lexical_prior", {}).get("terms"):
                ev += "; words " + ", ".join(repr(t["ngram"]) for t in c["lexical_prior"]["terms"])
            yield f"  {'':<{width}}         evidence: {ev}"
            if c.get("spans"):  # the note sentence the model's answers depend on most (cec.coding.attribution)
                yield f"  {'':<{width}}         in the note: {quote(c['spans'][0]['text'])}"

    head = f"{doc['code_system']}, threshold {doc['threshold']:g}"
    if predicted:
        lines = [f"Predicted codes ({head}):", *rows(predicted)] + (["Next most likely:", *rows(rest)] if rest else [])
    elif rest:
        lines = [f"No code reached the threshold ({head}). Most likely:", *rows(rest)]
    else:
        lines = [f"No code reached the threshold ({head})."]
    t = timing
    split = (f" (concepts {t['concept_seconds']:.1f} s, codes {t['label_seconds']:.1f} s)"
             if "concept_seconds" in t and "label_seconds" in t else "")
    cut = doc.get("truncation")
    if cut:
        lines.append(f"Note cut to the token budget: kept {cut['kept_tokens']} of {cut['note_tokens']} tokens "
                     f"({cut['kept_percent']}%)")
    evidence = doc["timing"].get("evidence_seconds")
    lines.append(f"{len(doc['codes'])} codes, {t['questions']} questions, {t['prefix_tokens']} note tokens: "
                 f"{t['seconds']:.1f} s{split}" + (f", evidence {evidence:.1f} s" if evidence is not None else ""))
    return "\n".join(lines)


CODE_SYSTEMS = {"icd10cm": "ICD-10-CM", "icd9cm": "ICD-9-CM", "icd10pcs": "ICD-10-PCS", "icd9pcs": "ICD-9-PCS"}


def code_set_doc(cs, note_language: str) -> dict:
    """What a pipeline codes: its concept set's codes with descriptions, code system and note language."""
    return {"concept_set": cs.name, "code_system": cs.code_system,
            "code_system_name": CODE_SYSTEMS.get(cs.code_system, cs.code_system), "note_language": note_language,
            "codes": [{"code": c, "description": cs.descriptions[c]} for c in cs.codes]}
