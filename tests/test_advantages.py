"""Hand-checked tests of the RL math: GAE, whitening, KL estimators, PPO losses."""

import math

import pytest
import torch

from rlhfkit.advantages import (
    KLController, gae, gae_reference, kl_penalised_rewards, kl_per_token, masked_mean, masked_var, masked_whiten,
)
from rlhfkit.losses import ppo_policy_loss, ppo_value_loss


def test_gae_vectorised_matches_the_definition_with_ragged_masks():
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 7), torch.randn(5, 7)
    lengths = [7, 1, 4, 6, 3]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        a, r = gae(rewards * mask, values, mask, gamma, lam)
        a_ref, r_ref = gae_reference(rewards * mask, values, mask, gamma, lam)
        assert torch.allclose(a, a_ref, atol=1e-5) and torch.allclose(r, r_ref, atol=1e-5)


def test_gae_hand_computed_two_tokens():
    """T=2, gamma=1, lam=0.5, r=(0, 1), V=(0.2, 0.6), V_2 = 0 (episode ends at EOS):
    delta_1 = 1 - 0.6 = 0.4; delta_0 = 0 + 0.6 - 0.2 = 0.4; A_1 = 0.4; A_0 = 0.4 + 0.5*0.4 = 0.6;
    returns = A + V = (0.8, 1.0). A third, padded position is ignored whatever its value."""
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.2, 0.6, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    a, r = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(a, torch.tensor([[0.6, 0.4, 0.0]]))
    assert torch.allclose(r, torch.tensor([[0.8, 1.0, 0.0]]))


def test_masked_statistics_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # (1 + 0 + 1) / (3 - 1)
    w = masked_whiten(x, mask)
    assert w[mask.bool()].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert w[~mask.bool()].abs().sum() == 0
    kept = masked_whiten(x, mask, shift_mean=False)
    assert kept[mask.bool()].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)


def test_kl_estimators_hand_computed():
    """log p = log 0.5, log q = log 0.25: k1 = ln 2; k3 = (q/p - 1) - ln(q/p) = -0.5 + ln 2."""
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    same = torch.randn(2, 3)
    assert kl_per_token(same, same, "k1").abs().max() == 0 and kl_per_token(same, same, "k3").abs().max() == 0
    assert (kl_per_token(torch.randn(50), torch.randn(50), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_per_token(same, same, "k2")


def test_kl_penalised_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -2.5, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 ended (EOS) at t=1
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 2.0], [0.0, -1.05, 0.0]]))


def test_ppo_policy_loss_hand_computed_and_ratio_one_before_update():
    """A = (+1, -1), ratio = (1.5, 0.5), clip 0.2:
    token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)."""
    old = torch.log(torch.tensor([[0.2, 0.4]]))
    new = torch.log(torch.tensor([[0.3, 0.2]]))
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = ppo_policy_loss(new, old, adv, mask, clip=0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, 0.8]]))
    assert stats["clipfrac"].item() == 1.0 and stats["ratio"].item() == pytest.approx(1.0)
    # before the first update new == old: ratio 1, approx_kl 0, nothing clipped, loss = -A
    loss0, stats0 = ppo_policy_loss(old, old, adv, mask)
    assert torch.allclose(loss0, -adv) and stats0["approx_kl"] == 0 and stats0["clipfrac"] == 0


def test_ppo_losses_ignore_tokens_after_eos():
    mask = torch.tensor([[1.0, 0.0]])
    loss, _ = ppo_policy_loss(torch.tensor([[0.0, 50.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 1e6]]), mask)
    assert loss[0, 1] == 0
    vloss, _ = ppo_value_loss(torch.tensor([[0.0, 1e3]]), torch.zeros(1, 2), torch.zeros(1, 2), mask)
    assert vloss[0, 1] == 0


def test_ppo_value_loss_hand_computed():
    """old V = 0, new V = 1, R = 2, clip 0.2: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24;
    loss = 0.5 * max = 1.62. New V = 1.9 near R: (0.1)^2 vs 3.24 again -> 1.62 (clipping bites)."""
    returns, old, mask = torch.tensor([[2.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2)
    loss, stats = ppo_value_loss(torch.tensor([[1.0, 1.9]]), old, returns, mask, clip=0.2)
    assert torch.allclose(loss, torch.tensor([[1.62, 1.62]]))
    assert stats["value_clipfrac"].item() == 1.0


def test_adaptive_kl_controller_moves_towards_target():
    fixed = KLController(0.1)
    fixed.update(current_kl=100.0, n_samples=64)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=1000)
    adaptive.update(current_kl=12.0, n_samples=100)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    adaptive.update(current_kl=3.0, n_samples=100)  # error -0.5 clipped to -0.2
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)
