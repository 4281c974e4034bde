"""SFT: supervised fine-tuning on demonstrations (InstructGPT §3.5, step 1).

Read top to bottom: 1. data, 2. model, 3. optimizer and resume, 4. the training loop
(accumulate token-normalised NLL over micro-batches, clip, step), 5. evaluate and save.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit.config import (
    BatchConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    require_positive,
)
from rlhfkit.data.formats import ReadReport, read_demonstrations, read_records
from rlhfkit.data.records import (
    Comparison,
    Demonstration,
    Prompt,
    Ranking,
    split_by_prompt,
)
from rlhfkit.data.sources import world_of
from rlhfkit.data.tokenize import Example, count_loss_tokens, tokenize_demonstrations
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.eval.gold import gold_evaluate
from rlhfkit.logprobs import demonstration_nll
from rlhfkit.models import (
    apply_lora,
    count_parameters,
    load_model,
    load_tokenizer,
    save_model,
)
from rlhfkit.train.loop import begin_stage, stage, start_training, sync_gradients


@dataclass
class SFTConfig:
    """Supervised fine-tuning on demonstrations."""

    recipe: str = ""
    """Recipe name (`tiny`, `smollm2`) or YAML path whose `sft:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        require_positive(self, "batch.micro_batch_size", "batch.grad_accum", "run.steps", "run.save_every", "data.max_seq_len")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.data.eval_fraction}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.optim.lr}")



def preferred_responses(source: str, **options) -> tuple[list[Demonstration], ReadReport]:
    """Comparisons / rankings as demonstrations of their preferred response (SFT on hh-rlhf's `chosen`)."""
    records, report = read_records(source, **options)
    demos = []
    for r in records:
        if isinstance(r, Comparison):
            demos.append(Demonstration(r.prompt, r.chosen))
        elif isinstance(r, Ranking):
            demos.append(Demonstration(r.prompt, r.completions[r.ranks.index(min(r.ranks))]))
        else:
            raise RlhfkitError(f"{source}: data.preferred expects comparisons or rankings, found {type(r).__name__} records")
    return demos, report


def load_data(data: DataConfig, gold_prompts: int) -> tuple[list[Demonstration], list[Demonstration], list[Prompt]]:
    """Train and held-out demonstrations, and held-out prompts for the gold judge (world only)."""
    if (world := world_of(data.train, data.world_seed)) is not None:
        return (
            world.demonstrations(data.world_examples, split="train", imperfect=data.world_imperfect),
            world.demonstrations(data.eval_examples, split="eval"),
            world.prompts(gold_prompts, split="eval"),
        )
    read = preferred_responses if data.preferred else read_demonstrations
    train, report = read(data.train, format=data.format, skip_bad=data.skip_bad)
    print(report.summary())
    if data.eval:
        held_out, eval_report = read(data.eval, format=data.format, skip_bad=data.skip_bad)
        print(eval_report.summary())
    else:  # hold out by prompt hash, so the same prompt never lands on both sides
        train, held_out = split_by_prompt(train, data.eval_fraction, data.train)
    return train, held_out[: data.eval_examples], []




def eval_loss(model, examples: list[Example], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean NLL of held-out responses."""
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            nll, n = demonstration_nll(model, examples[start : start + batch_size], pad_id)
            total, tokens = total + float(nll), tokens + n
    model.train()
    return total / max(tokens, 1)


@stage
def train(cfg: SFTConfig) -> Path:
    acc, out = begin_stage(cfg)
    say = acc.print

    # 1. Data: demonstrations -> (prompt, response) token ids; the loss covers response tokens.
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    train_demos, eval_demos, gold_prompts = load_data(cfg.data, cfg.eval.gold_prompts)
    train_examples, trunc = tokenize_demonstrations(tokenizer, train_demos, cfg.data.max_seq_len)
    eval_examples, _ = tokenize_demonstrations(tokenizer, eval_demos, cfg.data.max_seq_len)
    say(f"train: {trunc.summary(cfg.data.max_seq_len)}; eval: {len(eval_examples)} examples")
    if cfg.eval.gold_prompts and not gold_prompts:
        say("gold-judge evaluation needs the built-in world's prompts (--data.train world); reporting eval loss only")

    # 2. Model (dropout off), optionally with LoRA adapters.
    model = load_model(cfg.model, tokenizer, seed=cfg.run.seed)
    if cfg.model.lora:
        model = apply_lora(model, cfg.model)
    total_params, trainable = count_parameters(model)
    say(f"model {cfg.model.name}: {total_params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable")

    # 3. Optimizer, schedule, exact resume from the last checkpoint, DDP.
    run = start_training(acc, out, model, cfg.optim, cfg.run, cfg.batch, len(train_examples), "sft",
                         gradient_checkpointing=cfg.model.gradient_checkpointing)
    pad_id = tokenizer.pad_token_id

    @run.evaluation
    def evaluate(step: int) -> dict[str, float]:
        with acc.autocast():
            metrics = {"eval/loss": eval_loss(run.raw_model, eval_examples, pad_id, cfg.eval.batch_size)}
        if gold_prompts:
            report = gold_evaluate(
                run.raw_model, tokenizer, world_of(cfg.data.train, cfg.data.world_seed), gold_prompts,
                max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, precision=cfg.model.precision,
            )
            metrics.update(report.metrics())
            with (out / "samples.jsonl").open("a") as f:
                for p, g, s in list(zip(report.prompts, report.generations, report.scores))[: cfg.eval.samples]:
                    f.write(json.dumps({"step": step, "prompt": p.messages[-1].content, "response": g.text, "gold": s}) + "\n")
                    run.bar.print(f"  [step {step}] {p.messages[-1].content!r} -> {g.text!r} (gold {s:.2f})")
        run.bar.print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/gold/" not in k))
        return metrics

    if run.start_step == 0 and cfg.eval.at_start:
        run.log.log(0, evaluate(0))

    # 4. Training loop. Every micro-batch's summed NLL is divided by the loss-token count of the
    # whole global batch (and multiplied by world size, since DDP averages gradients), so
    # accumulation and data parallelism reproduce the single-big-batch gradient exactly.
    world_size = acc.num_processes
    train_seconds, tokens_seen, metrics = 0.0, 0, {}
    for step in range(run.start_step, cfg.run.steps):
        t_step = time.perf_counter()
        indices, mine = run.step_batches(step)
        n_loss_tokens = count_loss_tokens([train_examples[i] for i in indices])
        tokens_seen += sum(len(train_examples[i]) for i in indices)
        loss_sum = torch.zeros(())
        for m, micro in enumerate(mine):
            # acc.autocast(): packed forwards call the backbone and the LM head directly, outside
            # the bf16 autocast accelerate patches into the model's own forward
            with sync_gradients(acc, run.model, last=m == len(mine) - 1):
                with acc.autocast():
                    nll, _ = demonstration_nll(run.model, [train_examples[i] for i in micro], pad_id)
                run.backward(nll / n_loss_tokens * world_size)
            loss_sum += nll.detach().cpu()
        done = step + 1
        loss = float(run.sum(loss_sum)) / n_loss_tokens
        grad_norm, skipped = run.update(done, loss)
        train_seconds += time.perf_counter() - t_step  # throughput excludes evaluation and saving
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/skipped": float(skipped),
                   "train/lr": run.scheduler.get_last_lr()[0], "train/tokens_per_s": tokens_seen / max(train_seconds, 1e-9)}
        run.bar.update(done, f"loss {loss:.4f}  {metrics['train/tokens_per_s']:.0f} tok/s")
        due = run.end_step(done, metrics)
        if due.eval:
            metrics.update(evaluate(done))
        if due.log:
            run.log.log(done, metrics)
        if due.checkpoint:
            run.checkpoint(done)

    # 5. The Hugging Face model folder, then the completion marker (written last).
    return run.finish(metrics, evaluate, save=lambda out, model: save_model(model, tokenizer, out))
