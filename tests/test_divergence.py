"""Diverged training stops with a clear error and saves nothing as finished; NaN/inf settings are
refused before any work."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_errors import refused

from rlhfkit.train.loop import DivergenceGuard

HEALTHY = dict(grad_norm=1.0, skipped=False, had_gradient=True, weights_finite=True)


def feed(guard: DivergenceGuard, updates: list[dict]) -> list[str | None]:
    return [guard.check(**{**HEALTHY, **u}) for u in updates]


def test_guard_lets_healthy_and_noisy_training_through():
    """Losses that wander (up 10x), one skipped update between good ones, a zero gradient now and
    then, updates without any gradient (GRPO when every group's rewards are equal): no verdict."""
    updates = [dict(loss=6.0), dict(loss=60.0), dict(loss=None, skipped=True), dict(loss=5.0),
               dict(loss=5.0, skipped=True), dict(loss=4.0, grad_norm=0.0), dict(loss=4.0),
               *[dict(loss=None, grad_norm=0.0, had_gradient=False)] * 5, dict(loss=-0.5)]
    assert feed(DivergenceGuard(), updates) == [None] * len(updates)


def test_guard_stops_on_non_finite_weights_at_once():
    assert feed(DivergenceGuard(), [dict(loss=1.0), dict(loss=1.0, skipped=True, weights_finite=False)]) == [
        None, "the weights hold NaN or inf after this update"]


def test_guard_stops_after_three_skipped_updates_in_a_row():
    got = feed(DivergenceGuard(), [dict(loss=1.0), *[dict(loss=math.nan, skipped=True)] * 3])
    assert got[:3] == [None, None, None] and "3 updates in a row had a non-finite" in got[3]


def test_guard_stops_when_the_gradient_is_exactly_zero_three_times_in_a_row():
    """lr 1e3 left tiny SFT at ln(512) = 6.2383 with a gradient of exactly 0 for 35 steps."""
    got = feed(DivergenceGuard(), [dict(loss=6.25), *[dict(loss=6.2383, grad_norm=0.0)] * 3])
    assert got[:3] == [None, None, None] and "exactly 0 in 3 updates" in got[3]


def test_guard_stops_when_the_loss_grows_a_thousandfold():
    """SFT at lr 1e3: 6.256 -> 2.379e5. The scale is max(|first loss|, 1), so losses that start
    near 0 (a DPO margin, a centred reward) may reach 1000 before it says so."""
    assert feed(DivergenceGuard(), [dict(loss=6.256), dict(loss=6.256e3)]) == [None, None]
    assert feed(DivergenceGuard(), [dict(loss=6.256), dict(loss=2.379e5)])[1] == "the loss went from 6.256 to 2.379e+05"
    assert feed(DivergenceGuard(), [dict(loss=0.001), dict(loss=999.0)]) == [None, None]
    assert feed(DivergenceGuard(), [dict(loss=0.001), dict(loss=1001.0)])[1] is not None


# Small tiny-model runs of each stage, evaluation off; the recipes' own settings otherwise.
STAGES = {
    "sft": ["sft", "--recipe", "tiny", "--run.steps", "12", "--eval.gold-prompts", "0", "--eval.no-at-start",
            "--data.world-examples", "200", "--batch.micro-batch-size", "8"],
    "rm": ["rm", "--recipe", "tiny", "--model.name", "tiny", "--data.responses", "candidates", "--run.steps", "12",
           "--data.world-prompts", "64", "--data.world-eval-prompts", "0", "--batch.micro-batch-size", "4"],
    "dpo": ["dpo", "--recipe", "tiny", "--model.name", "tiny", "--data.responses", "candidates",
            "--data.world-prompts", "40", "--data.world-eval-prompts", "0", "--run.steps", "12",
            "--eval.gold-prompts", "0", "--eval.no-at-start", "--batch.micro-batch-size", "4"],
    "ppo": ["ppo", "--recipe", "tiny", "--model.name", "tiny", "--reward", "gold", "--run.steps", "6",
            "--eval.gold-prompts", "0", "--eval.no-at-start", "--algo.prompts-per-step", "8",
            "--algo.minibatch-size", "4", "--algo.max-new-tokens", "8"],
    "grpo": ["grpo", "--recipe", "tiny", "--model.name", "tiny", "--reward", "gold", "--run.steps", "6",
             "--eval.gold-prompts", "0", "--eval.no-at-start", "--algo.prompts-per-step", "4",
             "--algo.max-new-tokens", "8"],
}


def assert_nothing_saved_as_finished(out: Path) -> None:
    """No completion marker, no model, and checkpoints (of steps before the breakdown was seen)
    only with finite weights."""
    assert not (out / "complete.json").exists() and not (out / "model.safetensors").exists()
    for checkpoint in out.glob("checkpoints/step-*"):
        for name, tensor in load_file(checkpoint / "trainable.safetensors").items():
            assert torch.isfinite(tensor).all(), (checkpoint, name)


# lr 1e3 blows the loss up (or saturates the model); lr 1e39 is inf in fp32, so the first update
# leaves inf/NaN weights, and a one-step run must still not save them.
CASES = [("sft", "1e3", "12"), ("rm", "1e3", "12"), ("dpo", "1e3", "12"), ("ppo", "1e3", "6"), ("grpo", "1e3", "6"),
         ("sft", "1e39", "1"), ("dpo", "1e39", "12"), ("ppo", "1e39", "1")]


@pytest.mark.parametrize(("stage", "lr", "steps"), CASES)
def test_a_diverged_run_stops_with_a_clear_error_and_saves_nothing_as_finished(stage, lr, steps, tmp_path, capsys):
    out = tmp_path / stage
    err = refused([*STAGES[stage], "--optim.lr", lr, "--run.steps", steps, "--run.save-every", "2",
                   "--run.out", str(out)], capsys)
    assert f"{out}: training diverged at step" in err and "lower --optim.lr" in err, err
    assert_nothing_saved_as_finished(out)
    if "metrics so far" in err:
        assert (out / "metrics.jsonl").exists()  # kept, to see what happened


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_settings_are_refused_before_any_work(value, tmp_path, capsys):
    err = refused([*STAGES["sft"], "--optim.lr", value, "--run.out", str(tmp_path / "sft")], capsys)
    assert f"optim.lr must be a finite number, got {float(value)}" in err
    err = refused([*STAGES["ppo"], "--algo.kl-coef", value, "--run.out", str(tmp_path / "ppo")], capsys)
    assert "algo.kl_coef must be a finite number" in err
    err = refused(["run", "tiny", "--runs-dir", str(tmp_path / "runs"), "--set", f"rm.optim.max_grad_norm={value}"], capsys)
    assert "recipe tiny: rm.optim.max_grad_norm must be a finite number" in err, err
    assert not list(tmp_path.iterdir())
