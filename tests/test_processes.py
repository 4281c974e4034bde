"""N processes == 1 process: each training stage on 2 gloo processes (torchrun) with grad
accumulation 1 gives the losses, gradient norms and weights of 1 process accumulating 2
micro-batches (the same global batch)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# Small runs, evaluation off; every stage's global batch is 2 micro-batches.
STAGES = {
    "sft": ["sft", "--recipe", "tiny", "--run.steps", "8", "--eval.gold-prompts", "0", "--eval.no-at-start",
            "--data.world-examples", "200", "--batch.micro-batch-size", "4"],
    # The random tiny backbone on world candidates (no sampling), with held-out rankings: the main
    # process writes the rankings cache the other reads, and evaluates alone.
    "rm": ["rm", "--recipe", "tiny", "--model.name", "tiny", "--data.responses", "candidates", "--run.steps", "8",
           "--data.world-prompts", "64", "--data.world-eval-prompts", "8", "--batch.micro-batch-size", "4"],
    # Reference logprobs are computed once by the main process and read by the other.
    "dpo": ["dpo", "--recipe", "tiny", "--model.name", "tiny", "--data.responses", "candidates",
            "--data.world-prompts", "40", "--data.world-eval-prompts", "8", "--run.steps", "8",
            "--eval.gold-prompts", "0", "--eval.no-at-start", "--batch.micro-batch-size", "4"],
}
LOSS = {"sft": "train/loss", "rm": "train/loss", "dpo": "dpo/loss"}
GRAD_NORM = {"sft": "train/grad_norm", "rm": "train/grad_norm", "dpo": "dpo/grad_norm"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(free_port())]
    return subprocess.run([sys.executable, *(launcher if processes > 1 else []), "-m", "rlhfkit.cli", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def rows(out: Path, key: str) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_two_processes_match_one_process_with_accumulation(stage, tmp_path):
    """Tolerances: the only difference is the order of float additions in the all-reduce (and in
    the reduction of logged sums), which 8 Adam steps amplify only slightly: 1e-4 relative on every
    step's loss and gradient norm, and on the weights 1e-4 relative plus an absolute 1e-3 of the
    weights' largest magnitude (Adam steps elements with near-cancelling gradients by up to lr)."""
    one = run([*STAGES[stage], "--batch.grad-accum", "2", "--run.out", str(tmp_path / "one")], processes=1)
    assert one.returncode == 0, one.stdout + one.stderr
    two = run([*STAGES[stage], "--batch.grad-accum", "1", "--run.out", str(tmp_path / "two")], processes=2)
    assert two.returncode == 0, two.stdout + two.stderr
    losses = [rows(tmp_path / d, LOSS[stage]) for d in ("one", "two")]
    assert len(losses[0]) == 8
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)  # same weights, same data: same first loss
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    # Adam hides a gradient scale error from the losses; the gradient norm does not.
    norms = [rows(tmp_path / d, GRAD_NORM[stage]) for d in ("one", "two")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-3 * float(a[key].abs().max()), msg=key)
