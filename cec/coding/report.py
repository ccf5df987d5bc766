"""The HTML report of one coded note: the note text with the evidence of each predicted code highlighted.

A code's evidence is model-grounded when the JSON object carries it (cec.coding.attribution.add_evidence, infer.py
--explain): each predicted code's `spans` (the sentences whose hiding lowers its answers most) are highlighted
in the code's colour, and each Yes concept of the legend quotes the sentence that supports it best. Without
`spans` the report falls back to lexical matching, labelled as such on the page: as in the paper's App. D, the
note is cut into sentences, overlapping windows of `window` sentences are ranked against each Yes concept's
phrase with BM25 (rank_bm25), and the sentences of the best window that share a word with it are highlighted.
Hovering a highlight names the code and why; a legend lists the codes, their descriptions and probabilities
and the evidence concepts with theirs.

The page is one self-contained file: inline CSS, no script, no external URL, and a Content-Security-Policy that
forbids both. Everything that comes from the note, the concept set or the model is HTML-escaped.

    doc = note_json(result, note_text, pipeline)               # the infer.py JSON object (cec.coding.output)
    add_evidence(doc, pipeline, note_text, result)             # optional: model spans (cec.coding.attribution)
    write_report("report.html", doc, concept_threshold=0.5)
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path

from cec.io import atomic_write_text

PALETTE = ["#ffd166", "#8ecae6", "#b5e48c", "#f4a3c8", "#cdb4db", "#ffb38a", "#90e0c8", "#a9bcff", "#ff9e9e",
           "#d9ed92"]
STOPWORDS = set("a an and are as at be been by for from had has have he her his in into is it its of on or "
                "over per she than that the then these this those to under up was were which who with "
                # words that say nothing about a finding ('history of ...', 'left shift', 'mild', units)
                "patient patients history left right other specified unspecified no not without mild moderate "
                "severe mg dl ml min kg mmhg bpm mmol".split())
MAX_BADGES = 4  # code labels shown where highlights start; more are summed up as +N


def colour(i: int) -> str:
    """A light background colour for the i-th predicted code (a fixed palette, then golden-angle hues)."""
    if i < len(PALETTE):
        return PALETTE[i]
    return f"hsl({(i * 137.508) % 360:.0f}, 80%, 78%)"


def sentence_spans(text: str, ends: str = ".!?;") -> list[tuple[int, int]]:
    """(start, end) character spans of the note's sentences: cut after any of `ends` before whitespace and at
    every newline; whitespace trimmed, spans without a letter or digit dropped."""
    spans, start = [], 0
    for m in re.finditer(rf"[{re.escape(ends)}](?=\s)|\n", text):
        spans.append((start, m.end()))
        start = m.end()
    spans.append((start, len(text)))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if re.search(r"\w", text[a:b]):
            out.append((a, b))
    return out


SUFFIXES = sorted("ations ation ities ity ious ous ions ion ive ing ers er ed ics ic al es s".split(), key=len,
                  reverse=True)


def stem(word: str) -> str:
    """A crude suffix stripper so that smoker/smoked/smoking and infection/infectious meet; a stem keeps at
    least four letters."""
    if len(word) > 5 and word.isalpha():
        for suffix in SUFFIXES:
            if word.endswith(suffix) and len(word) - len(suffix) >= 4 and not word.endswith("ss"):
                return word[: -len(suffix)]
    return word


def tokens(text: str) -> list[str]:
    """Lower-case, stemmed words, without stop words and bare numbers ('3b' and 'hba1c' stay)."""
    return [stem(w) for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS and not w.isdigit()]


def evidence_spans(text: str, phrases: list[str], window: int = 2) -> dict[str, list[tuple[int, int]]]:
    """For each phrase, the spans to highlight: the sentences of its best BM25 window that share a word with
    it. A window must share at least a third of the phrase's words (one of up to three, two of four to six);
    [] when no window does."""
    from rank_bm25 import BM25Okapi

    sents = sentence_spans(text)
    sent_tokens = [set(tokens(text[a:b])) for a, b in sents]
    found: dict[str, list[tuple[int, int]]] = {p: [] for p in phrases}
    if not any(sent_tokens):
        return found
    starts = range(max(1, len(sents) - window + 1))
    windows = [list(range(i, min(i + window, len(sents)))) for i in starts]
    bm25 = BM25Okapi([[t for j in w for t in tokens(text[sents[j][0]:sents[j][1]])] for w in windows])
    for phrase in phrases:
        query = tokens(phrase)
        if not query:
            continue
        words, need = set(query), math.ceil(len(set(query)) / 3)
        scores = bm25.get_scores(query)
        for i in sorted(range(len(windows)), key=lambda i: -scores[i]):  # best window first
            if len(words & set().union(*(sent_tokens[j] for j in windows[i]))) >= need:
                found[phrase] = [sents[j] for j in windows[i] if sent_tokens[j] & words]
                break
    return found


def _title(marks: list[tuple[int, str, str]], descriptions: dict[str, str]) -> str:
    return "\n".join(f"{code} {descriptions[code]}: {why}" for _, code, why in marks)


def _background(idxs: list[int]) -> str:
    if len(idxs) == 1:
        return colour(idxs[0])
    stops = ", ".join(f"{colour(k)} {n * 8}px {(n + 1) * 8}px" for n, k in enumerate(idxs))
    return f"repeating-linear-gradient(135deg, {stops})"


def highlight_note(text: str, marks: list[tuple[int, int, int, str, str]], descriptions: dict[str, str]) -> str:
    """The escaped note with <mark> elements; marks are (start, end, code index, code, why it is marked).
    Overlapping marks split the text at every boundary; a piece under several codes gets their colours in
    stripes and a title naming each (code, why)."""
    cuts = sorted({0, len(text)} | {m[0] for m in marks} | {m[1] for m in marks})
    out = []
    for a, b in zip(cuts, cuts[1:]):
        piece = html.escape(text[a:b])
        active = [(k, code, why) for s, e, k, code, why in marks if s <= a and e >= b]
        if not active:
            out.append(piece)
            continue
        starting = list(dict.fromkeys((k, code) for s, _, k, code, _ in marks if s == a))
        badges = "".join(f'<span class="badge" style="border-color:{colour(k)}">{html.escape(code)}</span>'
                         for k, code in starting[:MAX_BADGES])
        if len(starting) > MAX_BADGES:
            more = html.escape(" ".join(code for _, code in starting[MAX_BADGES:]), quote=True)
            badges += f'<span class="badge" title="{more}">+{len(starting) - MAX_BADGES}</span>'
        idxs = list(dict.fromkeys(k for k, _, _ in active))
        out.append(f'{badges}<mark style="background:{_background(idxs)}" '
                   f'title="{html.escape(_title(active, descriptions), quote=True)}">{piece}</mark>')
    return "".join(out)


def _quote(sentence: dict | None, width: int = 90) -> str:
    if not sentence:
        return ""
    t = sentence["text"] if len(sentence["text"]) <= width else sentence["text"][: width - 1] + "\u2026"
    return f' <span class="q">&ldquo;{html.escape(t)}&rdquo;</span>'


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a; margin: 0;
       background: #f5f6f8; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; }
.meta { color: #5a6470; font-size: 13px; margin-bottom: 18px; }
.grid { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 20px; align-items: start; }
@media (max-width: 900px) { .grid { grid-template-columns: 1fr; } }
.card { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 16px 18px; }
.card h2 { font-size: 15px; margin: 0 0 10px; color: #37414b; text-transform: uppercase; letter-spacing: .04em; }
.note { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 15px; line-height: 1.7; }
mark { color: inherit; border-radius: 3px; padding: 1px 0; box-decoration-break: clone;
       -webkit-box-decoration-break: clone; }
.badge { font-size: 10px; font-weight: 600; vertical-align: super; line-height: 1; border: 2px solid;
         border-radius: 4px; padding: 0 3px; margin: 0 2px 0 1px; background: #fff; user-select: none; }
.code { border-left: 6px solid; padding: 4px 0 6px 10px; margin-bottom: 12px; }
.code .head { display: flex; gap: 10px; align-items: baseline; justify-content: space-between; }
.code .name { font-weight: 600; }
.code .desc { font-weight: 400; }
.prob { font-variant-numeric: tabular-nums; font-weight: 600; }
.code ul { margin: 4px 0 0; padding-left: 18px; font-size: 13px; }
.code li .p { font-variant-numeric: tabular-nums; color: #37414b; }
.code li.off { color: #8a939c; list-style: none; margin-left: -18px; font-size: 12px; }
.code li .nf { color: #a0522d; font-style: italic; }
.code li .q { color: #5a6470; font-style: italic; }
.lexical { color: #a0522d; font-size: 12px; margin: 0 0 10px; }
.none { color: #5a6470; font-style: italic; }
details { margin-top: 20px; }
summary { cursor: pointer; font-weight: 600; color: #37414b; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin-top: 8px; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #eceff2; }
td.num { font-variant-numeric: tabular-nums; text-align: right; }
tr.pred td { font-weight: 600; }
"""


def render_report(doc: dict, *, concept_threshold: float = 0.5, note_id: str | None = None,
                  window: int = 2) -> str:
    """The report page for `doc`, the infer.py JSON object (note, code_system, threshold, codes, timing)."""
    e = html.escape
    text, codes = doc["note"], doc["codes"]
    predicted = [c for c in codes if c["predicted"]]
    descriptions = {c["code"]: c["description"] for c in codes}
    positives = {c["code"]: [ev for ev in c["evidence"] if ev["probability"] >= concept_threshold]
                 for c in predicted}
    lexical = [c for c in predicted if "spans" not in c]  # no model evidence in the JSON: BM25 fallback
    phrases = list(dict.fromkeys(ev["concept"] for c in lexical for ev in positives[c["code"]]))
    found = evidence_spans(text, phrases, window) if phrases else {}

    marks, legend = [], []
    for k, c in enumerate(predicted):
        items = []
        for s in c.get("spans", []):
            marks.append((s["start"], s["end"], k, c["code"], f"model evidence, score {s['score']:.2f}"))
        for ev in positives[c["code"]]:
            p = f'<span class="p">{ev["probability"]:.2f}</span>'
            if "spans" in c:
                items.append(f'<li>{e(ev["concept"])} {p}{_quote(ev.get("sentence"))}</li>')
                continue
            for a, b in found[ev["concept"]]:
                marks.append((a, b, k, c["code"], f"lexical match (BM25) of concept '{ev['concept']}' "
                                                  f"(P={ev['probability']:.2f})"))
            nf = "" if found[ev["concept"]] else ' <span class="nf">(no matching sentence)</span>'
            items.append(f'<li>{e(ev["concept"])} {p}{nf}</li>')
        negatives = [f'{e(ev["concept"])} <span class="p">{ev["probability"]:.2f}</span>'
                     for ev in c["evidence"] if ev["probability"] < concept_threshold]
        if negatives:  # shown to the code model as answered No
            items.append(f'<li class="off">answered No: {", ".join(negatives)}</li>')
        prior = c.get("lexical_prior")
        if prior and prior["terms"]:  # the bottleneck's lexical prior (cec.coding.lexical) and its words
            words = ", ".join(f'&ldquo;{e(t["ngram"])}&rdquo;' for t in prior["terms"])
            items.append(f'<li>words in the note (lexical prior, {prior["contribution"]:+.2f} to the logit): '
                         f'{words}</li>')
        head = f'<span class="name">{e(c["code"])} <span class="desc">{e(c["description"])}</span></span>'
        legend.append(f'<div class="code" style="border-color:{colour(k)}"><div class="head">{head}'
                      f'<span class="prob">{c["probability"]:.2f}</span></div><ul>{"".join(items)}</ul></div>')
    if lexical:
        which = "" if len(lexical) == len(predicted) else " of " + ", ".join(e(c["code"]) for c in lexical)
        legend.insert(0, f'<p class="lexical">Highlights{which}: lexical matching (BM25) of the Yes concepts, '
                         'not model evidence.</p>')
    if not legend:
        legend.append(f'<p class="none">No code reached the threshold {doc["threshold"]:g}.</p>')
    if doc.get("not_read"):  # negation handling (cec.coding.negation): what the model was not given
        quoted = "".join(f'<li>{e(b["kind"])}: <span class="q">&ldquo;{e(b["text"])}&rdquo;</span></li>'
                         for b in doc["not_read"])
        legend.append(f'<div class="code"><div class="head"><span class="name">Not read by the model</span></div>'
                      f'<ul>{quoted}</ul><p class="lexical">Stated as absent, past or about another person '
                      'by rule (NegEx/ConText triggers); check them: a rule can miss or over-reach.</p></div>')

    rows = "".join(f'<tr class="{"pred" if c["predicted"] else ""}"><td>{e(c["code"])}</td>'
                   f'<td>{e(c["description"])}</td><td class="num">{c["probability"]:.3f}</td>'
                   f'<td>{"yes" if c["predicted"] else ""}</td></tr>' for c in codes)
    t = doc.get("timing") or {}
    timing = (f' &middot; {t["prefix_tokens"]} note tokens, {t["questions"]} questions, {t["seconds"]:.1f} s'
              if {"prefix_tokens", "questions", "seconds"} <= set(t) else "")
    name = f" &mdash; {e(note_id)}" if note_id else ""
    meta = (f'{e(doc["code_system"])} &middot; {len(predicted)} of {len(codes)} codes predicted &middot; code '
            f'threshold {doc["threshold"]:g} &middot; concept threshold {concept_threshold:g}{timing}')
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>CEC coding report{name}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<h1>CEC coding report{name}</h1>
<div class="meta">{meta}</div>
<div class="grid">
<section class="card"><h2>Note</h2><div class="note">{highlight_note(text, marks, descriptions)}</div></section>
<section class="card"><h2>Predicted codes and evidence</h2>{"".join(legend)}</section>
</div>
<details><summary>All {len(codes)} codes by probability</summary>
<table><thead><tr><th>Code</th><th>Description</th><th>P</th><th>Predicted</th></tr></thead>
<tbody>{rows}</tbody></table></details>
</main>
</body>
</html>
"""


def write_report(path: str | Path, doc: dict, **kw) -> None:
    atomic_write_text(path, render_report(doc, **kw))
