"""Reward model: rlhfkit's `rm` stage vs TRL's RewardTrainer on the same pairwise comparisons.

Both sides train a scalar head on the same backbone (the model folder loaded as a
sequence-classification model with one output; TRL's head starts from the weights rlhfkit's
initialisation gives it, so the first loss agrees) on the same (prompt, chosen, rejected)
comparisons of the built-in task world (`rlhfkit world export`'s comparisons.jsonl, cut to
exactly the pairs the run uses), in the same order, with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected) averaged over pairs, the same micro batch (pairs),
accumulation, learning rate, warmup, schedule and steps. Printed: pairs/s (steady state, steps
2..N), step and setup times, the loss at step 1 (must agree) and step N, peak memory.

    # smoke test (tiny model, one core)
    OMP_NUM_THREADS=1 taskset -c 1 python bench/rm.py --model tiny --steps 3
    # SmolLM2-135M-Instruct on CPU, the smollm2 recipe's RM settings
    python bench/rm.py --model smollm2-135m-instruct --steps 20 --batch-size 4 --max-len 192 --lr 2e-5 --warmup 5 --precision bf16
    # on a GPU
    python bench/rm.py --model smollm2-135m-instruct --device cuda --steps 50 --batch-size 16

The rlhfkit side is `rlhfkit rm --model.name MODEL --data.train comparisons.jsonl
--data.eval-fraction 0 --no-normalize --run.eval-every 0 ...` run in-process; rlhfkit reads each
comparison as a ranking of two, so its micro batch of B pairs is one forward over 2B sequences,
as TRL's is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=4, help="micro batch, in pairs")
    p.add_argument("--grad-accum", type=int, default=1, help="micro batches per optimizer step")
    p.add_argument("--max-len", type=int, default=256, help="prompt + response tokens")


def global_batch(args) -> int:
    return args.batch_size * args.grad_accum


def prepare(args, work: Path, model: str) -> dict:
    import torch
    from safetensors.torch import save_file

    from rlhfkit.reward import build_reward_model

    pairs = common.comparisons_file(work, args.steps * global_batch(args), args.seed)
    # The head rlhfkit initialises (N+ detail: normal, std 1/sqrt(hidden + 1), seeded), for TRL's model.
    tok = common.load_tokenizer(model)
    head = build_reward_model(model, tok, args.seed).score.weight.detach().clone()
    save_file({"weight": head.to(torch.float32).contiguous()}, str(work / "rm_head.safetensors"))
    return {"pairs": str(pairs), "head": str(work / "rm_head.safetensors")}


def run_ours(args, work: Path, spec: dict, rec: common.Recorder) -> dict:
    from rlhfkit.cli import parse
    from rlhfkit.train import rm

    rec.start()
    out = work / "ours-out"
    cfg = parse("rm", [
        "--model.name", spec["model"], "--data.train", spec["pairs"], "--data.eval-fraction", "0",
        "--data.max-seq-len", str(args.max_len), "--no-normalize",
        "--batch.micro-batch-size", str(args.batch_size), "--batch.grad-accum", str(args.grad_accum),
        "--run.out", str(out), *common.optim_flags(args),
    ])
    rm.train(cfg)
    metrics = common.rlhfkit_metrics(out)
    first, last = common.per_step(metrics, "train/loss", args.steps)
    acc_first, acc_last = common.per_step(metrics, "train/accuracy", args.steps)
    return {"loss_first": first, "loss_last": last, "accuracy_last": acc_last}


def run_trl(args, work: Path, spec: dict, rec: common.Recorder) -> dict:
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhfkit.data.formats import read_comparisons
    from rlhfkit.data.records import messages_to_dicts
    from rlhfkit.models import disable_dropout
    from rlhfkit.reward import encode

    rec.start()
    tok = common.load_tokenizer(spec["model"])
    comparisons, _ = read_comparisons(spec["pairs"])
    order = [i for b in common.step_order(len(comparisons), args.steps, global_batch(args), args.seed) for i in b]
    # Conversational rows: TRL tokenizes apply_chat_template(prompt + [response]), the layout
    # rlhfkit's RM reads too (for ChatML ending `<|im_end|>\n`).
    rows = [{"prompt": messages_to_dicts(comparisons[i].prompt),
             "chosen": [{"role": "assistant", "content": comparisons[i].chosen}],
             "rejected": [{"role": "assistant", "content": comparisons[i].rejected}]} for i in order]

    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.copy_(load_file(spec["head"])["weight"])
    model.config.pad_token_id = tok.pad_token_id
    disable_dropout(model)
    model.to(args.device)
    config = RewardConfig(**common.trl_training_kwargs(args, work / "trl-out", args.batch_size, args.grad_accum),
                          max_length=args.max_len, disable_dropout=True, center_rewards_coefficient=None)
    recorder = common.trl_recorder(rec)
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            optimizers=common.trl_optimizer(model, args), callbacks=[recorder])
    common.quiet_trainer(trainer)
    trainer.train()

    theirs = trainer.train_dataset
    mismatches = abs(len(order) - len(theirs))
    for i, row in zip(order, theirs):
        c = comparisons[i]
        mismatches += (encode(tok, c.prompt, c.chosen, args.max_len, False) != list(row["chosen_ids"])
                       or encode(tok, c.prompt, c.rejected, args.max_len, False) != list(row["rejected_ids"]))
    first, last = common.per_step(recorder.logs, "loss", args.steps)
    acc_first, acc_last = common.per_step(recorder.logs, "accuracy", args.steps)
    warnings = [f"{mismatches}/{len(order)} pairs tokenized differently from rlhfkit"] if mismatches else []
    return {"loss_first": first, "loss_last": last, "accuracy_last": acc_last, "token_mismatches": mismatches,
            "warnings": warnings}


def differences(args) -> list[str]:
    return [
        "Reward head: TRL's model gets rlhfkit's initial head weights (normal, std 1/sqrt(hidden+1)); TRL on its "
        "own would keep transformers' init (normal, std 0.02), a different first loss.",
        "Forward: rlhfkit packs the 2B sequences of a micro batch into rows without padding when exact; TRL "
        "right-pads chosen and rejected into one (2B, T) batch. Both read the reward at the last real token.",
        "Over-long pairs: TRL drops pairs longer than --max-len, rlhfkit truncates their prompt; the world's "
        "pairs are far shorter than the default --max-len.",
        "rlhfkit's reward normalisation on reference responses (after training) is off (--no-normalize).",
    ]


STAGE = common.Stage(
    name="rm", doc=__doc__, unit="pairs", add_args=add_args,
    defaults={"lr": 1e-5, "warmup": 10, "schedule": "cosine"},  # rlhfkit's RM defaults (train/rm.py RMConfig)
    prepare=prepare, run_ours=run_ours, run_trl=run_trl, units_per_step=global_batch, differences=differences,
    extra_rows=[common.Row("train accuracy at step N", "accuracy_last", "{:.3f}", ratio=False)],
)

if __name__ == "__main__":
    common.main(STAGE)
