"""SFT: rlhfkit's `sft` stage vs TRL's SFTTrainer, same model, data, batches and steps.

Both sides train on the same world demonstrations (`rlhfkit world export`'s sft.jsonl, written
to a temp folder), in the same order, with the loss on the response tokens only (TRL: a
prompt-completion dataset, completion_only_loss=True), the same max length, micro batch,
accumulation, learning rate, warmup and schedule, and no evaluation or saving. Printed: samples/s
and tokens/s (steady state, steps 2..N), step and setup times, the loss at step 1 (must agree:
same data, same initial weights) and at step N, and each side's peak memory.

    # smoke test (tiny model, one core)
    OMP_NUM_THREADS=1 taskset -c 1 python bench/sft.py --model tiny --steps 3
    # SmolLM2-135M-Instruct on CPU, the smollm2 recipe's SFT settings
    python bench/sft.py --model smollm2-135m-instruct --steps 20 --batch-size 8 --max-len 192 --lr 5e-5 --warmup 5 --precision bf16
    # on a GPU (bf16 by default there)
    python bench/sft.py --model smollm2-135m-instruct --device cuda --steps 50 --batch-size 16

The rlhfkit side is `rlhfkit sft --model.name MODEL --data.train sft.jsonl --data.eval-fraction 0
--data.eval-examples 0 --eval.gold-prompts 0 --eval.no-at-start --run.eval-every 0 ...` run
in-process (rlhfkit.train.sft.train(parse("sft", flags))).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="micro batch (examples per forward)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro batches per optimizer step")
    p.add_argument("--max-len", type=int, default=256, help="prompt + response tokens")


def global_batch(args) -> int:
    return args.batch_size * args.grad_accum


def prepare(args, work: Path, model: str) -> dict:
    from rlhfkit.data.formats import read_demonstrations
    from rlhfkit.data.tokenize import tokenize_demonstrations

    needed = args.steps * global_batch(args)
    paths = common.export_world(work, max(needed, 64), seed=args.seed)
    tok = common.load_tokenizer(model)
    demos, _ = read_demonstrations(paths["sft"])
    examples, _ = tokenize_demonstrations(tok, demos, args.max_len)
    steps = common.step_order(len(demos), args.steps, global_batch(args), args.seed)
    window = steps[1:] or steps
    tokens = sum(len(examples[i]) for batch in window for i in batch) / len(window)
    return {"sft": str(paths["sft"]), "tokens_per_step": tokens}


def run_ours(args, work: Path, spec: dict, rec: common.Recorder) -> dict:
    from rlhfkit.cli import parse
    from rlhfkit.train import sft

    rec.start()
    out = work / "ours-out"
    cfg = parse("sft", [
        "--model.name", spec["model"], "--data.train", spec["sft"], "--data.eval-fraction", "0",
        "--data.eval-examples", "0", "--data.max-seq-len", str(args.max_len),
        "--batch.micro-batch-size", str(args.batch_size), "--batch.grad-accum", str(args.grad_accum),
        "--run.out", str(out), "--eval.gold-prompts", "0", "--eval.no-at-start", *common.optim_flags(args),
    ])
    sft.train(cfg)
    metrics = common.rlhfkit_metrics(out)
    first, last = common.per_step(metrics, "train/loss", args.steps)
    return {"loss_first": first, "loss_last": last}


def run_trl(args, work: Path, spec: dict, rec: common.Recorder) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlhfkit.data.formats import read_demonstrations
    from rlhfkit.data.tokenize import end_of_turn_id, render_prompt, tokenize_demonstrations

    rec.start()
    tok = common.load_tokenizer(spec["model"])
    demos, _ = read_demonstrations(spec["sft"])
    order = [i for batch in common.step_order(len(demos), args.steps, global_batch(args), args.seed) for i in batch]
    eot = tok.decode([end_of_turn_id(tok)])
    rows = [{"prompt": render_prompt(tok, demos[i].prompt), "completion": demos[i].response + eot} for i in order]

    model = common.load_trl_policy(spec["model"], tok, args.device)
    config = SFTConfig(
        **common.trl_training_kwargs(args, work / "trl-out", args.batch_size, args.grad_accum),
        max_length=args.max_len, completion_only_loss=True, packing=False, padding_free=False,
        shuffle_dataset=False, loss_type="nll",
    )
    recorder = common.trl_recorder(rec)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         optimizers=common.trl_optimizer(model, args), callbacks=[recorder])
    common.quiet_trainer(trainer)
    trainer.train()

    # After the timed run: did TRL train on the tokens rlhfkit trains on?
    ours, _ = tokenize_demonstrations(tok, [demos[i] for i in order], args.max_len)
    theirs = trainer.train_dataset
    mismatches = abs(len(ours) - len(theirs))
    for ex, row in zip(ours, theirs):
        labels = [-100] * len(ex.prompt) + list(ex.response)
        mismatches += ex.input_ids != list(row["input_ids"]) or labels != list(row["labels"])
    first, last = common.per_step(recorder.logs, "loss", args.steps)
    warnings = []
    if mismatches:
        warnings.append(f"{mismatches}/{len(ours)} examples tokenized differently from rlhfkit")
    if any(ex.prompt_truncated or ex.response_truncated for ex in ours):
        warnings.append("some examples exceed --max-len: rlhfkit drops old prompt tokens, TRL cuts the end")
    return {"loss_first": first, "loss_last": last, "token_mismatches": mismatches, "warnings": warnings}


def differences(args) -> list[str]:
    return [
        "Loss: token-mean NLL of response tokens over the whole accumulated batch on both sides "
        "(TRL computes it through its fused, chunked LM head; rlhfkit through its own).",
        "Truncation past --max-len: rlhfkit drops the oldest prompt tokens, TRL (keep_start) the end of the "
        "sequence; the world's examples are far shorter than the default --max-len.",
    ]


STAGE = common.Stage(
    name="sft", doc=__doc__, unit="samples", add_args=add_args,
    defaults={"lr": 1e-4, "warmup": 10, "schedule": "cosine"},  # rlhfkit's SFT defaults (config.OptimConfig)
    prepare=prepare, run_ours=run_ours, run_trl=run_trl, units_per_step=global_batch, differences=differences,
    extra_rows=[common.Row("tokens/s (steady)", "tokens_per_s", "{:.0f}")],
)

if __name__ == "__main__":
    common.main(STAGE)
