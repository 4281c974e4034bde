"""Win rates under a pairwise judge: both orders, ties half, bootstrap intervals, length control."""

import math

import pytest

from rlhfkit.data.world import World
from rlhfkit.eval.winrate import bootstrap_interval, gold_pair_judge, length_controlled, win_rate


@pytest.fixture(scope="module")
def world_prompts():
    world = World(seed=0)
    return world, world.prompts(40, "eval")


def test_a_judge_that_always_prefers_the_first_position_gives_50_percent(world_prompts):
    world, prompts = world_prompts
    good = [world.demonstrate(p) for p in prompts]
    always_first = lambda ps, first, second: [1.0] * len(ps)  # noqa: E731
    result = win_rate(always_first, prompts, good, ["no idea"] * len(prompts))
    assert result.win_rate == 0.5 and result.ties == len(prompts)
    assert result.position_consistency == 0.0  # it flipped its verdict on every pair


def test_gold_judge_counts_wins_ties_and_losses(world_prompts):
    """Demonstrations score 1 under gold and an off-topic answer scores less, so on 40 prompts:
    demos vs themselves are 40 ties (50%), demos vs junk are 40 wins (100%), and a mix of 30
    demos + 10 junk against demos is 30 ties and 10 losses: (30 * 0.5 + 10 * 0) / 40 = 37.5%."""
    world, prompts = world_prompts
    judge = gold_pair_judge(world)
    good = [world.demonstrate(p) for p in prompts]
    junk = ["banana banana banana banana banana banana"] * len(prompts)
    assert all(world.judge(p, g).score > world.judge(p, j).score for p, g, j in zip(prompts, good, junk))

    same = win_rate(judge, prompts, good, good)
    assert (same.win_rate, same.ties, same.position_consistency) == (0.5, 40, 1.0)
    better = win_rate(judge, prompts, good, junk)
    assert (better.win_rate, better.wins, better.low, better.high) == (1.0, 40, 1.0, 1.0)
    mixed = win_rate(judge, prompts, good[:30] + junk[30:], good)
    assert mixed.win_rate == pytest.approx(0.375)
    assert (mixed.ties, mixed.losses) == (30, 10)
    assert mixed.low < 0.375 < mixed.high and 0.2 < mixed.low and mixed.high < 0.5


def test_win_rate_rejects_mismatched_lengths(world_prompts):
    world, prompts = world_prompts
    with pytest.raises(ValueError, match="equally many"):
        win_rate(gold_pair_judge(world), prompts, ["a"], ["b"])


# --- length-controlled win rate -----------------------------------------------------------------


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_length_control_changes_nothing_when_the_judge_ignores_length():
    """Every preference appears once with A longer by d and once with A shorter by d, so length
    carries no information: the fitted phi is exactly 0 (the score equation for phi is
    sum_i (p_i - s) d_i = 0 by symmetry) and sigmoid(theta) = mean(p), the plain win rate
    (up to the 1e-3 ridge on theta)."""
    prefs = [1.0, 1.0, 0.5, 0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0]
    diffs = [3, 10, 1, 7, 2, 5, 8, 4, 6, 12]
    p = prefs + prefs
    d = diffs + [-x for x in diffs]
    lc = length_controlled(p, d)
    assert lc.win_rate == pytest.approx(sum(p) / len(p), abs=1e-3)  # 0.7
    assert lc.length_coef == pytest.approx(0.0, abs=1e-9)
    assert lc.low < lc.win_rate < lc.high and not lc.extrapolated


def test_length_control_removes_a_win_that_comes_only_from_length():
    """A is longer in most pairs and the judge's preference depends on length alone:
    p_i = sigmoid(0.5 * d_i). The raw win rate is mean(p) ~ 0.76, but at equal length (d = 0)
    the judge is indifferent: the exact fit is theta = 0, i.e. 50% (the weak prior on phi moves
    it by ~0.001 at 200 pairs). Shifting every log-odds by +1 (A also better) gives sigmoid(1)."""
    d = [-2, -1, 1, 2, 3, 4, 5, 6, 8, 10] * 20
    p = [_sigmoid(0.5 * x) for x in d]
    raw = sum(p) / len(p)
    assert raw > 0.75
    lc = length_controlled(p, d)
    assert lc.win_rate == pytest.approx(0.5, abs=0.005)
    assert lc.high < 0.51
    assert lc.length_coef / lc.scale == pytest.approx(0.5, rel=0.02)  # per token of length, as generated
    better = length_controlled([_sigmoid(1.0 + 0.5 * x) for x in d], d)
    assert better.win_rate == pytest.approx(_sigmoid(1.0), abs=0.005)


def test_length_control_stays_sane_when_one_side_is_always_longer():
    """A loses every pair and is always longer: nothing separates quality from length, and the
    rate at equal length (never observed) must not be invented: it stays near 0, flagged."""
    lc = length_controlled([0.0] * 8, [18, 20, 25, 30, 33, 35, 38, 40])
    assert lc.win_rate < 0.01 and lc.high < 0.01 and lc.extrapolated


def test_win_rate_reports_length_control_when_given_length_differences(world_prompts):
    world, prompts = world_prompts
    good = [world.demonstrate(p) for p in prompts]
    junk = ["banana"] * len(prompts)
    result = win_rate(gold_pair_judge(world), prompts, good, junk, length_diffs=[len(g) - 6 for g in good])
    assert result.length_controlled is not None and result.per_pair == [1.0] * len(prompts)
    assert result.metrics("x/")["x/lc_win_rate"] == result.length_controlled.win_rate
    assert "x/lc_win_rate" not in win_rate(gold_pair_judge(world), prompts, good, junk).metrics("x/")


def test_bootstrap_interval_of_a_mean():
    """Constant values: every resample has the same mean. Two values 0 and 1 in equal measure:
    the interval brackets 0.5, and win_rate's interval is this function on its per-pair values."""
    assert bootstrap_interval([0.7] * 20) == pytest.approx((0.7, 0.7))
    low, high = bootstrap_interval([0.0, 1.0] * 50)
    assert 0.35 < low < 0.5 < high < 0.65
    assert bootstrap_interval([]) != bootstrap_interval([])  # nan: no data, no interval

