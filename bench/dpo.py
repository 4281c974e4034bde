"""DPO: rlhfkit's `dpo` stage vs TRL's DPOTrainer, sigmoid loss, same beta, pairs, batches, steps.

Both sides train the same policy (the model folder; the reference is the same starting weights)
on the same (prompt, chosen, rejected) world comparisons (`rlhfkit world export`'s
comparisons.jsonl, cut to exactly the pairs the run uses: one epoch), in the same order, with
-log sigmoid(beta * (chosen log-ratio - rejected log-ratio)) averaged over pairs, the same max
length, micro batch (pairs), accumulation, learning rate, warmup, schedule and steps. Each side
gets its reference logprobs the way it does by default: rlhfkit computes them once before
training (no reference model in memory while training), TRL runs a frozen copy of the model on
every batch. Printed: pairs/s in the steady state (steps 2..N) and over the whole run with the
reference pass counted (N steps' pairs over the time of all N steps plus a reference pass made
before training; the data is one epoch, so both sides run the reference forward over the same
pairs exactly once, and rlhfkit's pass pays the first forward's one-time costs that TRL pays in
its step 1), step and setup times, the loss at step 1 (ln 2 on both sides: policy = reference)
and step N, and peak memory.

Target: rlhfkit >= 1.5x TRL's pairs/s at equal or lower peak memory.

    # smoke test (tiny model, one core)
    OMP_NUM_THREADS=1 taskset -c 1 python bench/dpo.py --model tiny --steps 3
    # SmolLM2-135M-Instruct on CPU, the smollm2 recipe's DPO settings
    python bench/dpo.py --model smollm2-135m-instruct --steps 20 --batch-size 8 --max-len 192 --beta 0.1 --lr 2e-6 --warmup 5 --precision bf16
    # on a GPU
    python bench/dpo.py --model smollm2-135m-instruct --device cuda --steps 50 --batch-size 16
    # both sides with an on-the-fly reference (or both precomputed)
    python bench/dpo.py --model tiny --steps 10 --ours-reference on-the-fly
    python bench/dpo.py --model tiny --steps 10 --trl-reference precomputed

The rlhfkit side is `rlhfkit dpo --model.name MODEL --data.train pairs.jsonl --data.eval-fraction 0
--algo.loss sigmoid --algo.beta BETA --eval.gold-prompts 0 --eval.no-at-start ...` run in-process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="micro batch, in pairs")
    p.add_argument("--grad-accum", type=int, default=1, help="micro batches per optimizer step")
    p.add_argument("--max-len", type=int, default=256, help="prompt + response tokens")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--ours-reference", choices=["precomputed", "on-the-fly"], default="precomputed",
                   help="rlhfkit's reference logprobs (its default: precomputed)")
    p.add_argument("--trl-reference", choices=["precomputed", "on-the-fly"], default="on-the-fly",
                   help="TRL's reference logprobs (its default: a frozen copy on every batch)")
    p.add_argument("--reference-batch-size", type=int, default=16,
                   help="pairs per forward of TRL's precomputed reference pass (--trl-reference precomputed); "
                        "rlhfkit's pass batches pairs as its training micro-batches, so they round alike")


def global_batch(args) -> int:
    return args.batch_size * args.grad_accum


def prepare(args, work: Path, model: str) -> dict:
    return {"pairs": str(common.comparisons_file(work, args.steps * global_batch(args), args.seed))}


def run_ours(args, work: Path, spec: dict, rec: common.Recorder) -> dict:
    from rlhfkit.cli import parse
    from rlhfkit.train import dpo

    precomputed = dpo.precomputed_reference

    def timed_reference(*a, **k):  # rlhfkit's reference pass, before the first step
        t = rec.now()
        try:
            return precomputed(*a, **k)
        finally:
            rec.mark("reference_s", rec.now() - t)

    dpo.precomputed_reference = timed_reference
    rec.start()
    out = work / "ours-out"
    reference = [] if args.ours_reference == "precomputed" else ["--algo.no-precompute-reference"]
    cfg = parse("dpo", [
        "--model.name", spec["model"], "--data.train", spec["pairs"], "--data.eval-fraction", "0",
        "--data.max-seq-len", str(args.max_len), "--algo.loss", "sigmoid", "--algo.beta", repr(args.beta),
        "--algo.pairs", "all", *reference,
        "--batch.micro-batch-size", str(args.batch_size), "--batch.grad-accum", str(args.grad_accum),
        "--eval.gold-prompts", "0", "--eval.no-at-start", "--eval.batch-size", str(args.reference_batch_size),
        "--run.out", str(out), *common.optim_flags(args),
    ])
    dpo.train(cfg)
    metrics = common.rlhfkit_metrics(out)
    first, last = common.per_step(metrics, "dpo/loss", args.steps)
    _, margin = common.per_step(metrics, "dpo/margin", args.steps)
    return {"loss_first": first, "loss_last": last, "margin_last": margin}


def run_trl(args, work: Path, spec: dict, rec: common.Recorder) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.data.formats import read_comparisons
    from rlhfkit.data.tokenize import end_of_turn_id, render_prompt
    from rlhfkit.train.dpo import tokenize_pairs

    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):  # only with --trl-reference precomputed
        t = rec.now()
        try:
            return precompute(self, *a, **k)
        finally:
            rec.mark("reference_s", rec.now() - t)

    DPOTrainer._precompute_ref_logps = timed_precompute
    rec.start()
    tok = common.load_tokenizer(spec["model"])
    comparisons, _ = read_comparisons(spec["pairs"])
    order = [i for b in common.step_order(len(comparisons), args.steps, global_batch(args), args.seed) for i in b]
    eot = tok.decode([end_of_turn_id(tok)])
    rows = [{"prompt": render_prompt(tok, comparisons[i].prompt), "chosen": comparisons[i].chosen + eot,
             "rejected": comparisons[i].rejected + eot} for i in order]

    model = common.load_trl_policy(spec["model"], tok, args.device)
    config = DPOConfig(
        **common.trl_training_kwargs(args, work / "trl-out", args.batch_size, args.grad_accum),
        beta=args.beta, loss_type=["sigmoid"], label_smoothing=0.0, max_length=args.max_len,
        truncation_mode="keep_start", precompute_ref_log_probs=args.trl_reference == "precomputed",
        precompute_ref_batch_size=args.reference_batch_size, disable_dropout=True, padding_free=False,
    )
    recorder = common.trl_recorder(rec)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         optimizers=common.trl_optimizer(model, args), callbacks=[recorder])
    common.quiet_trainer(trainer)
    trainer.train()

    ours = tokenize_pairs(tok, [comparisons[i] for i in order], args.max_len)
    theirs = trainer.train_dataset
    mismatches = abs(len(ours) - len(theirs))
    for pair, row in zip(ours, theirs):
        mismatches += (pair.prompt + pair.chosen != list(row["prompt_ids"]) + list(row["chosen_ids"])
                       or pair.prompt + pair.rejected != list(row["prompt_ids"]) + list(row["rejected_ids"]))
    first, last = common.per_step(recorder.logs, "loss", args.steps)
    _, margin = common.per_step(recorder.logs, "rewards/margins", args.steps)
    warnings = [f"{mismatches}/{len(ours)} pairs tokenized differently from rlhfkit"] if mismatches else []
    return {"loss_first": first, "loss_last": last, "margin_last": margin, "token_mismatches": mismatches,
            "warnings": warnings}


def differences(args) -> list[str]:
    ours = "precomputed once before training" if args.ours_reference == "precomputed" else "a frozen copy per batch"
    theirs = "precomputed once before training" if args.trl_reference == "precomputed" else "a frozen copy per batch"
    return [
        f"Reference logprobs: rlhfkit {ours}, TRL {theirs}. A pass done before training is outside the steady "
        "window; the 'steps 1..N + reference pass' row counts it (and step 1) on both sides.",
        "Forward: rlhfkit scores chosen and rejected in one packed forward (no padding) when exact, only the "
        "response positions through the LM head; TRL right-pads both into one batch and uses its fused LM head.",
        "Truncation past --max-len: rlhfkit cuts old prompt context first (one cut for both responses), TRL "
        "(keep_start) cuts the end; the world's pairs are far shorter than the default --max-len.",
    ]


STAGE = common.Stage(
    name="dpo", doc=__doc__, unit="pairs", add_args=add_args,
    defaults={"lr": 1e-6, "warmup": 5, "schedule": "cosine"},  # rlhfkit's DPO defaults (train/dpo.py DPOConfig)
    prepare=prepare, run_ours=run_ours, run_trl=run_trl, units_per_step=global_batch, differences=differences,
    extra_rows=[common.Row("reward margin at step N", "margin_last", "{:.4f}", ratio=False)],
)

if __name__ == "__main__":
    common.main(STAGE)
