import math

import torch

from rlhfkit.losses import IGNORE, token_logprobs


def test_token_logprobs_zero_at_ignored_positions():
    logits = torch.randn(2, 3, 4)
    targets = torch.tensor([[0, IGNORE, 3], [IGNORE, IGNORE, 1]])
    out = token_logprobs(logits, targets)
    assert out[0, 1] == 0 and out[1, 0] == 0
    assert torch.allclose(out[0, 2], torch.log_softmax(logits[0, 2], -1)[3])


# --- reward model losses ----------------------------------------------------------------------

from rlhfkit.losses import center_penalty, pairwise_loss, ranking_loss  # noqa: E402


def test_pairwise_loss_hand_computed():
    """r_c - r_r = ln 3 gives sigma = 3/4, loss = ln(4/3); equal rewards give ln 2; a margin of
    ln 3 on a difference of ln 3 brings it back to ln 2."""
    chosen, rejected = torch.tensor([math.log(3.0), 1.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(pairwise_loss(chosen, rejected), torch.tensor([math.log(4 / 3), math.log(2)]))
    margin = torch.tensor([math.log(3.0), 0.0])
    assert torch.allclose(pairwise_loss(chosen, rejected, margin), torch.tensor([math.log(2), math.log(2)]))


def test_ranking_loss_with_k2_is_bradley_terry():
    rewards = torch.tensor([[0.3, 1.7], [2.0, -1.0]])
    ranks = torch.tensor([[1, 0], [0, 1]])  # row 0: completion 1 is better; row 1: completion 0
    loss, n = ranking_loss(rewards, ranks, torch.ones_like(ranks, dtype=torch.bool))
    expected = pairwise_loss(torch.tensor([1.7, 2.0]), torch.tensor([0.3, -1.0]))
    assert torch.allclose(loss, expected) and n.tolist() == [1, 1]


def test_ranking_loss_k3_weights_each_pair_one_third():
    """K=3, ranks (0, 1, 2), rewards (a, b, c): loss = [l(a-b) + l(a-c) + l(b-c)] / C(3,2)."""
    a, b, c = 1.0, 0.5, -2.0
    loss, n = ranking_loss(torch.tensor([[a, b, c]]), torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool))
    l = lambda d: -math.log(1 / (1 + math.exp(-d)))  # noqa: E731
    assert n.item() == 3
    assert math.isclose(loss.item(), (l(a - b) + l(a - c) + l(b - c)) / 3, rel_tol=1e-6)


def test_ranking_loss_skips_ties_and_padding():
    """Ranks (0, 1, 1): the tied pair (1, 2) is skipped, two pairs remain. A padded 4th slot is
    ignored whatever its reward."""
    a, b, c = 0.2, 0.9, -0.4
    rewards = torch.tensor([[a, b, c, 100.0]])
    ranks = torch.tensor([[0, 1, 1, 0]])
    valid = torch.tensor([[True, True, True, False]])
    loss, n = ranking_loss(rewards, ranks, valid)
    l = lambda d: -math.log(1 / (1 + math.exp(-d)))  # noqa: E731
    assert n.item() == 2
    assert math.isclose(loss.item(), (l(a - b) + l(a - c)) / 2, rel_tol=1e-6)
    all_tied, n0 = ranking_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0, 0]]), torch.ones(1, 2, dtype=torch.bool))
    assert all_tied.item() == 0 and n0.item() == 0


def test_center_penalty_ignores_padding():
    rewards = torch.tensor([[1.0, -3.0, 7.0]])
    valid = torch.tensor([[True, True, False]])
    assert center_penalty(rewards, valid).item() == 5.0


def test_truncated_importance_weights_hand_computed():
    from rlhfkit.losses import policy_gradient_loss, truncated_importance_weights

    trainer = torch.tensor([[-1.0, -2.0, -0.1]])
    sampler = torch.tensor([[-1.5, -1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    weights = truncated_importance_weights(trainer, sampler, mask, cap=2.0)
    assert torch.allclose(weights, torch.tensor([[math.exp(0.5), math.exp(-1.0), 0.0]]))
    capped = truncated_importance_weights(torch.tensor([[-0.1]]), torch.tensor([[-2.0]]), torch.ones(1, 1), cap=2.0)
    assert float(capped) == 2.0  # exp(1.9) = 6.7, truncated
    # They weight the policy-gradient term only: the KL term is not the sampler's business.
    logprobs = torch.tensor([[-1.0, -2.0, -0.1]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.9, -0.3]])
    plain, _ = policy_gradient_loss(logprobs, torch.tensor([0.5]), mask, ref, kl_coef=0.1)
    weighted, _ = policy_gradient_loss(logprobs, torch.tensor([0.5]), mask, ref, kl_coef=0.1, weights=weights)
    kl = (torch.expm1(ref - logprobs) - (ref - logprobs)).detach()
    assert torch.allclose(weighted, (-0.5 * weights + 0.1 * kl) * mask)
    assert torch.allclose(plain, (-0.5 + 0.1 * kl) * mask)
