"""PPO: rlhfkit's trainer vs TRL's PPOTrainer, same models, same prompts, same hyperparameters.

The peer is ``trl.experimental.ppo.PPOTrainer`` from TRL 1.12.0: the newest release that still
ships a PPO trainer (it moved from ``trl.trainer`` to ``trl.experimental.ppo`` in 0.26, the
top-level alias went in 0.29, and 1.13.0 dropped it; 1.13-1.16 have none). It runs in its own
virtual environment,
``bench/.venv-trl-ppo`` (created on first use: torch 2.13.0, trl 1.12.0, and the transformers,
accelerate and datasets versions of this environment, so both sides run the same model code),
as one subprocess; rlhfkit runs in this Python as another, one after the other.

    python bench/ppo.py --model tiny --steps 3                       # smoke test (~1 min)
    OMP_NUM_THREADS=1 taskset -c 1 python bench/ppo.py --model tiny --steps 3
    python bench/ppo.py --model smollm2-135m-instruct --steps 4 --precision bf16
    python bench/ppo.py --model PATH --reward RM_FOLDER --steps 10 --prompts-per-step 32 --minibatch-size 8

Both sides get: the same policy folder (initial weights; also the frozen reference), the same
reward model folder, the same value-model initialisation (rlhfkit initialises it from the reward
model; TRL is handed a second copy of the same folder), the same prompt token ids (rendered by
rlhfkit's chat template; ``steps x prompts-per-step`` world prompts, so each side samples each
prompt exactly once, in its own order), prompts per step, minibatch size (one optimizer step per
minibatch), PPO epochs, max new tokens, temperature 1.0, KL coefficient (k1, fixed), clip ranges,
vf coefficient, gamma, lambda, lr (constant, AdamW, no weight decay), number of PPO steps and
precision. Without ``--reward`` the reward model is the policy's backbone with a fresh scalar head
(seeded): meaningless as a judge, but the same on both sides, which is what a speed comparison
needs. A reward model trained by ``rlhfkit rm`` stores a reference mean that rlhfkit subtracts;
the TRL side gets that mean folded into the heads' bias, so both see the same scores and values.

Reported per side: samples/s (rollouts per second over the PPO steps: the sum of each step's
wall time from fetching its prompts to its metrics, so model loading, the final save and
between-step logging/checkpointing are excluded), the process CPU seconds over the same spans
(all threads: with one thread, a measure of the work that a busy machine disturbs less), peak
RSS (``getrusage``, whole process), the mean reward-model score of the first and last step (each
side's own, and both sides' rollouts scored by one scorer, rlhfkit's ``RewardModel``) and the
last step's KL, so speed is never bought with wrong math, and mean response tokens and EOS
fraction (generation work); then ours/TRL ratios. What could not be made the same is printed
under "differences". Exits non-zero when a side fails.

Run on a quiet machine; the sides share it one after the other. Temporary models, prompts and
run folders live in a temp dir removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-trl-ppo"
TRL_VERSION = "1.12.0"  # the newest TRL with a PPO trainer (trl.experimental.ppo); 1.13.0 removed it
TORCH_VERSION = "2.13.0"  # never another: other versions pull gigabytes of CUDA wheels
MEAN_KEY = "rlhfkit_reward_mean"  # rlhfkit.reward.MEAN_KEY (no rlhfkit import in the TRL worker)

# Hyperparameters the CLI does not expose; both sides get exactly these.
FIXED = dict(temperature=1.0, kl_coef=0.05, clip=0.2, value_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, seed=0)


# --- the parent: build the shared inputs, run both sides, compare ---------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2-135m-instruct or a local model folder")
    p.add_argument("--reward", default="", help="reward-model folder (default: the policy backbone with a fresh head)")
    p.add_argument("--steps", type=int, default=3, help="PPO steps (rollout + update iterations)")
    p.add_argument("--prompts-per-step", type=int, default=16, help="rollouts per PPO step")
    p.add_argument("--minibatch-size", type=int, default=8, help="rollouts per optimizer step")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs over each step's rollouts")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--sides", nargs="+", choices=["rlhfkit", "trl"], default=["rlhfkit", "trl"],
                   help="run only some sides (a ratio needs both)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (models, prompts, logs, run folders)")
    # Internal: a side's worker process.
    p.add_argument("--worker", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        if args.prompts_per_step % args.minibatch_size:
            p.error("--prompts-per-step must be a multiple of --minibatch-size")
        if min(args.steps, args.prompts_per_step, args.minibatch_size, args.epochs, args.max_new_tokens) < 1:
            p.error("--steps, --prompts-per-step, --minibatch-size, --epochs, --max-new-tokens must be positive")
    return args


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_trl_venv() -> Path:
    """The TRL venv, created (or re-created when its pins changed) on first use."""
    import importlib.metadata as md

    pins = [f"torch=={TORCH_VERSION}", f"trl=={TRL_VERSION}"] + [
        f"{name}=={md.version(name)}" for name in ("transformers", "accelerate", "datasets")]
    marker = VENV / "bench-pins.txt"
    if venv_python().exists() and marker.exists() and marker.read_text().split() == pins:
        return venv_python()
    print(f"creating {VENV.relative_to(HERE.parent)}: {' '.join(pins)} (once, a few minutes)", flush=True)
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
                   check=True)
    marker.write_text("\n".join(pins) + "\n")
    return venv_python()


def prepare(args, tmp: Path) -> dict:
    """Policy folder, reward folder and prompt token ids, shared by both sides."""
    import torch
    from transformers.utils import logging as transformers_logging

    from rlhfkit.data.tokenize import end_of_turn_id, prompt_ids
    from rlhfkit.data.world import World, prompt_to_dict
    from rlhfkit.models import TINY, build_tiny_model, build_tiny_tokenizer, load_tokenizer, resolve
    from rlhfkit.reward import MEAN_KEY as RLHFKIT_MEAN_KEY
    from rlhfkit.reward import STD_KEY, build_reward_model

    assert RLHFKIT_MEAN_KEY == MEAN_KEY
    transformers_logging.disable_progress_bar()
    if args.model == TINY:
        policy = tmp / "policy"
        tokenizer = build_tiny_tokenizer()
        build_tiny_model(tokenizer, seed=0).save_pretrained(policy)
        tokenizer.save_pretrained(policy)
    else:
        policy = Path(resolve(args.model))
    tokenizer = load_tokenizer(str(policy))  # what rlhfkit will load: pad token distinct from EOS
    if args.reward:
        reward = Path(args.reward)
    else:  # the policy backbone with a seeded fresh head; mean 0 stored, so rlhfkit keeps the head for the value model
        reward = tmp / "reward"
        rm = build_reward_model(str(policy), tokenizer, seed=1)
        setattr(rm.config, MEAN_KEY, 0.0)
        setattr(rm.config, STD_KEY, 1.0)
        rm.save_pretrained(reward)
        tokenizer.save_pretrained(reward)
        del rm
    config = json.loads((reward / "config.json").read_text())
    n = args.steps * args.prompts_per_step
    prompts = World(seed=0).prompts(n, "train")
    prompts_file = tmp / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(prompt_to_dict(p)) + "\n" for p in prompts))
    stop = sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None})
    return dict(
        policy=str(policy), reward=str(reward), reward_mean=float(config.get(MEAN_KEY) or 0.0),
        prompts_file=str(prompts_file), prompt_ids=[prompt_ids(tokenizer, p.messages) for p in prompts],
        pad_token=tokenizer.pad_token, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        end_of_turn_id=end_of_turn_id(tokenizer), stop_ids=stop,
        steps=args.steps, prompts_per_step=args.prompts_per_step, minibatch_size=args.minibatch_size,
        epochs=args.epochs, max_new_tokens=args.max_new_tokens, lr=args.lr, device=args.device,
        precision=args.precision, fixed=FIXED, torch_threads=torch.get_num_threads(),
    )


def run_side(side: str, python: Path, spec_path: Path, tmp: Path) -> dict | None:
    """Run one side's worker; its result dict, or None (with its log's tail) when it failed."""
    result, log = tmp / f"{side}.result.json", tmp / f"{side}.log"
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    spec = json.loads(spec_path.read_text())
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", side, "--spec", str(spec_path),
           "--result", str(result)]
    print(f"running {side} ...", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp, check=False).returncode
    if rc != 0 or not result.exists():
        tail = log.read_text().splitlines()[-40:]
        print(f"{side} FAILED (exit {rc}); last lines of its log:\n" + "\n".join("  " + l for l in tail),
              file=sys.stderr)
        return None
    out = json.loads(result.read_text())
    print(f"  {side}: done in {time.perf_counter() - start:.1f} s (with loading)", flush=True)
    return out


def common_scores(spec: dict, results: dict[str, dict]) -> None:
    """Score both sides' first- and last-step rollouts with one scorer, rlhfkit's RewardModel
    (the reward-model input rlhfkit's PPO uses), so the two score levels are comparable; for the
    rlhfkit side this reproduces its own logged score."""
    from rlhfkit.data.world import prompt_from_dict
    from rlhfkit.reward import RewardModel

    prompts = [prompt_from_dict(json.loads(l)) for l in Path(spec["prompts_file"]).read_text().splitlines()]
    rm = None
    for out in results.values():
        rollouts = out.get("rollouts")
        if not rollouts or any(i < 0 for step in rollouts for i, _, _ in step):
            continue
        rm = rm or RewardModel.load(spec["reward"], precision=spec["precision"])
        for key, step in (("common_first", rollouts[0]), ("common_last", rollouts[-1])):
            scores = rm.score([prompts[i].messages for i, _, _ in step], [text for _, text, _ in step])
            out[key] = sum(scores) / len(scores)


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def report(spec: dict, results: dict[str, dict]) -> None:
    ours, theirs = results.get("rlhfkit"), results.get("trl")
    rows = [
        ("samples/s", "samples_per_s", ".2f", True),
        ("PPO loop s", "loop_s", ".1f", True),
        ("PPO loop CPU s", "loop_cpu_s", ".1f", True),
        ("peak RSS MiB", "peak_rss_mib", ".0f", True),
        ("score, first step", "score_first", ".4f", False),
        ("score, last step", "score_last", ".4f", False),
        ("  same scorer, first", "common_first", ".4f", False),
        ("  same scorer, last", "common_last", ".4f", False),
        ("KL, last step", "kl_last", ".4f", False),
        ("response tokens (mean)", "response_tokens", ".1f", True),
        ("EOS fraction", "eos_fraction", ".2f", False),
    ]
    names = ["rlhfkit", f"TRL {TRL_VERSION}", "ours/TRL"]
    print()
    print(f"PPO, {spec['steps']} steps x {spec['prompts_per_step']} prompts, minibatch {spec['minibatch_size']}, "
          f"{spec['epochs']} epochs, max {spec['max_new_tokens']} new tokens, {spec['precision']}, {spec['device']}, "
          f"torch threads {spec['torch_threads']}")
    print(f"{'':<24}{names[0]:>12}{names[1]:>14}{names[2]:>10}")
    for label, key, f, ratio in rows:
        a = ours.get(key) if ours else None
        b = theirs.get(key) if theirs else None
        r = fmt(a / b, ".2f") + "x" if ratio and a is not None and b else ""
        print(f"{label:<24}{fmt(a, f):>12}{fmt(b, f):>14}{r:>10}")


def differences(spec: dict) -> list[str]:
    notes = [
        "sampling: each side has its own RNG stream and prompt order (same prompts overall, each once), so "
        "responses, scores and KL agree only statistically",
        "rollout logprobs: TRL takes them from generate()'s logits (no extra forward); rlhfkit recomputes them "
        "with a teacher-forced forward (on the first epoch's minibatches)",
        "score placement: TRL adds the score at the token after EOS when it fits (sequence_length + 1) and its "
        "value mask runs one token past EOS; rlhfkit puts it on the EOS token and masks everything after it",
        "reward input: TRL scores the sampled token ids and, for a response that never ended, reads the reward "
        "at its last sampled token; rlhfkit decodes the response, re-tokenizes it and appends the end-of-turn "
        "token, so it always reads the reward there: when few responses end, the two sides' own score levels "
        "differ (the 'same scorer' rows compare like with like)",
        f"stop tokens: TRL stops at one stop_token_id ({spec['end_of_turn_id']}, the end-of-turn token) and treats "
        f"a sampled pad token ({spec['pad_token_id']}) as the end of a response; rlhfkit stops at "
        + (f"any of {spec['stop_ids']}" if len(spec["stop_ids"]) > 1 else "the same token")
        + " and ends responses only there (a sampled pad token is an ordinary token)",
        "missing_eos_penalty: off on both (rlhfkit replaces the score of an unfinished response with the penalty, "
        "TRL subtracts it: not the same function); rlhfkit's default is -1",
        "gradient clipping: TRL's PPO loop never clips; rlhfkit runs with --optim.max-grad-norm 0 (default 1.0)",
        "attention: rlhfkit trains with eager attention on CPU and decodes with sdpa; TRL uses the model's "
        "default (sdpa) throughout",
        "end of run: rlhfkit writes the final policy/value folders (not timed; no checkpoint at the last step); "
        "TRL saves nothing (save_strategy=no)",
    ]
    if spec["precision"] == "bf16":
        notes.append("bf16: TRL 1.12's PPOTrainer builds its Accelerator without mixed_precision, so its bf16 flag "
                     "does nothing under transformers 5; the bench sets ACCELERATE_MIXED_PRECISION=bf16 and wraps "
                     "train() in bf16 autocast (generation, reference, reward and value forwards too), as rlhfkit "
                     "autocasts all of them; weights stay fp32 on both sides")
    if spec["reward_mean"]:
        notes.append(f"reward mean {spec['reward_mean']:.4f}: rlhfkit subtracts it from scores and shifts the value "
                     "head by it; TRL gets it folded into the reward and value heads as a bias (same numbers)")
    return notes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        (rlhfkit_worker if args.worker == "rlhfkit" else trl_worker)(spec, Path(args.result))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
    python_trl = ensure_trl_venv() if "trl" in args.sides else None
    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    failed = False
    try:
        spec = prepare(args, tmp)
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        results: dict[str, dict] = {}
        for side in args.sides:
            out = run_side(side, Path(sys.executable) if side == "rlhfkit" else python_trl, spec_path, tmp)
            if out is None:
                failed = True
            else:
                results[side] = out
        common_scores(spec, results)
        report(spec, results)
        print("score: each side's own logged mean reward-model score of its rollouts; 'same scorer': both sides' "
              "rollouts scored by rlhfkit's RewardModel (response text + end-of-turn), comparable across sides")
        print("\ndifferences that could not be matched:")
        for note in differences(spec):
            print(f"- {note}")
    finally:
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


# --- the workers: one PPO run each, in their own process -------------------------------------


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rlhfkit_worker(spec: dict, result: Path) -> None:
    """``rlhfkit ppo`` through its own CLI entry point, in this process; step times and scores
    from the run's metrics.jsonl."""
    import rlhfkit.train.loop as rlhfkit_loop
    import rlhfkit.train.ppo as rlhfkit_ppo
    from rlhfkit.cli import main as rlhfkit_main
    from rlhfkit.data.records import messages_to_dicts

    # Next to the result file, in the bench's temp folder, whatever folder the worker runs in.
    fixed, out = spec["fixed"], result.parent / "rlhfkit-run"
    # Each step's rollouts (prompt index, response text, finished), for the common scorer.
    index = {json.dumps(json.loads(l)["prompt"]): i
             for i, l in enumerate(Path(spec["prompts_file"]).read_text().splitlines())}
    rollouts: list[list] = []
    generate = getattr(rlhfkit_ppo, "generate", None)

    # CPU seconds of each step: from its rollout's start to its bookkeeping (run.end_step).
    cpu_marks: list[float] = []

    class CpuMarks:
        def step_begin(self, step: int) -> None:
            pass

        def step_end(self, done: int) -> None:
            cpu_marks.append(time.process_time())

    rlhfkit_loop.STEP_TIMERS.append(CpuMarks())

    def recording_generate(model, tokenizer, prompts, *a, **kw):
        cpu_marks.append(time.process_time())
        gens = generate(model, tokenizer, prompts, *a, **kw)
        rollouts.append([[index.get(json.dumps(messages_to_dicts(p)), -1), g.text, g.finished]
                         for p, g in zip(prompts, gens)])
        return gens

    if generate is not None:
        rlhfkit_ppo.generate = recording_generate
    rlhfkit_main([
        "ppo", "--model.name", spec["policy"], "--model.precision", spec["precision"], "--reward", spec["reward"],
        "--prompts", spec["prompts_file"],
        "--algo.prompts-per-step", str(spec["prompts_per_step"]), "--algo.minibatch-size", str(spec["minibatch_size"]),
        "--algo.epochs", str(spec["epochs"]), "--algo.max-new-tokens", str(spec["max_new_tokens"]),
        "--algo.temperature", str(fixed["temperature"]), "--algo.kl-coef", str(fixed["kl_coef"]),
        "--algo.kl-target", "0", "--algo.kl-estimator", "k1", "--algo.clip", str(fixed["clip"]),
        "--algo.value-clip", str(fixed["value_clip"]), "--algo.vf-coef", str(fixed["vf_coef"]),
        "--algo.gamma", str(fixed["gamma"]), "--algo.lam", str(fixed["lam"]),
        "--algo.missing-eos-penalty", "0", "--algo.no-whiten-rewards", "--algo.ptx-coef", "0",
        "--algo.ema-decay", "0",
        "--optim.lr", str(spec["lr"]), "--optim.schedule", "constant", "--optim.warmup-steps", "0",
        "--optim.weight-decay", "0", "--optim.max-grad-norm", "0",
        "--run.out", str(out), "--run.steps", str(spec["steps"]), "--run.seed", str(fixed["seed"]),
        "--run.save-every", str(spec["steps"]), "--run.eval-every", "0", "--run.overwrite",
        "--eval.no-at-start", "--eval.samples", "0", "--eval.gold-prompts", "0",
    ])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "ppo/seconds_per_step" in r]
    if len(rows) != spec["steps"]:
        raise SystemExit(f"rlhfkit logged {len(rows)} PPO steps, expected {spec['steps']}")
    loop_s = sum(r["ppo/seconds_per_step"] for r in rows)
    result.write_text(json.dumps(dict(
        loop_s=loop_s, samples_per_s=spec["steps"] * spec["prompts_per_step"] / loop_s, peak_rss_mib=peak_rss_mib(),
        score_first=rows[0]["ppo/score"], score_last=rows[-1]["ppo/score"], kl_last=rows[-1]["ppo/kl"],
        response_tokens=sum(r["ppo/response_tokens"] for r in rows) / len(rows),
        eos_fraction=sum(r["ppo/eos_fraction"] for r in rows) / len(rows),
        loop_cpu_s=sum(cpu_marks[1::2]) - sum(cpu_marks[0::2]) if len(cpu_marks) == 2 * spec["steps"] else None,
        step_seconds=[r["ppo/seconds_per_step"] for r in rows],
        rollouts=rollouts if len(rollouts) == spec["steps"] else None,
    )))


def trl_worker(spec: dict, result: Path) -> None:
    """TRL's experimental PPOTrainer on the same folders and prompt ids (runs in the TRL venv:
    no rlhfkit import here)."""
    import contextlib

    if spec["precision"] == "bf16":  # see differences(): TRL's Accelerator would otherwise ignore bf16
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as transformers_logging
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    assert trl.__version__ == TRL_VERSION, trl.__version__
    transformers_logging.disable_progress_bar()
    fixed, bf16 = spec["fixed"], spec["precision"] == "bf16"
    device = "cuda" if spec["device"] == "cuda" else "cpu"

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")  # TRL needs left-padded queries
    tokenizer.pad_token = spec["pad_token"]  # rlhfkit's pad token (distinct from EOS)
    if tokenizer.pad_token_id != spec["pad_token_id"]:
        raise SystemExit(f"pad token id {tokenizer.pad_token_id} != rlhfkit's {spec['pad_token_id']}")

    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    if len(tokenizer) > policy.get_input_embeddings().weight.shape[0]:
        policy.resize_token_embeddings(len(tokenizer))
    policy.config.pad_token_id = policy.generation_config.pad_token_id = tokenizer.pad_token_id

    def scalar_model():
        """The reward folder as TRL's get_reward reads it: backbone + score(hidden) at the last
        real token; rlhfkit's stored reference mean folded in as the head's bias."""
        model = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        mean = spec["reward_mean"]
        if mean:
            head = model.score
            biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
            with torch.no_grad():
                biased.weight.copy_(head.weight)
                biased.bias.fill_(-mean if head.bias is None else float(head.bias) - mean)
            model.score = biased
        return model

    reward_model, value_model = scalar_model(), scalar_model()
    dataset = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    n_minibatches = spec["prompts_per_step"] // spec["minibatch_size"]
    config = PPOConfig(
        output_dir=str(Path.cwd() / "trl-run"), report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=fixed["seed"], data_seed=fixed["seed"], use_cpu=device == "cpu",
        bf16=bf16, fp16=False, gradient_checkpointing=False,
        # rollout batch = per_device_train_batch_size x grad_accum; with grad_accum 1 each of the
        # num_mini_batches minibatches is one optimizer step, as in rlhfkit
        per_device_train_batch_size=spec["prompts_per_step"], gradient_accumulation_steps=1,
        num_mini_batches=n_minibatches, local_rollout_forward_batch_size=spec["prompts_per_step"],
        total_episodes=spec["steps"] * spec["prompts_per_step"], num_ppo_epochs=spec["epochs"],
        response_length=spec["max_new_tokens"], temperature=fixed["temperature"],
        stop_token_id=spec["end_of_turn_id"], missing_eos_penalty=None,
        kl_coef=fixed["kl_coef"], kl_estimator="k1", cliprange=fixed["clip"], cliprange_value=fixed["value_clip"],
        vf_coef=fixed["vf_coef"], gamma=fixed["gamma"], lam=fixed["lam"], whiten_rewards=False,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        num_sample_generations=0, per_device_eval_batch_size=1, dataloader_num_workers=0,
    )

    class Timer(TrainerCallback):
        """Per-step wall time: from the previous step's end (or train begin) to the step's log."""

        def __init__(self):
            self.mark, self.cpu_mark, self.steps, self.cpu, self.logs = None, None, [], [], []

        def on_train_begin(self, args, state, control, **kw):
            self.mark, self.cpu_mark = time.perf_counter(), time.process_time()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                self.steps.append(time.perf_counter() - self.mark)
                self.cpu.append(time.process_time() - self.cpu_mark)
                self.logs.append(dict(logs))

        def on_step_end(self, args, state, control, **kw):
            self.mark, self.cpu_mark = time.perf_counter(), time.process_time()

    # Each step's rollouts (query ids, response ids), for the report and the common scorer only.
    generated: list[tuple[list, list]] = []
    batch_generation = trl_ppo.batch_generation

    def recording_batch_generation(model, queries, *a, **kw):
        query_responses, logits = batch_generation(model, queries, *a, **kw)
        generated.append((queries.tolist(), query_responses[:, queries.shape[1]:].tolist()))
        return query_responses, logits

    trl_ppo.batch_generation = recording_batch_generation
    timer = Timer()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                         eval_dataset=dataset.select(range(1)), callbacks=[timer])
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        trainer.train()
    if len(timer.logs) != spec["steps"]:
        raise SystemExit(f"TRL logged {len(timer.logs)} PPO steps, expected {spec['steps']}")
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    updates = max(int(state["step"]) for state in optimizer.state.values() if "step" in state)
    expected = spec["steps"] * spec["epochs"] * n_minibatches  # the same work: one update per minibatch
    if updates != expected:
        raise SystemExit(f"TRL made {updates} optimizer steps, expected {expected}")
    loop_s = sum(timer.steps)
    rss = peak_rss_mib()

    # Rollouts as rlhfkit sees its own: cut after the first stop token, decoded without specials.
    index = {tuple(ids): i for i, ids in enumerate(spec["prompt_ids"])}
    pad, stop = spec["pad_token_id"], spec["end_of_turn_id"]
    rollouts, lengths, finished = [], [], []
    for queries, responses in generated:
        step = []
        for query, response in zip(queries, responses):
            query = [t for t in query if t != pad]  # left padding
            ends = stop in response
            response = response[: response.index(stop) + 1] if ends else response
            lengths.append(len(response))
            finished.append(ends)
            text = tokenizer.decode(response[:-1] if ends else response, skip_special_tokens=True)
            step.append([index.get(tuple(query), -1), text, ends])
        rollouts.append(step)
    result.write_text(json.dumps(dict(
        loop_s=loop_s, samples_per_s=spec["steps"] * spec["prompts_per_step"] / loop_s, peak_rss_mib=rss,
        score_first=timer.logs[0]["objective/scores"], score_last=timer.logs[-1]["objective/scores"],
        kl_last=timer.logs[-1]["objective/kl"], response_tokens=sum(lengths) / max(len(lengths), 1),
        eos_fraction=sum(finished) / max(len(finished), 1), loop_cpu_s=sum(timer.cpu), step_seconds=timer.steps,
        rollouts=rollouts if len(rollouts) == spec["steps"] else None,
    )))


if __name__ == "__main__":
    sys.exit(main())
