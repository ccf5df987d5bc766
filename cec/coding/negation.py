"""Findings the note states as absent, past or in someone else, kept from the model (NegEx/ConText-style rules).

The concept model answers "is the note relevant to fever" yes for "no fever": it reads the words, not their
polarity. This module finds, by the trigger lists of NegEx (Chapman et al. 2001) and ConText (Harkema et al.
2009), the clauses a coder would not code from -- negated ("denies cough", "HIV serology was negative"), past
("former smoker", "quit smoking in 2015") and about another person ("his mother had diabetes") -- and blanks
them (trigger and scope) with spaces before the note is scored. Blanking keeps every character offset, so
evidence spans and the HTML still point into the note as given; the JSON lists what was blanked
(`not_read`). A rule list, not a model: it misses phrasings it does not list and can blank a clause it
should not (read `not_read`); `negation: "off"` in cec_pipeline.json (or infer.py --negation off) turns it off.

Scopes: a forward trigger covers the words after it, a backward one the words before it, up to a clause
boundary (. ; : ! ? a line end, a conjunction such as "but", a verb that starts new content such as "presented"
or "consulted", forward a reason such as "because"; "history" ends the scope it is in) and at most SCOPE_WORDS
words; a family trigger covers its whole clause. Commas do not end a scope, so "no fever, chills or cough" is one
scope.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

SCOPE_WORDS = 6  # NegEx's window is five words
MODES = ("on", "off")

# trigger phrases, lower case, as words (matched at word boundaries)
NEGATED_FORWARD = ("no", "not", "denies", "denied", "deny", "denying", "without", "negative for", "free of",
                   "absence of", "no evidence of", "no signs of", "no sign of", "never", "nor", "none", "neither",
                   "ruled out for", "rules out", "fails to reveal", "failed to reveal")
NEGATED_BACKWARD = ("was ruled out", "were ruled out", "is ruled out", "ruled out", "was negative", "were negative",
                    "is negative", "are negative", "negative", "was excluded", "were excluded", "excluded",
                    "unlikely", "was absent", "were absent", "absent")
PAST_FORWARD = ("former", "formerly", "quit", "quitted", "stopped", "no longer")
PAST_WORDS = ("ex-smoker", "ex smoker", "exsmoker", "ex-drinker")  # the trigger is the finding: no scope
PAST_BACKWARD = ("resolved", "had resolved", "has resolved", "in the past")
FAMILY = ("mother", "father", "brother", "sister", "son", "daughter", "aunt", "uncle", "grandmother",
          "grandfather", "cousin", "sibling", "siblings", "parents", "family history", "family history of")
# phrases that contain a trigger but negate nothing
PSEUDO = ("no change", "no increase", "no significant change", "not only", "not necessarily", "without difficulty",
          "gram negative", "gram-negative", "not certain", "no longer than", "nor only",
          # the patient's own relations, not a relative's findings ("first daughter of young parents")
          "daughter of", "son of", "young parents", "with her parents",
          "with his parents", "with their parents", "to her parents", "to his parents", "to their parents",
          # a treatment stopped, not a finding given up: "Metformin was stopped because of the reduced kidney
          # function" (the forward scope of "stopped" is for "stopped smoking")
          "was stopped", "were stopped", "been stopped", "is stopped")
ENDS = ("but", "however", "although", "though", "except", "yet", "whereas", "which", "who", "aside from",
        "apart from", "still", "while", "presented", "presents", "consulted", "consults", "admitted", "came",
        "comes", "referred", "reported", "reports", "complained", "complains", "showed", "shows", "revealed",
        "developed", "underwent",
        # new content, not more of the negated list: "no fever, with an Apgar score of 9", "IgM positive and IgG
        # negative" (a backward scope must not take the positive finding), "did not respond, requiring surgery"
        "with", "positive", "requiring", "required")
# a reason starts new content in a forward negated or past scope: "not performed because of the compression
# exerted by the mass", "without loss of consciousness due to abnormal movements"; a relative's clause keeps it
# ("a brother who died due to lung cancer")
REASON = ("because", "due")
# a scope ends after these: "without relevant medical history | consulted for hematuria"
LAST = ("history", "antecedents", "background", "allergies")


def rules_hash() -> str:
    """What a score cache keyed on negation "on" depends on: the rules (a changed list is a different reading) and
    a name for each rule written as code rather than as a list (change the name when the code reads differently)."""
    rules = (SCOPE_WORDS, NEGATED_FORWARD, NEGATED_BACKWARD, PAST_FORWARD, PAST_WORDS, PAST_BACKWARD, FAMILY, PSEUDO,
             ENDS, REASON, LAST, "no+number", "two-word ends")
    return hashlib.sha1(repr(rules).encode()).hexdigest()[:12]


RULES = rules_hash()

WORD = re.compile(r"[A-Za-z][A-Za-z\d]*(?:-[A-Za-z\d]+)*|\d+(?:[.,]\d+)?|[^\sA-Za-z\d]")
BOUNDARY = set(".;:!?")


@dataclass(frozen=True)
class Blanked:
    start: int
    end: int
    kind: str  # "negated", "past" or "family"


def _words(line: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group().lower()) for m in WORD.finditer(line)]


def _match(words, i: int, phrases, step: int = 1) -> int:
    """Length in words of the longest phrase of `phrases` starting at word i (step -1: ending at word i; 0: none)."""
    best = 0
    for p in phrases:
        parts = p.split()
        first = i if step > 0 else i - len(parts) + 1
        if first >= 0 and words[first][2] == parts[0] and [w[2] for w in words[first: first + len(parts)]] == parts:
            best = max(best, len(parts))
    return best


def _clause(words, i: int, step: int, family: bool = False) -> int:
    """The last word index of the clause from word i going in direction step (+1 forward, -1 back), at most
    SCOPE_WORDS words, stopping before a boundary or a conjunction (or, forward and not a relative's, a reason)."""
    j, n = i, 0
    while 0 <= j + step < len(words) and n < SCOPE_WORDS:
        w = words[j + step][2]
        if w in BOUNDARY or _match(words, j + step, ENDS, step) or (step < 0 and w in LAST) or \
                (step > 0 and not family and w in REASON):
            break
        j += step
        n += w[0].isalnum()
        if step > 0 and w in LAST:
            break
    return j


def blanked_spans(text: str) -> list[Blanked]:
    """The character spans of the note to keep from the model, in note order, not overlapping."""
    out = []
    for line in re.finditer(r"[^\n]+", text):
        words = _words(line.group())
        i = 0
        while i < len(words):
            pseudo = _match(words, i, PSEUDO)
            if words[i][2] == "no" and i + 1 < len(words) and words[i + 1][2][0].isdigit():
                pseudo = 1  # "No 139, K 4.2" (sodium, as the translation spells Na): a number, not a negation
            if pseudo:
                i += pseudo
                continue
            found = None
            for kind, phrases, direction in (("family", FAMILY, 0), ("past", PAST_WORDS, None), ("past", PAST_FORWARD, 1),
                                             ("negated", NEGATED_FORWARD, 1), ("past", PAST_BACKWARD, -1),
                                             ("negated", NEGATED_BACKWARD, -1)):
                n = _match(words, i, phrases)
                if n:
                    found = (kind, n, direction)
                    break
            if found is None:
                i += 1
                continue
            kind, n, direction = found
            if direction == -1 and _match(words, i + n - 1, NEGATED_FORWARD):  # "was negative for X": both ways
                direction = 0
            first, last = i, i + n - 1
            if direction is not None and direction >= 0:
                last = _clause(words, last, 1, family=kind == "family")
            if direction is not None and direction <= 0:
                first = _clause(words, first, -1)
            # a trigger with nothing in its scope blanks nothing (unless it is the finding itself)
            if direction is None or last > i + n - 1 or first < i:
                a, b = line.start() + words[first][0], line.start() + words[last][1]
                if out and a <= out[-1].end:  # overlapping a backward scope: merge
                    prev = out.pop()
                    a, b, kind = prev.start, max(b, prev.end), prev.kind
                out.append(Blanked(a, b, kind))
            i = max(last + 1, i + n)
    return out


def blank(text: str, spans: list[Blanked]) -> str:
    """The text with each span's characters replaced by spaces (same length, so every offset holds)."""
    chars = list(text)
    for s in spans:
        chars[s.start: s.end] = " " * (s.end - s.start)
    return "".join(chars)


def readable_notes(notes: list[dict], mode: str) -> list[dict]:
    """Notes ({"text", ...}) as a pipeline with negation `mode` reads them: with "on", each text blanked (copies;
    the given notes are not changed)."""
    return [n | {"text": blank(n["text"], blanked_spans(n["text"]))} for n in notes] if mode == "on" else notes
