import math

import torch

from rlhfkit.losses import IGNORE, shift_labels, sft_loss_sum, token_logprobs


def test_shift_labels_moves_targets_one_left():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6]])
    assert shift_labels(labels).tolist() == [[IGNORE, 5, 6, IGNORE]]


def test_sft_loss_sum_hand_computed():
    """Vocab 2, uniform logits at t=0, confident logits at t=1.

    Position 0 predicts label[1]=1 under uniform logits: nll = ln 2.
    Position 1 predicts label[2]=0 with logits (ln 3, 0): p = 3/4, nll = ln(4/3).
    Position 2 has no next token. Sum = ln 2 + ln(4/3), count = 2.
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE, 1, 0]])
    nll, n = sft_loss_sum(logits, labels)
    assert n == 2
    assert math.isclose(float(nll), math.log(2) + math.log(4 / 3), rel_tol=1e-6)


def test_prompt_and_padding_positions_carry_no_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE]])
    nll, n = sft_loss_sum(logits, labels)
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[0, 1, 3] + logp[0, 2, 4])
    assert n == 2 and torch.allclose(nll, expected)


def test_token_logprobs_zero_at_ignored_positions():
    logits = torch.randn(2, 3, 4)
    targets = torch.tensor([[0, IGNORE, 3], [IGNORE, IGNORE, 1]])
    out = token_logprobs(logits, targets)
    assert out[0, 1] == 0 and out[1, 0] == 0
    assert torch.allclose(out[0, 2], torch.log_softmax(logits[0, 2], -1)[3])
