"""Win rates of one model's responses against another's under a pairwise judge.

A pairwise judge says, for a prompt and two responses shown in order, how much it prefers the
first (1 = first, 0 = second, 0.5 = tie). Judges can prefer a position (LLM judges often prefer
the first), so every pair is judged in both orders and the two verdicts are averaged: a judge
that always says "first" then scores every pair 0.5, a win rate of exactly 50%. Ties count half.
The 95% interval is a percentile bootstrap over prompts.

Judges also tend to prefer longer responses, so a policy can "win" by writing more. Given each
pair's length difference, ``length_controlled`` fits the per-pair preferences with a logistic
regression on that difference and reports the win rate it predicts at equal length (in the spirit
of AlpacaEval 2's length-controlled win rate, Dubois et al. 2024).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from rlhfkit.data.records import Prompt
from rlhfkit.data.world import World

PairJudge = Callable[[list[Prompt], list[str], list[str]], list[float]]
"""(prompts, first responses, second responses) -> preference for the first, in [0, 1]."""


@dataclass
class LengthControlled:
    """The win rate at equal length: sigmoid(theta) of p_i ~ sigmoid(theta + phi * d_i / scale)."""

    win_rate: float
    low: float  # 95% bootstrap interval over pairs (prompts)
    high: float
    length_coef: float  # phi: log-odds of winning per `scale` of extra length (A minus B)
    scale: float  # the length differences' standard deviation (1 when they are all equal)
    extrapolated: bool = False  # A was longer (or shorter) in every pair: d = 0 was never observed


@dataclass
class WinRate:
    win_rate: float  # mean preference for A over B, ties counted half
    low: float  # 95% bootstrap interval
    high: float
    wins: int  # pairs where A won in both orders (or on average)
    ties: int
    losses: int
    position_consistency: float  # share of pairs where both orders gave the same verdict
    per_pair: list[float] = field(default_factory=list)  # preference for A per pair, both orders averaged
    a_first: list[float] = field(default_factory=list)  # the judge's verdicts with A shown first
    b_first: list[float] = field(default_factory=list)  # ... with B shown first (preference for B)
    length_controlled: LengthControlled | None = None  # when ``win_rate`` was given length differences

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}win_rate": self.win_rate, f"{prefix}win_rate_low": self.low,
               f"{prefix}win_rate_high": self.high, f"{prefix}wins": self.wins, f"{prefix}ties": self.ties,
               f"{prefix}losses": self.losses}
        if self.length_controlled is not None:
            lc = self.length_controlled
            out.update({f"{prefix}lc_win_rate": lc.win_rate, f"{prefix}lc_win_rate_low": lc.low,
                        f"{prefix}lc_win_rate_high": lc.high})
        return out

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
             bootstrap: int = 1000, seed: int = 0, length_diffs: list[float] | None = None) -> WinRate:
    """How often A's response beats B's, each pair judged as (A, B) and as (B, A).

    ``length_diffs`` (len(A_i) - len(B_i), in tokens or words) adds the length-controlled rate."""
    if not (len(prompts) == len(responses_a) == len(responses_b)) or not prompts:
        raise ValueError(f"win_rate needs equally many prompts and responses, got "
                         f"{len(prompts)}, {len(responses_a)}, {len(responses_b)}")
    a_first = judge(prompts, responses_a, responses_b)
    b_first = judge(prompts, responses_b, responses_a)
    per_pair = [(x + (1.0 - y)) / 2 for x, y in zip(a_first, b_first)]
    n = len(per_pair)
    low, high = bootstrap_interval(per_pair, bootstrap, seed) if bootstrap else (0.0, 1.0)
    return WinRate(
        win_rate=sum(per_pair) / n, low=low, high=high,
        wins=sum(p > 0.5 for p in per_pair), ties=sum(p == 0.5 for p in per_pair),
        losses=sum(p < 0.5 for p in per_pair),
        position_consistency=sum(_verdict(x) == -_verdict(y) for x, y in zip(a_first, b_first)) / n,
        per_pair=per_pair, a_first=list(a_first), b_first=list(b_first),
        length_controlled=None if length_diffs is None else length_controlled(per_pair, length_diffs, bootstrap, seed),
    )


def bootstrap_interval(values: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (resampled n times)."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(len(values))] for _ in values) / len(values) for _ in range(n))
    return means[int(0.025 * (n - 1))], means[int(0.975 * (n - 1))]


def _verdict(preference: float) -> int:
    """+1 first preferred, -1 second preferred, 0 tie."""
    return (preference > 0.5) - (preference < 0.5)


# --- length control ---------------------------------------------------------------------------


def length_controlled(preferences: list[float], length_diffs: list[float], bootstrap: int = 1000,
                      seed: int = 0) -> LengthControlled:
    """Win rate at equal length, with a percentile bootstrap over pairs.

    Args: ``preferences`` (N,) p_i in [0, 1], A's preference per pair (both orders averaged, ties
    0.5); ``length_diffs`` (N,) d_i = len(A_i) - len(B_i).
    Fits p_i ~ sigmoid(theta + phi * d_i / scale), scale = std(d), by maximum likelihood (soft
    labels) and returns sigmoid(theta), the rate at d = 0. When the judge does not care about
    length, phi ~ 0 and this is the plain win rate; when A wins only by being longer, it is ~50%.
    When A is longer (or shorter) in every pair, d = 0 lies outside the data and the rate is an
    extrapolation: ``extrapolated`` says so.
    """
    n = len(preferences)
    if n != len(length_diffs) or not n:
        raise ValueError(f"length_controlled needs equally many preferences and length differences, "
                         f"got {n} and {len(length_diffs)}")
    p = torch.tensor(preferences, dtype=torch.float64)
    d = torch.tensor(length_diffs, dtype=torch.float64)
    std = float(d.std(unbiased=False))
    scale = std if std > 0 else 1.0
    x = d / scale
    theta, phi = fit_logistic(p.unsqueeze(0), x, torch.ones(1, n, dtype=torch.float64))
    low, high = 0.0, 1.0
    if bootstrap:
        # Resampling pairs = a multinomial count per pair: every replicate is one weighted fit,
        # all solved together.
        gen = torch.Generator().manual_seed(seed)
        picks = torch.randint(n, (bootstrap, n), generator=gen)
        weights = torch.zeros(bootstrap, n, dtype=torch.float64).scatter_add_(
            1, picks, torch.ones(bootstrap, n, dtype=torch.float64))
        thetas, _ = fit_logistic(p.expand(bootstrap, n), x, weights)
        rates = sorted(torch.sigmoid(thetas).tolist())
        low, high = rates[int(0.025 * (bootstrap - 1))], rates[int(0.975 * (bootstrap - 1))]
    extrapolated = not (min(length_diffs) <= 0 <= max(length_diffs))
    return LengthControlled(float(torch.sigmoid(theta[0])), low, high, float(phi[0]), scale, extrapolated)


def fit_logistic(p: torch.Tensor, x: torch.Tensor, w: torch.Tensor, l2_theta: float = 1e-3, l2_phi: float = 0.1,
                 iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """R weighted logistic regressions p ~ sigmoid(theta + phi * x) by Newton's method.

    Args: ``p`` (R, N) soft targets in [0, 1]; ``x`` (N,) the regressor; ``w`` (R, N) weights
    (1 each, or bootstrap counts). Returns theta (R,), phi (R,).
    Minimises sum_i w_i * CE(p_i, sigmoid(z_i)) + l2_theta/2 * theta^2 + l2_phi/2 * phi^2, convex.
    The tiny ridge on theta keeps it finite when A wins every pair. The one on phi is a weak prior
    (sd ~3 log-odds per std of length): without it, data that length separates (A loses every
    pair but ties its shortest answer) drive phi to -inf and the rate at d = 0 to 100%; with it,
    an unexplained outcome is put on quality, not length. Each step is capped at 4 in log-odds, a
    trust region against the overshoot Newton can do far from the optimum.
    """
    features = torch.stack([torch.ones_like(x), x], dim=-1)  # (N, 2)
    beta = torch.zeros(p.shape[0], 2, dtype=torch.float64)  # (R, 2): theta, phi
    ridge = torch.tensor([l2_theta, l2_phi], dtype=torch.float64)  # (2,)
    for _ in range(iters):
        s = torch.sigmoid(beta @ features.T)  # (R, N)
        grad = (w * (s - p)) @ features + ridge * beta  # (R, 2)
        hess = torch.einsum("rn,ni,nj->rij", w * s * (1 - s), features, features) + torch.diag(ridge)  # (R, 2, 2)
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        step = step * (4.0 / step.abs().amax(-1, keepdim=True).clamp(min=4.0))
        beta = beta - step
        if float(step.abs().max()) < 1e-10:
            break
    return beta[:, 0], beta[:, 1]
