"""Win rates under a pairwise judge: both orders, ties half, bootstrap intervals."""

import pytest

from rlhfkit.data.world import World
from rlhfkit.eval.winrate import gold_pair_judge, win_rate


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
