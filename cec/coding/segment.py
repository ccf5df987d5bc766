"""Section-aware segmentation of long notes (paper App. E, after Lu et al. 2023).

A note longer than the model's token budget is cut down to its medically relevant sections instead of being
truncated blindly: split the note at its section titles, keep sections by a priority list (discharge diagnosis,
chief complaint, procedures, history of present illness, past medical history, brief hospital course, ...) while
they fit, fill the rest of the budget with the head of the next section, and fall back to plain truncation when
no prioritised section is found (e.g. CAML-tokenised text, which has lost its newlines and colons).

Section titles can be learned from a corpus with DF-IAPF: a candidate is a phrase of up to `max_words` words at
the start of a line, ending with ':' ("History of Present Illness:"). With N notes, DF(p) is the number of notes
that have p as such a title, and APF(p) is the average number of times the phrase occurs anywhere in those notes
(title or running text). score(p) = (DF(p) / N) / APF(p): high for phrases most notes use once as a heading,
low for rare phrases and for field labels that repeat inside a note ("BP:", "Pt:"). The paper describes
DF-IAPF only in words; this formula is our reading of it.
"""
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

# One priority group per line, most relevant first; names are normalised titles (lower case, single spaces).
PRIORITY: tuple[tuple[str, ...], ...] = (
    ("discharge diagnosis", "discharge diagnoses", "final diagnosis", "final diagnoses", "principal diagnosis",
     "primary diagnosis", "diagnosis", "diagnoses", "admission diagnosis", "admitting diagnosis"),
    ("chief complaint", "reason for admission"),
    ("major surgical or invasive procedure", "procedures", "procedure", "operations", "operation",
     "procedures performed"),
    ("history of present illness", "history of the present illness", "hpi", "present illness"),
    ("past medical history", "pmh", "past surgical history", "past medical and surgical history"),
    ("brief hospital course", "hospital course", "summary of hospital course", "clinical course"),
    ("impression", "assessment and plan", "assessment", "impression and plan"),
    ("discharge condition", "condition at discharge", "discharge disposition"),
    ("pertinent results", "findings", "laboratory data", "labs"),
    ("medications on admission", "admission medications", "discharge medications"),
    ("physical exam", "physical examination", "social history", "family history", "allergies"),
)

# Titles that start a section when no corpus-learned list is given: the prioritised ones and the other
# standard headings of a discharge summary (so those end the section before them).
DEFAULT_TITLES: frozenset[str] = frozenset(name for group in PRIORITY for name in group) | {
    "admission date", "discharge date", "date of birth", "sex", "service", "attending", "followup instructions",
    "follow up instructions", "discharge instructions", "facility", "completed by", "dictated by",
}

_CANDIDATE = re.compile(r"^[ \t]*([A-Za-z][A-Za-z0-9 \t/&(),'-]*?)[ \t]*:", re.MULTILINE)
_WORD = re.compile(r"\w+")


def normalize_title(phrase: str) -> str:
    return " ".join(phrase.lower().split())


def title_candidates(text: str, max_words: int = 6) -> list[tuple[str, int]]:
    """(normalised phrase, offset of its line) for every line that starts with a phrase ending with ':'."""
    out = []
    for m in _CANDIDATE.finditer(text):
        phrase = normalize_title(m.group(1))
        if phrase and len(phrase.split()) <= max_words:
            out.append((phrase, m.start()))
    return out


@dataclass(frozen=True)
class TitleScore:
    phrase: str
    score: float
    df: int
    apf: float


def _occurrences(words: list[str], positions: dict[str, list[int]], phrase_words: list[str]) -> int:
    n = len(phrase_words)
    return sum(words[i:i + n] == phrase_words for i in positions.get(phrase_words[0], ()))


def df_iapf(texts: Iterable[str], max_words: int = 6) -> list[TitleScore]:
    """DF-IAPF score of every title candidate in the corpus, best first (ties by phrase)."""
    df: dict[str, int] = defaultdict(int)
    occurrences: dict[str, int] = defaultdict(int)
    n_notes = 0
    for text in texts:
        n_notes += 1
        phrases = {p for p, _ in title_candidates(text, max_words)}
        if not phrases:
            continue
        words = _WORD.findall(text.lower())
        positions: dict[str, list[int]] = defaultdict(list)
        for i, w in enumerate(words):
            positions[w].append(i)
        for phrase in phrases:
            phrase_words = _WORD.findall(phrase)
            if not phrase_words:
                continue
            df[phrase] += 1
            occurrences[phrase] += max(1, _occurrences(words, positions, phrase_words))
    scores = [TitleScore(p, (df[p] / n_notes) / (occurrences[p] / df[p]), df[p], occurrences[p] / df[p]) for p in df]
    return sorted(scores, key=lambda s: (-s.score, s.phrase))


def learn_titles(texts: Iterable[str], min_df: float = 0.05, top_k: int | None = 100,
                 max_words: int = 6) -> list[str]:
    """Section titles of a corpus: candidates found in at least `min_df` of the notes, best DF-IAPF first."""
    texts = list(texts)
    scored = [s for s in df_iapf(texts, max_words) if s.df >= min_df * len(texts)]
    return [s.phrase for s in scored[:top_k]]


@dataclass(frozen=True)
class Section:
    title: str | None  # normalised title; None for the text before the first title
    start: int
    end: int


def split_sections(text: str, titles: Iterable[str] = DEFAULT_TITLES, max_words: int = 6) -> list[Section]:
    """Cut `text` at every line that starts with one of `titles`; the sections cover the text exactly."""
    titles = {normalize_title(t) for t in titles}
    starts = [(off, p) for p, off in title_candidates(text, max_words) if p in titles]
    sections = []
    if not starts or starts[0][0] > 0:
        sections.append(Section(None, 0, starts[0][0] if starts else len(text)))
    for i, (off, phrase) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        sections.append(Section(phrase, off, end))
    return sections


def _longest_fitting_prefix(piece: str, fits: Callable[[str], bool]) -> str:
    """The longest prefix of `piece` ending at a word end (or, for a first word too long, a character) that fits."""
    cuts = [m.end() for m in re.finditer(r"\S+", piece)]
    lo, hi = 0, len(cuts)  # invariant: cuts[:lo] fit (lo = 0 means nothing is known to fit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(piece[:cuts[mid - 1]]):
            lo = mid
        else:
            hi = mid - 1
    if lo > 0:
        return piece[:cuts[lo - 1]]
    first_end = cuts[0] if cuts else 0
    lo, hi = 0, first_end
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(piece[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return piece[:lo]


def truncate(text: str, token_budget: int, count_tokens: Callable[[str], int]) -> str:
    """The longest word prefix of `text` that fits the budget."""
    if count_tokens(text) <= token_budget:
        return text
    return _longest_fitting_prefix(text, lambda s: count_tokens(s) <= token_budget).rstrip()


def _priority_rank(title: str | None, priority) -> int | None:
    for rank, group in enumerate(priority):
        if title in group:
            return rank
    return None


def segment_note(text: str, token_budget: int, count_tokens: Callable[[str], int],
                 titles: Iterable[str] = DEFAULT_TITLES,
                 priority: tuple[tuple[str, ...], ...] = PRIORITY) -> str:
    """`text` itself when it fits `token_budget`; else its most relevant sections, in note order, that fit.

    Sections are taken by priority group (note order within a group); the first one that does not fit whole
    contributes its head to fill the budget, and then the sections outside the priority list are added whole,
    in note order, while they fit. With no prioritised section the note is truncated.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    if count_tokens(text) <= token_budget:
        return text
    sections = split_sections(text, titles)
    pieces = {i: text[s.start:s.end].strip() for i, s in enumerate(sections)}
    ranks = {i: _priority_rank(s.title, priority) for i, s in enumerate(sections)}
    prioritised = sorted((i for i in ranks if ranks[i] is not None and pieces[i]), key=lambda i: (ranks[i], i))
    if not prioritised:
        return truncate(text, token_budget, count_tokens)

    kept: dict[int, str] = {}

    def assemble(extra: dict[int, str]) -> str:
        merged = {**kept, **extra}
        return "\n".join(merged[i] for i in sorted(merged))

    def fits(extra: dict[int, str]) -> bool:
        return count_tokens(assemble(extra)) <= token_budget

    for i in prioritised:
        if fits({i: pieces[i]}):
            kept[i] = pieces[i]
            continue
        head = _longest_fitting_prefix(pieces[i], lambda s: fits({i: s})).rstrip()
        if head:
            kept[i] = head
        break
    for i in sorted(set(pieces) - set(prioritised)):
        if pieces[i] and fits({i: pieces[i]}):
            kept[i] = pieces[i]
    if not kept:
        return truncate(text, token_budget, count_tokens)
    return assemble({})
