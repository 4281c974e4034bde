"""The PPO stage on the tiny model: the analytic anchors at step 1 and a learning test."""

import json
from pathlib import Path

import pytest

from rlhfkit.cli import parse
from rlhfkit.train import ppo, sft


def short_answer(prompts, responses):
    """A reward the tiny policy can visibly learn in seconds: 1 for answers of <= 2 characters."""
    return [1.0 if len(r.strip()) <= 2 else 0.0 for r in responses]


def ppo_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "ppo/score" in r]


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ppo") / "sft"
    return sft.train(parse("sft", ["--recipe", "tiny", "--run.steps", "80", "--eval.gold-prompts", "0",
                                   "--eval.no-at-start", "--run.out", str(out)]))


def run_ppo(tiny_sft: Path, out: Path, *flags: str) -> list[dict]:
    args = ["--recipe", "tiny", "--model.name", str(tiny_sft), "--reward", "test_ppo:short_answer",
            "--eval.gold-prompts", "0", "--eval.no-at-start", "--run.out", str(out), *flags]
    return ppo_rows(ppo.train(parse("ppo", args)))


def test_first_step_has_zero_kl_and_unit_ratio(tiny_sft, tmp_path):
    """Before any update the policy is the reference (KL exactly 0) and the recomputed logprobs
    equal the rollout's (ratio 1 on the first minibatch)."""
    first = run_ppo(tiny_sft, tmp_path / "ppo", "--run.steps", "1")[0]
    assert first["ppo/kl"] == 0.0
    assert first["ppo/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < first["ppo/eos_fraction"] <= 1 and first["ppo/response_tokens"] > 0


def test_ppo_raises_its_reward(tiny_sft, tmp_path):
    rows = run_ppo(tiny_sft, tmp_path / "ppo", "--run.steps", "20", "--optim.lr", "1e-4")
    first, last = [r["ppo/score"] for r in rows[:5]], [r["ppo/score"] for r in rows[-5:]]
    assert sum(last) / 5 > sum(first) / 5 + 0.15, (first, last)
    assert rows[-1]["ppo/kl"] > 0  # it moved away from the reference, and the penalty saw it
