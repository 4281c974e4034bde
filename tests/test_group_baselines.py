"""GRPO/RLOO advantages and loss, online-DPO pairing and best-of-N picking, on hand-computed numbers."""

import random

import pytest
import torch

from rlhfkit.advantages import equal_reward_groups, group_advantages
from rlhfkit.eval.bon import pick_best
from rlhfkit.losses import aggregate_loss, policy_gradient_loss
from rlhfkit.train.online_dpo import choose_pair


def test_grpo_advantages_by_hand():
    """Group (1, 2, 3): mean 2, unbiased std 1 -> (-1, 0, 1) (minus a tiny eps effect)."""
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0]]), "grpo", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 0.0, 1.0]]))


def test_rloo_advantage_is_reward_minus_the_others_mean():
    """Group (1, 2, 6): the first sample's baseline is mean(2, 6) = 4, so 1 - 4 = -3;
    then 2 - 3.5 = -1.5 and 6 - 1.5 = 4.5."""
    adv = group_advantages(torch.tensor([[1.0, 2.0, 6.0]]), "rloo")
    torch.testing.assert_close(adv, torch.tensor([[-3.0, -1.5, 4.5]]))


@pytest.mark.parametrize("baseline", ["grpo", "rloo"])
def test_equal_groups_get_zero_advantage_and_are_flagged(baseline):
    rewards = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]])
    adv = group_advantages(rewards, baseline)
    assert (adv[0] == 0).all() and (adv[1] != 0).all()
    assert equal_reward_groups(rewards).tolist() == [True, False]


def test_group_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([[1.0]]), "grpo")


def test_policy_gradient_loss_has_value_minus_advantage_and_reinforce_gradient():
    """ratio = exp(logp - sg(logp)) = 1, so each real token's loss is -A; its gradient is -A
    (d/dlogp of -A * exp(logp - c) at logp = c). Masked tokens count nowhere."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, stats = policy_gradient_loss(logprobs, torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(loss, torch.tensor([[-2.0, -2.0, 0.0], [1.0, 1.0, 1.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.0, -2.0, 0.0], [1.0, 1.0, 1.0]]))
    assert stats == {}


def test_policy_gradient_kl_term_is_k3_against_the_reference():
    """log(ref/policy) = -1 at a token: k3 = e^-1 - 1 + 1 = 0.36788; with coefficient 0.5 and
    advantage 0 the loss is 0.18394; where policy = reference k3 is 0."""
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-2.0, -2.0]])
    loss, stats = policy_gradient_loss(logprobs, torch.tensor([0.0]), torch.ones(1, 2), ref, kl_coef=0.5)
    assert loss[0, 0].item() == pytest.approx(0.5 * 0.367879441, abs=1e-6)
    assert loss[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    assert stats["kl"].item() == pytest.approx(0.367879441 / 2, abs=1e-6)


def test_token_and_sequence_aggregation_by_hand():
    """Per-token losses: response A (2 tokens) 1, 1; response B (4 tokens) 4, 4, 4, 4.
    token level: (2 + 16) / 6 tokens = 3. sequence level: (mean 1 + mean 4) / 2 = 2.5.
    Split into two micro-batches, the shares add up to the same totals."""
    per_token = torch.tensor([[1.0, 1.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert aggregate_loss(per_token, mask, "token", 6, 2).item() == pytest.approx(3.0)
    assert aggregate_loss(per_token, mask, "sequence", 6, 2).item() == pytest.approx(2.5)
    for level, whole in (("token", 3.0), ("sequence", 2.5)):
        parts = sum(aggregate_loss(per_token[i : i + 1], mask[i : i + 1], level, 6, 2).item() for i in range(2))
        assert parts == pytest.approx(whole)


def test_choose_pair_modes():
    rng = random.Random(0)
    rewards = [0.2, 0.9, 0.1, 0.5]
    assert choose_pair(rewards, "best_worst", rng) == (1, 2)
    for _ in range(20):
        chosen, rejected = choose_pair(rewards, "best_random", rng)
        assert chosen == 1 and rewards[rejected] < 0.9
        chosen, rejected = choose_pair(rewards, "random", rng)
        assert rewards[chosen] > rewards[rejected]
    assert choose_pair([0.3, 0.3, 0.3], "best_worst", rng) is None


def test_pick_best_per_group_first_on_ties():
    assert pick_best([0.1, 0.7, 0.7, -1.0, -0.5, 0.3], n=3) == [1, 2]
    with pytest.raises(ValueError):
        pick_best([0.1, 0.2, 0.3], n=2)
