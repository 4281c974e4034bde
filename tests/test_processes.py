"""N processes == 1 process, through a kill -9: each training stage on 2 gloo processes
(torchrun), killed with SIGKILL after a checkpoint and resumed, gives the per-step losses, gradient
norms and final weights of 1 uninterrupted process accumulating the same global batch. So do
stages sharded by FSDP2 (launched as accelerate's shipped config file or its environment under
torchrun), LoRA included, and by DeepSpeed ZeRO-2/3 where DeepSpeed is installed."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def length_reward(prompts, responses):
    """A reward with a different value for nearly every answer of the random tiny model."""
    return [-abs(len(r) - 12) / 12 for r in responses]


RL = ["--model.name", "tiny", "--model.precision", "fp32", "--reward", "test_processes:length_reward",
      "--world-prompts", "40", "--eval.gold-prompts", "0", "--eval.no-at-start", "--algo.max-new-tokens", "10"]
# Small runs, evaluation off, a checkpoint every 2 steps; (arguments, flags of the 1-process run,
# flags of the 2-process run) with the same global batch.
STAGES = {
    "sft": (["sft", "--recipe", "tiny", "--model.precision", "fp32", "--run.steps", "6", "--eval.gold-prompts", "0", "--eval.no-at-start",
             "--data.world-examples", "200", "--batch.micro-batch-size", "4"],
            ["--batch.grad-accum", "2"], ["--batch.grad-accum", "1"]),
    # The random tiny backbone, on rankings of its own samples and world candidates, with held-out
    # rankings: each process samples its share, the main process writes the rankings, and
    # evaluates alone.
    "rm": (["rm", "--recipe", "tiny", "--model.name", "tiny", "--model.precision", "fp32", "--data.responses", "mixed",
            "--data.max-new-tokens", "10", "--run.steps", "6", "--data.world-prompts", "32",
            "--data.world-eval-prompts", "8", "--batch.micro-batch-size", "4"],
           ["--batch.grad-accum", "2"], ["--batch.grad-accum", "1"]),
    # Pairs from the policy's own samples (each process samples its share); the reference
    # logprobs' batches are split across the processes, gathered, and saved by the main one.
    "dpo": (["dpo", "--recipe", "tiny", "--model.name", "tiny", "--model.precision", "fp32", "--data.responses",
             "policy", "--data.max-new-tokens", "10", "--data.world-prompts", "40", "--data.world-eval-prompts", "8",
             "--run.steps", "6",
             "--eval.gold-prompts", "0", "--eval.no-at-start", "--batch.micro-batch-size", "4"],
            ["--batch.grad-accum", "2"], ["--batch.grad-accum", "1"]),
    # Each process samples half of each step's groups (one seed per answer) and the update sums both.
    # With a KL term: a frozen reference on each process.
    "grpo": (["grpo", "--recipe", "tiny", *RL, "--run.steps", "8", "--algo.prompts-per-step", "4",
              "--algo.group-size", "2", "--algo.micro-batch-size", "2", "--algo.kl-coef", "0.05",
              "--optim.lr", "1e-3"], [], []),
    # Each process rolls out half of each step's prompts; advantages are whitened over both halves
    # and each minibatch takes rows of both. The state to restore also holds the adaptive KL
    # coefficient, the EMA weights and PPO-ptx's data position.
    "ppo": (["ppo", "--recipe", "tiny", *RL, "--run.steps", "8", "--algo.prompts-per-step", "4",
             "--algo.minibatch-size", "2", "--algo.epochs", "2", "--optim.lr", "1e-3", "--algo.kl-target", "1.0",
             "--algo.ema-decay", "0.8", "--algo.ptx-coef", "0.1"],
            ["--algo.grad-accum", "2"], ["--algo.grad-accum", "1"]),
    # Each process samples and scores half of a round's prompts; the round's DPO runs on both.
    # Killed inside round 2: round 1 is skipped on resume, round 2 resumes from its checkpoint.
    "online-dpo": (["online-dpo", "--recipe", "tiny", "--model.name", "tiny", "--model.precision", "fp32",
                    "--reward", "test_processes:length_reward", "--online.prompts-per-iteration", "8",
                    "--online.max-new-tokens", "10", "--online.iterations", "2", "--run.steps", "4",
                    "--eval.gold-prompts", "0", "--eval.no-at-start", "--batch.micro-batch-size", "2"],
                   ["--batch.grad-accum", "2"], ["--batch.grad-accum", "1"]),
}
# PPO with LoRA (the reference is the policy with its adapters off, the critic has adapters too)
# and gradient checkpointing.
STAGES["ppo-lora"] = ([*STAGES["ppo"][0], "--model.lora", "--model.lora-r", "4", "--model.gradient-checkpointing", "--run.steps", "4"], *STAGES["ppo"][1:])
KILL_IN = {"online-dpo": "iter_2/checkpoints"}  # where the checkpoint to kill after appears
# Flags of the 2-process run alone: under ZeRO-3 the main process generates alone (the gold
# evaluation, several batches) on the gathered weights while the others wait; with DeepSpeed's
# per-module hooks on, it would free and re-gather weights alone, and the run would hang.
TWO_ONLY = {("sft", "accelerate-zero3"): ["--eval.gold-prompts", "32"]}
LOSSES = ("train/loss", "train/grad_norm", "dpo/loss", "dpo/grad_norm", "grpo/reward", "grpo/grad_norm",
          "grpo/kl", "ppo/score", "ppo/kl", "ppo/kl_coef", "ppo/pg_loss", "ppo/vf_loss", "ppo/ptx_loss",
          "ppo/explained_variance",
          "online/reward_mean", "online/pairs")
WEIGHTS = ("model.safetensors", "value_model/model.safetensors", "ema/model.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How the 2 processes are launched: torchrun (DDP); torchrun with the environment accelerate's FSDP2
# config sets; accelerate launch with the shipped FSDP2 config file.
LAUNCHERS = {
    "ddp": (["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "{port}"], {}),
    "fsdp": (["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "{port}"],
             {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),
    "accelerate-fsdp": (["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp2.yaml"),
                         "--num_processes", "2", "--main_process_port", "{port}"], {}),
    "zero2": (["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "{port}"],
              {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
    "accelerate-zero3": (["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/zero3.yaml"),
                          "--num_processes", "2", "--main_process_port", "{port}"], {}),
}
SAYS = {"ddp": None, "fsdp": "FSDP2: each of 2 processes holds 1/2", "accelerate-fsdp": "FSDP2: each of 2 processes holds 1/2",
        "zero2": "DeepSpeed ZeRO-2: each of 2 processes", "accelerate-zero3": "DeepSpeed ZeRO-3: each of 2 processes"}


def start(args: list[str], processes: int, launch: str = "ddp") -> subprocess.Popen:
    launcher, extra = LAUNCHERS[launch]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1", **extra}
    launcher = [a.format(port=free_port()) for a in launcher] if processes > 1 else []
    return subprocess.Popen([sys.executable, *launcher, "-m", "rlhfkit.cli", *args],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill9_tree(process: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every worker (torchrun starts its workers in sessions of their
    own, so its process group does not reach them)."""
    import psutil  # accelerate's dependency

    tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    for pid in tree[1:]:  # the workers are not our children: wait until they are gone
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=30)


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    return out


def steps(out: Path) -> list[dict[str, float]]:
    """The stage's per-step signals, and those of its rounds (online DPO's iter_*)."""
    rows = [json.loads(line) for path in sorted(out.glob("**/metrics.jsonl")) for line in path.read_text().splitlines()]
    return [{k: r[k] for k in LOSSES if k in r} for r in rows if any(k in r for k in LOSSES)]


ONE_PROCESS: dict[str, Path] = {}  # stage -> its 1-process run, shared by the DDP and FSDP cases


def one_process_run(stage: str, tmp_path_factory) -> Path:
    if stage not in ONE_PROCESS:
        args, one_flags, _ = STAGES[stage]
        out = tmp_path_factory.mktemp(f"one-{stage}") / "one"
        main([*args, "--run.save-every", "2", *one_flags, "--run.out", str(out)])  # 1 process: this one
        ONE_PROCESS[stage] = out
    return ONE_PROCESS[stage]


CASES = [*((stage, "ddp") for stage in sorted(STAGES) if stage != "ppo-lora"),
         ("sft", "accelerate-fsdp"), ("dpo", "fsdp"), ("grpo", "fsdp"), ("ppo-lora", "fsdp"),
         ("sft", "accelerate-zero3"), ("rm", "zero2"), ("rm", "accelerate-zero3"), ("dpo", "zero2"), ("grpo", "accelerate-zero3"),
         ("ppo", "accelerate-zero3"), ("ppo-lora", "accelerate-zero3")]  # DeepSpeed: where installed (rlhfkit[deepspeed])


@pytest.mark.parametrize("stage,launch", CASES)
def test_two_processes_killed_and_resumed_match_one_process(stage, launch, tmp_path, tmp_path_factory, capsys):
    """Tolerances: the only difference is the order of float additions in the all-reduce (and in
    the reduction of logged sums), which a few Adam steps amplify only slightly: 1e-4 relative on
    every step's losses and gradient norms, and on the weights 1e-4 relative plus an absolute 1e-3
    of the weights' largest magnitude (Adam steps elements with near-cancelling gradients by up to
    lr). A resume that lost or replayed any state (data position, optimizer, sampling seeds,
    checkpoint of the other process) changes the steps after the kill far beyond these. FSDP
    reduce-scatters where DDP all-reduces: the same sums, in another order."""
    if "zero" in launch:
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install 'rlhfkit[deepspeed]'")
    args, _, two_flags = STAGES[stage]
    args = [*args, "--run.save-every", "2"]
    one_dir = one_process_run(stage, tmp_path_factory)

    two = [*args, *two_flags, *TWO_ONLY.get((stage, launch), []), "--run.out", str(tmp_path / "two")]
    killed = start(two, 2, launch)
    deadline = time.time() + 240
    while not list((tmp_path / "two" / KILL_IN.get(stage, "checkpoints")).glob("step-*")):
        assert killed.poll() is None, killed.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    kill9_tree(killed)
    assert not (tmp_path / "two" / "complete.json").exists(), "the run finished before the kill"
    said = finish(start([*two, "--run.resume"], 2, launch))
    assert "resumed from" in said
    for says in {s for s in SAYS.values() if s}:  # what this launch says it does, and nothing else
        assert (says in said) == (says == SAYS[launch]), said


    one, resumed = steps(one_dir), steps(tmp_path / "two")
    assert len(one) == len(resumed) and one[0], (one, resumed)
    for a, b in zip(one, resumed):
        assert a.keys() == b.keys()
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), (a, b)
    for weights in WEIGHTS:
        if not (one_dir / weights).exists():
            continue
        a, b = (load_file(d / weights) for d in (one_dir, tmp_path / "two"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-3 * float(a[key].abs().max()), msg=key)

    if stage == "sft" and launch != "ddp":  # a checkpoint of 2 sharded processes resumes on 1 unsharded
        copy = tmp_path / "copy"
        shutil.copytree(tmp_path / "two", copy)
        (copy / "complete.json").unlink()
        main([*two, "--run.out", str(copy), "--run.resume"])
        assert "resumed from" in capsys.readouterr().out and (copy / "complete.json").exists()


def test_sampling_commands_on_two_processes_write_what_one_process_writes(tmp_path):
    """best-of-N and eval split their prompts across 2 processes (one seed per answer) and the main
    process writes the file: the same answers, rewards and verdicts as one process writes."""
    sample = ["--model", "tiny", "--temperature", "1.0", "--max-new-tokens", "10", "--precision", "fp32",
              "--batch-size", "4"]
    for processes in (1, 2):
        folder = tmp_path / str(processes)
        bon = ["bon", *sample, "--reward", "test_processes:length_reward", "--samples", "3", "--num-prompts", "7",
               "--out", str(folder / "bon.jsonl")]
        evaluate = ["eval", *sample, "--against", "tiny", "--n-prompts", "7", "--seed", "1",
                    "--out", str(folder / "eval.json")]
        for command in (bon, evaluate):
            main(command) if processes == 1 else finish(start(command, processes))
        assert sorted(p.name for p in folder.iterdir()) == ["bon.jsonl", "eval.json"]  # no partial files left
    one, two = ([json.loads(line) for line in (tmp_path / d / "bon.jsonl").read_text().splitlines()] for d in "12")
    assert len(one) == 7 and one == two
    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "12")
    assert one["records"] == two["records"] and one["win_rate"] == two["win_rate"]


def test_process_shares_cover_every_item_once(monkeypatch):
    from rlhfkit import processes

    for size in range(1, 5):
        for n in range(10):
            shares = []
            for rank in range(size):
                monkeypatch.setattr(processes, "rank_and_size", lambda: (rank, size))
                shares += list(range(n))[processes.share(n)]
            assert shares == list(range(n)), (size, n)


def test_the_main_process_can_go_on_alone(tmp_path):
    """``continue_alone``: the others leave the process group; the main process then runs as one
    process (its barriers return at once) instead of keeping them waiting. And the group waits
    ``RLHFKIT_PROCESS_TIMEOUT_MINUTES`` at a collective (the main process evaluates alone)."""
    script = tmp_path / "alone.py"
    script.write_text("""
from datetime import timedelta
import torch, torch.distributed as dist
from rlhfkit import processes
rank, size = processes.rank_and_size()
group = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
assert group.options._timeout == timedelta(minutes=7), group.options._timeout  # RLHFKIT_PROCESS_TIMEOUT_MINUTES
assert processes.broadcast(f"from {rank}") == "from 0"
alone = processes.continue_alone()
assert alone == (rank == 0)
if alone:
    processes.wait_for_everyone()  # no one else to wait for
    assert processes.rank_and_size() == (0, 1) and processes.share(5) == slice(0, 5)
    print("main alone")
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "RLHFKIT_PROCESS_TIMEOUT_MINUTES": "7"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("main alone") == 1, done.stdout + done.stderr


@pytest.mark.slow
def test_the_pipeline_runs_on_two_processes(tmp_path):
    """`rlhfkit run tiny` under torchrun: every stage trains on both processes, the main one
    evaluates and reports; a rerun finds every stage complete. (~2.5 min here: run by hand.)"""
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = ["-m", "rlhfkit.cli", "run", "tiny", "--runs-dir", str(tmp_path), "--name", "two"]
    for attempt in (1, 2):
        done = subprocess.run([sys.executable, *launcher, str(free_port()), *command], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "two"
    assert all((run / stage / "complete.json").exists() for stage in ("sft", "labels", "rm", "ppo", "eval"))
    assert (run / "report.html").exists() and json.loads((run / "eval" / "eval.json").read_text())["win_rates"]
    assert done.stdout.count("already complete") == 5, done.stdout  # the rerun: printed once, by the main process


@pytest.mark.parametrize("command", [["serve", "--model", "tiny"], ["sample", "--model", "tiny"], ["world", "export"]])
def test_one_process_commands_refuse_several(command, monkeypatch, capsys):
    """Servers and file tools have no share of work for other processes: under torchrun every
    process would run the whole command (two servers on one port, the same file written twice)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as stopped:
        main(command)
    assert stopped.value.code == 2
    assert "runs in one process: launch it without torchrun" in capsys.readouterr().err


def test_processes_wait_an_hour_for_the_main_one_by_default(monkeypatch):
    """The main process evaluates alone during training; NCCL's own 10 minutes would end a run
    whose evaluation takes longer."""
    from datetime import timedelta

    from rlhfkit import processes

    monkeypatch.delenv("RLHFKIT_PROCESS_TIMEOUT_MINUTES", raising=False)
    assert processes.timeout() == timedelta(hours=1)
    monkeypatch.setenv("RLHFKIT_PROCESS_TIMEOUT_MINUTES", "180")
    assert processes.timeout() == timedelta(hours=3)
    from rlhfkit.errors import RlhfkitError

    for bad in ("an hour", "0", "-5"):
        monkeypatch.setenv("RLHFKIT_PROCESS_TIMEOUT_MINUTES", bad)
        with pytest.raises(RlhfkitError, match=f"RLHFKIT_PROCESS_TIMEOUT_MINUTES='{bad}'"):
            processes.timeout()
