"""The DPO family's losses on hand-computed numbers (pure functions, no models)."""

import math

import pytest
import torch

from rlhfkit.losses import DPOLoss, dpo_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_sigmoid_loss_is_ln2_when_policy_equals_reference(beta):
    """Before the first update every log-ratio is 0, so -log sigmoid(0) = ln 2 whatever beta is."""
    logps = t(-5.0, -12.5)
    loss, stats = dpo_loss(logps, logps - 3, logps, logps - 3, t(4, 9), t(4, 9), beta)
    torch.testing.assert_close(loss, t(math.log(2), math.log(2)))
    assert (stats["rewards_chosen"] == 0).all() and (stats["rewards_rejected"] == 0).all()


def test_sigmoid_loss_by_hand():
    """chosen log-ratio = -1 - (-2) = 1, rejected = -3 - (-2) = -1, margin 2; beta 0.1:
    -log sigmoid(0.2) = softplus(-0.2) = 0.59814; implicit rewards 0.1 and -0.1."""
    loss, stats = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(2), t(4), beta=0.1)
    assert loss.item() == pytest.approx(softplus(-0.2), abs=1e-12)
    assert loss.item() == pytest.approx(0.598138869, abs=1e-8)
    assert stats["rewards_chosen"].item() == pytest.approx(0.1)
    assert stats["rewards_rejected"].item() == pytest.approx(-0.1)


def test_conservative_dpo_mixes_in_the_flipped_label():
    """cDPO with eps: (1 - eps) softplus(-beta m) + eps softplus(beta m); eps = 0 is plain DPO."""
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(2), t(4))
    plain, _ = dpo_loss(*args, beta=0.1)
    zero, _ = dpo_loss(*args, beta=0.1, variant=DPOLoss.CONSERVATIVE, label_smoothing=0.0)
    smoothed, _ = dpo_loss(*args, beta=0.1, variant=DPOLoss.CONSERVATIVE, label_smoothing=0.1)
    torch.testing.assert_close(zero, plain)
    assert smoothed.item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2), abs=1e-12)


def test_ipo_uses_per_token_average_log_ratios():
    """Log-ratios 1 over 2 tokens and -1 over 4 tokens: averages 0.5 and -0.25, h = 0.75;
    beta 0.1 targets h = 1 / (2 beta) = 5: (0.75 - 5)^2 = 18.0625."""
    loss, stats = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(2), t(4), beta=0.1, variant=DPOLoss.IPO)
    assert loss.item() == pytest.approx(18.0625, abs=1e-12)
    assert stats["rewards_chosen"].item() == pytest.approx(0.05)


def test_simpo_needs_no_reference_and_averages_per_token():
    """Average logprobs -1/2 and -3/4, margin 0.25; beta 2 makes beta * margin = 0.5 = gamma,
    so the loss is -log sigmoid(0) = ln 2; the reference is never read."""
    assert not DPOLoss.SIMPO.needs_reference and DPOLoss.SIGMOID.needs_reference
    loss, stats = dpo_loss(t(-1.0), t(-3.0), None, None, t(2), t(4), beta=2.0, variant=DPOLoss.SIMPO, simpo_gamma=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert stats["rewards_chosen"].item() == pytest.approx(-1.0)


def test_variants_that_need_a_reference_refuse_to_run_without_one():
    with pytest.raises(ValueError, match="needs reference logprobs"):
        dpo_loss(t(-1.0), t(-3.0), None, None, t(2), t(4), beta=0.1)


def test_gradient_raises_the_chosen_and_lowers_the_rejected():
    chosen, rejected = t(-4.0).requires_grad_(), t(-4.0).requires_grad_()
    loss, _ = dpo_loss(chosen, rejected, t(-4.0), t(-4.0), t(3), t(3), beta=0.5)
    loss.sum().backward()
    # d/dc -log sigmoid(beta (c - r)) = -beta sigmoid(-beta (c - r)) = -0.25 at c = r
    assert chosen.grad.item() == pytest.approx(-0.25) and rejected.grad.item() == pytest.approx(0.25)


@pytest.mark.parametrize("variant", [DPOLoss.SIGMOID, DPOLoss.IPO])
def test_agrees_with_trl_on_the_same_logprobs(variant, tmp_path):
    """TRL's DPOTrainer computes its loss on a batch it tokenized itself; we take the sequence
    logprobs of the same batch (our gather over its completion mask) into our loss: the two
    agree to a few fp32 rounding steps of the loss (IPO's ~25 has a step of 1.9e-6; the two sides
    sum and square in another order). The policy is a perturbed copy of the reference so
    log-ratios are not 0."""
    import copy

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.losses import token_logprobs
    from rlhfkit.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    reference = build_tiny_model(tokenizer).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
             "chosen": [{"role": "assistant", "content": str(i + 1)}],
             "rejected": [{"role": "assistant", "content": f"Sure! It is {i + 2}, I think."}]} for i in range(4)]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.1, loss_type=[variant.value],
                     report_to=[], use_cpu=True, bf16=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))  # chosen rows, then rejected rows
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()

        def sequence_logps(model) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
            return token_logprobs(logits, targets).sum(-1).chunk(2)

        chosen, rejected = sequence_logps(trainer.model)
        ref_chosen, ref_rejected = sequence_logps(reference)
        lengths = batch["completion_mask"].sum(-1).chunk(2)
        ours, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, *lengths, beta=0.1, variant=variant)
    assert ours.mean().item() == pytest.approx(trl_loss, rel=1e-6, abs=1e-6)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the perturbation made the comparison non-trivial
