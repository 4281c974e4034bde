"""Inter-labeller agreement on rankings: pure functions over rank tuples (0 = best, ties equal).

Two measures, both over the response pairs of tasks that two labellers both ranked:

- pairwise agreement: of the pairs (i, j) that *both* labellers ordered strictly, the share they
  ordered the same way (InstructGPT reports ~73% between its labellers, arXiv 2203.02155 §5.2);
- Kendall's tau-b per task (ties handled), averaged over tasks: 1 = same order, -1 = reversed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations


def pair_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(pairs ordered the same way, pairs both ordered strictly) for two rankings of K responses."""
    agree = total = 0
    for i, j in combinations(range(len(a)), 2):
        if a[i] == a[j] or b[i] == b[j]:
            continue  # a tie on either side says nothing about this pair's order
        total += 1
        agree += (a[i] < a[j]) == (b[i] < b[j])
    return agree, total


def kendall_tau_b(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Kendall's tau-b = (C - D) / sqrt((n0 - n1)(n0 - n2)); None when either side is all tied.

    C, D: concordant and discordant pairs; n0 = K(K-1)/2; n1, n2: pairs tied in a, in b.
    """
    concordant = discordant = tied_a = tied_b = 0
    for i, j in combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        tied_a += da == 0
        tied_b += db == 0
        if da * db > 0:
            concordant += 1
        elif da * db < 0:
            discordant += 1
    n0 = len(a) * (len(a) - 1) // 2
    denominator = math.sqrt((n0 - tied_a) * (n0 - tied_b))
    return None if denominator == 0 else (concordant - discordant) / denominator


@dataclass
class PairAgreement:
    """Agreement between two labellers over the tasks they both ranked."""

    a: str
    b: str
    tasks: int = 0
    agree: int = 0
    pairs: int = 0
    tau_sum: float = 0.0
    tau_tasks: int = 0

    @property
    def rate(self) -> float | None:
        return self.agree / self.pairs if self.pairs else None

    @property
    def tau(self) -> float | None:
        return self.tau_sum / self.tau_tasks if self.tau_tasks else None

    def add(self, ranks_a: Sequence[int], ranks_b: Sequence[int]) -> None:
        agree, pairs = pair_agreement(ranks_a, ranks_b)
        self.tasks += 1
        self.agree += agree
        self.pairs += pairs
        tau = kendall_tau_b(ranks_a, ranks_b)
        if tau is not None:
            self.tau_sum += tau
            self.tau_tasks += 1


def pairwise(rankings: Iterable[tuple[int, str, Sequence[int]]]) -> list[PairAgreement]:
    """One PairAgreement per pair of labellers that share a ranked task, from (task, labeller, ranks)."""
    by_task: dict[int, dict[str, Sequence[int]]] = defaultdict(dict)
    for task, labeller, ranks in rankings:
        by_task[task][labeller] = ranks
    result: dict[tuple[str, str], PairAgreement] = {}
    for ranked in by_task.values():
        for x, y in combinations(sorted(ranked), 2):
            result.setdefault((x, y), PairAgreement(x, y)).add(ranked[x], ranked[y])
    return [result[key] for key in sorted(result)]


def total(pairs: Iterable[PairAgreement], name: str = "all", other: str = "") -> PairAgreement:
    """Pool several PairAgreements (all of them, or those one labeller is part of)."""
    pooled = PairAgreement(name, other)
    for p in pairs:
        pooled.tasks += p.tasks
        pooled.agree += p.agree
        pooled.pairs += p.pairs
        pooled.tau_sum += p.tau_sum
        pooled.tau_tasks += p.tau_tasks
    return pooled
