"""kill -9 in the middle of a stage, then --run.resume: the final weights equal an uninterrupted
run's (CPU, fp32, same seed), and metrics.jsonl describes one trajectory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# Small and fast, saving every 4 steps; evaluation off so the run is pure training. Every stage
# is also killed and resumed on 2 processes (tests/test_processes.py, to within float noise of
# one process); here, in one process, the resumed weights must be bit for bit the uninterrupted
# ones, for the stage with the richest state: PPO from the random tiny model with the gold judge
# as reward (policy, value model, optimizer, KL controller, EMA weights, PPO-ptx data position,
# per-step sampling seeds).
STAGES = {
    "ppo": ["ppo", "--recipe", "tiny", "--model.name", "tiny", "--reward", "gold", "--algo.kl-target", "1.0",
            "--algo.ema-decay", "0.8", "--algo.ptx-coef", "0.1",
            "--run.steps", "16", "--run.save-every", "4", "--eval.gold-prompts", "0", "--eval.no-at-start",
            "--algo.prompts-per-step", "8", "--algo.minibatch-size", "4", "--algo.max-new-tokens", "8"],
}
# Where each stage's checkpoints appear, and the step to kill after.
KILL_AFTER: dict[str, tuple[str, int]] = {}


def run_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(out: Path) -> list[float]:
    """The per-step training signal: train/loss (SFT, RM) or the PPO score, KL and KL coefficient."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("train/loss", "ppo/score", "ppo/kl", "ppo/kl_coef", "ppo/pg_loss", "ppo/ptx_loss", "dpo/loss",
            "grpo/reward", "grpo/kl", "online/reward_mean")
    return [[r[k] for k in keys if k in r] for r in rows if any(k in r for k in keys)]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_kill9_then_resume_gives_identical_weights(stage, tmp_path):
    args = STAGES[stage]
    straight = run_cli([*args, "--run.out", str(tmp_path / "straight")])
    interrupted = run_cli([*args, "--run.out", str(tmp_path / "killed")])
    where, after = KILL_AFTER.get(stage, ("checkpoints", 8))
    ckpts = tmp_path / "killed" / where
    deadline = time.time() + 180
    while not [p for p in ckpts.glob("step-*") if int(p.name.split("-")[1]) >= after]:
        assert interrupted.poll() is None, interrupted.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    assert not (tmp_path / "killed" / "complete.json").exists(), "the run finished before the kill"
    resumed = run_cli([*args, "--run.out", str(tmp_path / "killed"), "--run.resume"])
    out_resumed, _ = resumed.communicate(timeout=300)
    out_straight, _ = straight.communicate(timeout=300)
    assert resumed.returncode == 0, out_resumed
    assert straight.returncode == 0, out_straight
    assert "resumed from" in out_resumed
    for weights in ("model.safetensors", "ema/model.safetensors"):
        if not (tmp_path / "straight" / weights).exists():
            continue
        a = load_file(tmp_path / "straight" / weights)
        b = load_file(tmp_path / "killed" / weights)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (weights, key)
    if stage == "ppo":
        assert (tmp_path / "killed" / "ema" / "model.safetensors").exists()
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
