"""DPO: learn from preferences directly, with no reward model and no sampling (Rafailov et al. 2023).

Read top to bottom: 1. preference pairs (rankings expanded to all untied pairs, or best vs worst),
2. the policy (optionally LoRA), 3. reference logprobs, once up front and saved with the run (or
per batch from a frozen copy / the LoRA base), 4. the loop: chosen and rejected in one forward,
the DPO-family loss, 5. evaluate (held-out pairs, gold judge, win rate vs SFT) and save.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from rlhfkit import processes
from rlhfkit.config import (
    BatchConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    PreferenceDataConfig,
    RunConfig,
    require_positive,
)
from rlhfkit.data.records import Comparison, Ranking
from rlhfkit.data.sources import gold_prompts, world_of
from rlhfkit.data.tokenize import TruncationReport, fit, prompt_ids, response_ids
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.eval.policy import (
    PolicyEvaluator,
    frozen_reference,
    remember_reference_answers,
)
from rlhfkit.logprobs import logprobs
from rlhfkit.losses import DPOLoss, dpo_loss
from rlhfkit.models import (
    apply_lora,
    frozen_copy,
    count_parameters,
    load_model,
    load_tokenizer,
    save_model,
)
from rlhfkit.rankings import load_rankings
from rlhfkit.records import Pair, join
from rlhfkit.train.loop import (
    TrainingRun,
    begin_stage,
    micro_batches,
    stage,
    start_training,
    sync_gradients,
)


@dataclass
class DPOAlgoConfig:
    """The DPO family (losses.DPOLoss): what the loss is and how rankings become pairs."""

    loss: Literal["sigmoid", "ipo", "cdpo", "simpo"] = "sigmoid"
    """`sigmoid` (DPO), `ipo`, `cdpo` (conservative: label smoothing), `simpo` (reference-free)."""
    beta: float = 0.1
    """Strength of the implicit KL to the reference (IPO: its tau; SimPO: the reward scale)."""
    label_smoothing: float = 0.0
    """cdpo: the probability that a preference label is flipped, in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin."""
    pairs: Literal["all", "best_worst"] = "all"
    """A ranking of K becomes all its untied pairs, or its best vs its worst completion."""
    precompute_reference: bool = True
    """Reference logprobs of every pair once, before training, saved with the run: no reference
    model in memory while training. Off: a frozen copy (or, with LoRA, the adapters disabled)
    scores each batch."""


@dataclass
class DPOConfig:
    """DPO and its variants: learn from preferences directly, with no reward model."""

    recipe: str = ""
    """Recipe name or YAML path whose `dpo:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (usually the SFT output); also the frozen reference."""
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    algo: DPOAlgoConfig = field(default_factory=DPOAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=5))
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(micro_batch_size=8))
    """micro_batch_size counts pairs (chosen and rejected go through one forward together)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/dpo", steps=100, eval_every=0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        require_positive(self, "batch.micro_batch_size", "batch.grad_accum", "run.steps", "run.save_every",
                         "data.max_seq_len", "algo.beta")
        self.data.rollout.check(lora=False)  # the engine that samples the rankings' completions
        if not 0.0 <= self.algo.label_smoothing < 0.5:
            raise ConfigError(f"algo.label_smoothing must be in [0, 0.5), got {self.algo.label_smoothing}")
        if self.data.k < 2:
            raise ConfigError(f"data.k must be at least 2 to make pairs, got {self.data.k}")


# --- 1. pairs -----------------------------------------------------------------------------------


def to_comparisons(rankings: list[Ranking], mode: str) -> list[Comparison]:
    """Rankings as (chosen, rejected) pairs: every untied pair, or best vs worst per prompt."""
    if mode == "best_worst":
        return [c for c in (r.best_worst() for r in rankings) if c is not None]
    return [c for r in rankings for c in r.to_comparisons()]


def tokenize_pairs(tokenizer, comparisons: list[Comparison], max_len: int,
                   report: TruncationReport | None = None) -> list[Pair]:
    """Truncate like SFT (old context first, then the response tail), with one prompt cut for both
    sides, so chosen and rejected answer exactly the same context. ``report`` counts truncation
    of each pair's longer side."""
    pairs = []
    for c in comparisons:
        prompt = prompt_ids(tokenizer, c.prompt, max_len)
        chosen, rejected = response_ids(tokenizer, c.chosen, max_len), response_ids(tokenizer, c.rejected, max_len)
        longer = max(chosen, rejected, key=len)
        fitted = fit(prompt, longer, max_len)
        if report is not None:
            report.add(fitted, len(prompt) + len(longer))
        room = max_len - len(fitted.prompt)
        pairs.append(Pair(fitted.prompt, chosen[:room], rejected[:room]))
    return pairs


def sequence_logprobs(model, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response logprobs of chosen then rejected, in one forward: (2B,) each, and response
    lengths (2B,). Rows 0..B-1 are the chosen responses, B..2B-1 the rejected ones."""
    seqs = join([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    logps = logprobs(model, seqs)  # (2B, R), 0 on padding
    return logps.sum(-1), seqs.response_mask.sum(-1).float().to(logps.device)


# --- 3. reference logprobs ----------------------------------------------------------------------


@torch.no_grad()
def reference_table(model, pairs: list[Pair], pad_id: int, batches: list[list[int]], spread: bool = False) -> torch.Tensor:
    """(N, 2) reference logprobs of every pair's chosen and rejected response, computed over the
    given batches of pair indices (a pair in several batches keeps its first value). ``spread``:
    each process computes its share of the batches, whole, and every process gets the table."""
    model.eval()
    mine = batches[processes.share(len(batches))] if spread else batches
    computed = []
    for rows in mine:
        logps, _ = sequence_logprobs(model, [pairs[i] for i in rows], pad_id)
        computed.append((rows, torch.stack(logps.float().chunk(2), dim=1).cpu()))
    table = torch.full((len(pairs), 2), float("nan"))
    for rows, values in (processes.gather(computed) if spread else computed):  # in batch order
        new = table[rows, 0].isnan()
        table[torch.tensor(rows)[new]] = values[new]
    if table.isnan().any():
        raise RuntimeError(f"reference batches left {int(table[:, 0].isnan().sum())} of {len(pairs)} pairs out")
    return table


def first_epoch_batches(run: TrainingRun, n: int) -> list[list[int]]:
    """Every process's micro-batches, step by step from step 0, until each of the ``n`` pairs has
    appeared once. The reference pass batches pairs exactly as the first epoch's training forwards
    do, so the policy and its reference round alike in bf16 (another batch layout packs rows
    differently and moved summed logprobs by ~0.07 on SmolLM2) and the step-1 loss is exactly the
    starting loss, ln 2 for sigmoid DPO."""
    seen: set[int] = set()
    batches: list[list[int]] = []
    world = run.acc.num_processes
    step = 0
    while len(seen) < n:
        indices = run.order.batch(step, run.global_batch)
        for rank in range(world):
            for micro in micro_batches(indices, run.batch, rank, world):
                if not seen.issuperset(micro):
                    batches.append(micro)
                    seen.update(micro)
        step += 1
    return batches


def eval_batches(n: int, size: int) -> list[list[int]]:
    """The held-out pairs in order, ``size`` at a time (evaluation's batches)."""
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def precomputed_reference(acc, out: Path, model, lora: bool, splits: dict[str, tuple[list[Pair], list[list[int]]]],
                          pad_id: int, resuming: bool) -> dict[str, torch.Tensor]:
    """Reference logprobs of every pair, (N, 2) per split, over that split's batches: computed
    once by the starting policy (LoRA: adapters off), each process taking its share of the
    batches, and saved in OUT/data by the main process. A resumed run (whose policy has moved
    away from the reference) reads them back. Under FSDP, call it on the whole weights."""
    tables = {}
    for split, (pairs, batches) in splits.items():
        path = out / "data" / f"{split}_reference_logps.safetensors"
        if not pairs:
            continue
        if resuming and not path.exists():
            raise RlhfkitError(f"{out}: resuming needs data/{split}_reference_logps.safetensors, which is missing")
        if not processes.broadcast(path.exists()):  # the main process's answer: all compute, or none
            acc.print(f"reference logprobs of {len(pairs)} {split} pairs (computed once, saved with the run)")
            starting = frozen_reference(model, None) if lora else contextlib.nullcontext(model)
            with acc.autocast(), starting as ref:
                table = reference_table(ref, pairs, pad_id, batches, spread=True)
            if acc.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({"logps": table.contiguous()}, str(path.with_suffix(".tmp")))
                path.with_suffix(".tmp").replace(path)
        acc.wait_for_everyone()
        tables[split] = load_file(path)["logps"]
    model.train()
    return tables


def pair_metrics(loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-pair sums: loss, implicit rewards, their margin, and whether chosen out-scores rejected."""
    chosen, rejected = stats["rewards_chosen"], stats["rewards_rejected"]
    return {"loss": loss.detach().sum(), "rewards_chosen": chosen.sum(), "rewards_rejected": rejected.sum(),
            "margin": (chosen - rejected).sum(), "accuracy": (chosen > rejected).float().sum()}


# --- the stage ----------------------------------------------------------------------------------


@stage
def train(cfg: DPOConfig, comparisons: tuple[list[Comparison], list[Comparison]] | None = None) -> Path:
    """``comparisons``: (train, held-out) pairs made by the caller (online DPO's iterations);
    otherwise they come from ``cfg.data``."""
    acc, out = begin_stage(cfg)
    algo, say = cfg.algo, acc.print
    variant = DPOLoss(algo.loss)

    # 1. Rankings (a file, or world prompts answered by the policy and ranked by simulated
    # labelers; cached in OUT/data) -> pairs -> token ids.
    if comparisons is None:
        # sampled rankings: every process samples its share, the main process writes the cache
        train_rankings, eval_rankings = load_rankings(cfg.data, cfg.model, cfg.run.seed, out)
        comparisons = to_comparisons(train_rankings, algo.pairs), to_comparisons(eval_rankings, algo.pairs)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    truncation = TruncationReport()
    train_pairs = tokenize_pairs(tokenizer, comparisons[0], cfg.data.max_seq_len, truncation)
    eval_pairs = tokenize_pairs(tokenizer, comparisons[1], cfg.data.max_seq_len)
    if not train_pairs:
        raise RlhfkitError(f"no preference pairs in {cfg.data.train} (every ranking was a tie?)")
    say(f"dpo data: {len(train_pairs)} train / {len(eval_pairs)} held-out pairs ({algo.pairs}); loss {variant.value}; "
        f"pairs: {truncation.summary(cfg.data.max_seq_len)}")

    # 2. The policy; the reference is the same starting weights.
    policy = load_model(cfg.model, tokenizer, seed=cfg.run.seed)
    if cfg.model.lora:
        policy = apply_lora(policy, cfg.model)
    total_params, trainable = count_parameters(policy)
    say(f"model {cfg.model.name}: {total_params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable")
    pad_id = tokenizer.pad_token_id
    world = world_of(cfg.data.train, cfg.data.world_seed)
    gold = gold_prompts(cfg.data.train, cfg.eval.gold_prompts, cfg.data.world_seed)

    # 3. Reference logprobs. Up front: computed by the starting policy (LoRA: adapters off),
    # saved with the run. Otherwise a frozen copy (LoRA: the base) scores each batch.
    reference = None
    if variant.needs_reference and not algo.precompute_reference and not cfg.model.lora:
        reference = frozen_copy(policy, cfg.model.offload_frozen)
    run = start_training(acc, out, policy, cfg.optim, cfg.run, cfg.batch, len(train_pairs), "dpo",
                         gradient_checkpointing=cfg.model.gradient_checkpointing)
    keeps_reference = reference is not None or cfg.model.lora
    evaluator = PolicyEvaluator(run.raw_model, (lambda: frozen_reference(run.raw_model, reference)) if keeps_reference else None,
                                tokenizer, world, gold, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                cfg.model.precision, 1.0, say=run.bar.print)
    ref_tables: dict[str, torch.Tensor] = {}
    if variant.needs_reference and algo.precompute_reference:
        splits = {"train": (train_pairs, first_epoch_batches(run, len(train_pairs))),
                  "eval": (eval_pairs, eval_batches(len(eval_pairs), cfg.eval.batch_size))}
        with run.whole_weights():  # each process computes its share of the batches
            ref_tables = precomputed_reference(acc, out, run.raw_model, cfg.model.lora, splits, pad_id,
                                               resuming=run.start_step > 0)
    with run.whole_weights():
        if not keeps_reference and gold and acc.is_main_process:  # the SFT answers, for the final win rate
            remember_reference_answers(evaluator, out / "data" / "reference_answers.json", resuming=run.start_step > 0)

    def batch_loss(model, pairs: list[Pair], indices: list[int], split: str):
        logps, lengths = sequence_logprobs(model, pairs, pad_id)
        chosen, rejected = logps.float().chunk(2)
        ref_chosen = ref_rejected = None
        if variant.needs_reference:
            if split in ref_tables:
                ref = ref_tables[split][indices].to(chosen.device)
                ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
            else:
                with torch.no_grad(), frozen_reference(run.raw_model, reference) as frozen:
                    ref_logps, _ = sequence_logprobs(frozen, pairs, pad_id)
                ref_chosen, ref_rejected = ref_logps.float().chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, *lengths.chunk(2), beta=algo.beta, variant=variant,
                        label_smoothing=algo.label_smoothing, simpo_gamma=algo.simpo_gamma)

    @run.evaluation
    @torch.no_grad()
    def evaluate(step: int) -> dict[str, float]:
        run.raw_model.eval()
        sums: dict[str, float] = {}
        with acc.autocast():
            for indices in eval_batches(len(eval_pairs), cfg.eval.batch_size):
                loss, stats = batch_loss(run.raw_model, [eval_pairs[i] for i in indices], indices, "eval")
                for key, value in pair_metrics(loss, stats).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        metrics = {f"eval/{k}": v / len(eval_pairs) for k, v in sums.items()} if eval_pairs else {}
        metrics.update(evaluator(step, final=step == cfg.run.steps))
        run.raw_model.train()
        shown = {k: v for k, v in metrics.items() if "/gold/" not in k and "vs_sft" not in k}
        if shown:
            run.bar.print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        return metrics

    if run.start_step == 0 and cfg.eval.at_start:
        run.log.log(0, evaluate(0))

    # 4. Loop: each micro-batch's chosen and rejected in one forward; the loss is summed per pair
    # and divided by the global batch's pair count (accumulation == one big batch).
    world_size, global_batch = acc.num_processes, run.global_batch
    train_seconds, metrics = 0.0, {}
    for step in range(run.start_step, cfg.run.steps):
        t_step = time.perf_counter()
        _, mine = run.step_batches(step)
        sums: dict[str, torch.Tensor] = {}
        for m, micro in enumerate(mine):
            with sync_gradients(acc, run.model, last=m == len(mine) - 1), acc.autocast():
                loss, stats = batch_loss(run.model, [train_pairs[i] for i in micro], micro, "train")
                run.backward(loss.sum() / global_batch * world_size)
            for key, value in pair_metrics(loss, stats).items():
                sums[key] = sums.get(key, torch.zeros(())) + value.cpu()
        done = step + 1
        metrics = {f"dpo/{k}": float(run.sum(v)) / global_batch for k, v in sums.items()}
        grad_norm, skipped = run.update(done, metrics["dpo/loss"])
        train_seconds += time.perf_counter() - t_step
        metrics.update({"dpo/grad_norm": grad_norm, "dpo/skipped": float(skipped), "dpo/lr": run.scheduler.get_last_lr()[0],
                        "dpo/pairs_per_s": (done - run.start_step) * global_batch / max(train_seconds, 1e-9)})
        run.bar.update(done, f"loss {metrics['dpo/loss']:.4f}  acc {metrics['dpo/accuracy']:.2f}  "
                             f"margin {metrics['dpo/margin']:.3f}")
        due = run.end_step(done, metrics)
        if due.eval:
            metrics.update(evaluate(done))
        if due.log:
            run.log.log(done, metrics)
        if due.checkpoint:
            run.checkpoint(done)

    # 5. Save the policy (LoRA merged, so the folder loads like any model), then the marker.
    return run.finish(metrics, evaluate, save=lambda out, model: save_model(model, tokenizer, out))
