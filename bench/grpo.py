"""GRPO: rlhfkit's `grpo` stage vs TRL's GRPOTrainer, same reward, group size, prompts, lengths.

Both sides train the same policy (the model folder) on the same world prompts
(`rlhfkit world export`'s prompts.jsonl, exactly the prompts the run uses, in the same order):
each step samples G completions for each of P prompts at the same temperature (plain softmax
sampling: top-k 0, top-p 1) up to the same max new tokens, scores them with the same plain
Python reward, takes group advantages (r - group mean) / group std, and makes one on-policy
update (ratio 1, no KL term, no reference model) with the loss summed over tokens and divided by
the batch's token count (rlhfkit `loss_aggregation token`, TRL `loss_type dapo`), in micro
batches of the same size. Printed: completions/s (steady state, steps 2..N) and completion
tokens/s, step and setup times, the mean reward at step 1 and step N (the two sides draw
different samples, so these agree only statistically), mean completion length, peak memory.

Rewards (--reward): `length` (default): -|characters - 40| / 40, which varies within every group
even for the random tiny model, so both sides always do the full update; `gold`: the built-in
world's gold judge (an untrained model gets equal rewards in many groups, whose responses
rlhfkit then leaves out of the backward pass: better with a trained model).

    # smoke test (tiny model, one core)
    OMP_NUM_THREADS=1 taskset -c 1 python bench/grpo.py --model tiny --steps 3
    # SmolLM2-135M-Instruct on CPU, the smollm2 recipe's GRPO settings
    python bench/grpo.py --model smollm2-135m-instruct --steps 10 --prompts-per-step 8 --group-size 4 --max-new-tokens 48 --micro-batch-size 16 --lr 1e-5 --precision bf16
    # with the world's gold judge as the reward, on a GPU
    python bench/grpo.py --model smollm2-135m-instruct --device cuda --steps 20 --reward gold

The rlhfkit side is `rlhfkit grpo --model.name MODEL --prompts prompts.jsonl --reward
common:length_reward (or gold) --algo.prompts-per-step P --algo.group-size G ... --eval.gold-prompts 0
--eval.no-at-start` run in-process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--micro-batch-size", type=int, default=16, help="completions per forward/backward")
    p.add_argument("--reward", choices=["length", "gold"], default="length")


def completions_per_step(args) -> int:
    return args.prompts_per_step * args.group_size


def prepare(args, work: Path, model: str) -> dict:
    if completions_per_step(args) % args.micro_batch_size:
        raise SystemExit(f"prompts-per-step x group-size ({completions_per_step(args)}) must be a multiple of "
                         f"--micro-batch-size ({args.micro_batch_size}): TRL accumulates whole micro batches")
    needed = args.steps * args.prompts_per_step
    paths = common.export_world(work, needed, seed=args.seed)
    return {"prompts": str(paths["prompts"])}


def run_ours(args, work: Path, spec: dict, rec: common.Recorder) -> dict:
    from rlhfkit.cli import parse
    from rlhfkit.train import grpo

    rec.start()
    out = work / "ours-out"
    reward = "gold" if args.reward == "gold" else "common:length_reward"
    cfg = parse("grpo", [
        "--model.name", spec["model"], "--prompts", spec["prompts"], "--reward", reward,
        "--algo.prompts-per-step", str(args.prompts_per_step), "--algo.group-size", str(args.group_size),
        "--algo.baseline", "grpo", "--algo.loss-aggregation", "token", "--algo.kl-coef", "0",
        "--algo.temperature", repr(args.temperature), "--algo.max-new-tokens", str(args.max_new_tokens),
        "--algo.micro-batch-size", str(args.micro_batch_size),
        "--eval.gold-prompts", "0", "--eval.no-at-start", "--run.out", str(out), *common.optim_flags(args),
    ])
    grpo.train(cfg)
    metrics = common.rlhfkit_metrics(out)
    first, last = common.per_step(metrics, "grpo/reward", args.steps)
    lengths = [metrics[s]["grpo/response_tokens"] for s in range(2 if args.steps > 1 else 1, args.steps + 1)]
    equal = [metrics[s]["grpo/equal_reward_groups"] for s in range(1, args.steps + 1)]
    return {"reward_first": first, "reward_last": last, "response_tokens": sum(lengths) / len(lengths),
            "tokens_per_step": completions_per_step(args) * sum(lengths) / len(lengths),
            "equal_reward_groups": sum(equal) / len(equal)}


def run_trl(args, work: Path, spec: dict, rec: common.Recorder) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlhfkit.data.formats import read_prompts
    from rlhfkit.data.records import Message, Prompt, messages_to_dicts
    from rlhfkit.data.world import World

    rec.start()
    tok = common.load_tokenizer(spec["model"])
    prompts, _ = read_prompts(spec["prompts"])
    order = [i for b in common.step_order(len(prompts), args.steps, args.prompts_per_step, args.seed) for i in b]
    rows = [{"prompt": messages_to_dicts(prompts[i].messages), "meta": json.dumps(prompts[i].meta)} for i in order]

    def text_of(completion) -> str:
        return completion[-1]["content"] if isinstance(completion, list) else completion

    def length_reward(prompts, completions, **kwargs):
        return [common.length_score(text_of(c)) for c in completions]

    world = World(seed=0)

    def gold_reward(prompts, completions, meta, **kwargs):
        scores = []
        for prompt, completion, prompt_meta in zip(prompts, completions, meta):
            messages = tuple(Message(m["role"], m["content"]) for m in prompt)
            scores.append(world.judge(Prompt(messages, json.loads(prompt_meta)), text_of(completion)).score)
        return scores

    model = common.load_trl_policy(spec["model"], tok, args.device)
    accumulation = completions_per_step(args) // args.micro_batch_size
    config = GRPOConfig(
        **common.trl_training_kwargs(args, work / "trl-out", args.micro_batch_size, accumulation),
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        beta=0.0, loss_type="dapo", scale_rewards="group", num_iterations=1, epsilon=0.2,
        mask_truncated_completions=False, shuffle_dataset=False, disable_dropout=True, log_completions=False,
        use_vllm=False,
    )
    recorder = common.trl_recorder(rec)
    trainer = GRPOTrainer(model=model, reward_funcs=[gold_reward if args.reward == "gold" else length_reward],
                          args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          optimizers=common.trl_optimizer(model, args), callbacks=[recorder])
    common.quiet_trainer(trainer)
    trainer.train()

    logs = recorder.logs
    first, last = common.per_step(logs, "reward", args.steps)
    lengths = [logs[s]["completions/mean_length"] for s in range(2 if args.steps > 1 else 1, args.steps + 1)]
    equal = [logs[s]["frac_reward_zero_std"] for s in range(1, args.steps + 1)]
    return {"reward_first": first, "reward_last": last, "response_tokens": sum(lengths) / len(lengths),
            "tokens_per_step": completions_per_step(args) * sum(lengths) / len(lengths),
            "equal_reward_groups": sum(equal) / len(equal)}


def differences(args) -> list[str]:
    return [
        "Samples: each side draws its own (rlhfkit a seeded private generator in its own decoding loop, TRL the "
        "global RNG through model.generate), so rewards and lengths agree only statistically; compare "
        "completion tokens/s as well as completions/s when the mean lengths differ.",
        "Decoding: rlhfkit drops finished rows from the batch and its KV cache; HF generate keeps every row "
        "until all have stopped (or max new tokens).",
        "Update: rlhfkit leaves responses with zero advantage out of the forward/backward (their gradient is "
        "exactly 0 without a KL term); TRL computes them. Logprobs: rlhfkit packs sequences, TRL pads.",
    ]


STAGE = common.Stage(
    name="grpo", doc=__doc__, unit="completions", add_args=add_args,
    defaults={"lr": 1e-6, "warmup": 0, "schedule": "constant"},  # rlhfkit's GRPO defaults (train/grpo.py GRPOConfig)
    prepare=prepare, run_ours=run_ours, run_trl=run_trl, units_per_step=completions_per_step,
    differences=differences, loss_key="reward",
    extra_rows=[
        common.Row("completion tokens/s (steady)", "tokens_per_s", "{:.0f}"),
        common.Row("mean completion tokens (steps 2..N)", "response_tokens", "{:.1f}"),
        common.Row("share of groups with equal rewards", "equal_reward_groups", "{:.2f}", ratio=False),
    ],
)

if __name__ == "__main__":
    common.main(STAGE)
