"""Win rates of one model's responses against another's under a pairwise judge.

A pairwise judge says, for a prompt and two responses shown in order, how much it prefers the
first (1 = first, 0 = second, 0.5 = tie). Judges can prefer a position (LLM judges often prefer
the first), so every pair is judged in both orders and the two verdicts are averaged: a judge
that always says "first" then scores every pair 0.5, a win rate of exactly 50%. Ties count half.
The 95% interval is a percentile bootstrap over prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from rlhfkit.data.records import Prompt
from rlhfkit.data.world import World

PairJudge = Callable[[list[Prompt], list[str], list[str]], list[float]]
"""(prompts, first responses, second responses) -> preference for the first, in [0, 1]."""


@dataclass
class WinRate:
    win_rate: float  # mean preference for A over B, ties counted half
    low: float  # 95% bootstrap interval
    high: float
    wins: int  # pairs where A won in both orders (or on average)
    ties: int
    losses: int
    position_consistency: float  # share of pairs where both orders gave the same verdict

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}win_rate": self.win_rate, f"{prefix}win_rate_low": self.low,
                f"{prefix}win_rate_high": self.high, f"{prefix}wins": self.wins, f"{prefix}ties": self.ties,
                f"{prefix}losses": self.losses}

    def __str__(self) -> str:
        return (f"{100 * self.win_rate:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] "
                f"({self.wins} wins, {self.ties} ties, {self.losses} losses)")


def gold_pair_judge(world: World) -> PairJudge:
    """The world's gold judge as a pairwise judge: the higher gold score wins; equal scores tie."""

    def judge(prompts: list[Prompt], first: list[str], second: list[str]) -> list[float]:
        a = world.judge_many(prompts, first)
        b = world.judge_many(prompts, second)
        return [0.5 if abs(x.score - y.score) < 1e-9 else float(x.score > y.score) for x, y in zip(a, b)]

    return judge


def win_rate(judge: PairJudge, prompts: list[Prompt], responses_a: list[str], responses_b: list[str],
             bootstrap: int = 1000, seed: int = 0) -> WinRate:
    """How often A's response beats B's, each pair judged as (A, B) and as (B, A)."""
    if not (len(prompts) == len(responses_a) == len(responses_b)) or not prompts:
        raise ValueError(f"win_rate needs equally many prompts and responses, got "
                         f"{len(prompts)}, {len(responses_a)}, {len(responses_b)}")
    a_first = judge(prompts, responses_a, responses_b)
    b_first = judge(prompts, responses_b, responses_a)
    per_pair = [(x + (1.0 - y)) / 2 for x, y in zip(a_first, b_first)]
    rng = random.Random(seed)
    n = len(per_pair)
    means = sorted(sum(per_pair[rng.randrange(n)] for _ in range(n)) / n for _ in range(bootstrap))
    low, high = (means[int(0.025 * (bootstrap - 1))], means[int(0.975 * (bootstrap - 1))]) if bootstrap else (0.0, 1.0)
    return WinRate(
        win_rate=sum(per_pair) / n, low=low, high=high,
        wins=sum(p > 0.5 for p in per_pair), ties=sum(p == 0.5 for p in per_pair),
        losses=sum(p < 0.5 for p in per_pair),
        position_consistency=sum(_verdict(x) == -_verdict(y) for x, y in zip(a_first, b_first)) / n,
    )


def _verdict(preference: float) -> int:
    """+1 first preferred, -1 second preferred, 0 tie."""
    return (preference > 0.5) - (preference < 0.5)
