"""Rank statistics of a scorer against the gold judge. Pure Python: no I/O, no config objects."""

from __future__ import annotations


def gold_agreement(scores: list[float], gold: list[float]) -> tuple[int, int]:
    """(pairs the RM orders like the gold judge, pairs with different gold scores)."""
    pairs = [(i, j) for i in range(len(gold)) for j in range(i + 1, len(gold)) if gold[i] != gold[j]]
    return sum((scores[i] - scores[j]) * (gold[i] - gold[j]) > 0 for i, j in pairs), len(pairs)


def spearman_rho(x: list[float], y: list[float]) -> float | None:
    """Spearman correlation with average ranks for ties; None when either side is constant."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if vx == 0 or vy == 0 else cov / (vx * vy) ** 0.5
