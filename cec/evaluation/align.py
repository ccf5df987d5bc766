"""Length-based sentence alignment (Gale & Church 1993) and CodiEsp-X gold evidence mapped onto English lines.

CodiEsp's English notes are machine translations, one sentence a line, that often split a Spanish sentence in
two. align() pairs source and target sentences by character length alone, with 1-1, 1-2 and 2-1 groups: the cost
of a group is -log P(type) - log P(delta), delta = (l_t - c * l_s) / sqrt(s2 * l), P(delta) = 2 * (1 - Phi(|delta|)),
l the mean of l_s and l_t / c (Gale & Church's s2 = 6.8; c is the target/source length ratio of the two
documents unless given).

(nltk.translate.gale_church does the same, with 0-1, 1-0 and 2-2 groups besides; these 40 lines spare the
project a dependency.)
"""
from __future__ import annotations

import math

PRIORS = {(1, 1): 0.89, (1, 2): 0.089, (2, 1): 0.089}  # Gale & Church's, renormalised below
S2 = 6.8


def _cost(ls: int, lt: int, c: float, prior: float) -> float:
    mean = (ls + lt / c) / 2  # Gale & Church: delta scaled by the mean of both sides
    delta = (lt - ls * c) / math.sqrt(S2 * max(mean, 1))
    tail = math.erfc(abs(delta) / math.sqrt(2))  # 2 * (1 - Phi(|delta|))
    return -math.log(prior) - math.log(max(tail, 1e-300))


def align(src: list[int], tgt: list[int], c: float | None = None) -> list[tuple[list[int], list[int]]] | None:
    """Groups ([source indices], [target indices]) covering both sides in order, of least total cost; None
    when no sequence of 1-1, 1-2 and 2-1 groups covers them (one side over twice the other)."""
    n, m = len(src), len(tgt)
    if c is None:
        c = (sum(tgt) / sum(src)) if sum(src) and sum(tgt) else 1.0
    total = sum(PRIORS.values())
    inf = float("inf")
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    back = [[None] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = 0.0
    for i in range(n + 1):
        for j in range(m + 1):
            if cost[i][j] == inf:
                continue
            for (di, dj), p in PRIORS.items():
                a, b = i + di, j + dj
                if a > n or b > m:
                    continue
                x = cost[i][j] + _cost(sum(src[i:a]), sum(tgt[j:b]), c, p / total)
                if x < cost[a][b]:
                    cost[a][b], back[a][b] = x, (i, j)
    if cost[n][m] == inf:
        return None
    groups, (i, j) = [], (n, m)
    while (i, j) != (0, 0):
        pi, pj = back[i][j]
        groups.append((list(range(pi, i)), list(range(pj, j))))
        i, j = pi, pj
    return groups[::-1]


def spans_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def parse_offsets(field: str) -> list[tuple[int, int]]:
    """CodiEsp-X offsets, 'start end' or discontinuous 'a b;c d', as [(start, end), ...]."""
    return [(int(a), int(b)) for a, b in (part.split() for part in field.split(";") if part.strip())]


def map_span(spans: list[tuple[int, int]], src_sents: list[tuple[int, int]],
             groups: list[tuple[list[int], list[int]]]) -> list[int]:
    """The target sentences aligned to the source sentences that the character spans touch, in order."""
    touched = {i for i, s in enumerate(src_sents) for span in spans if spans_overlap(span, s)}
    return sorted({j for g_src, g_tgt in groups if touched & set(g_src) for j in g_tgt})
