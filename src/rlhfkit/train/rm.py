"""Reward model: learn a scalar reward from comparisons and K-wise rankings (InstructGPT §3.5, step 2).

Read top to bottom: 1. rankings (the world's simulated labelers over policy samples, or a file),
2. tokenize every completion of a prompt into one group, 3. the backbone with a scalar head,
4. the loop: all K completions of each prompt in one forward, the K-wise loss (eq. 1),
5. normalise so reference responses score mean 0, evaluate, save.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit.config import (
    BatchConfig,
    ModelConfig,
    OptimConfig,
    PreferenceDataConfig,
    RunConfig,
    require_positive,
)
from rlhfkit.data.records import Ranking
from rlhfkit.data.sources import world_of
from rlhfkit.data.tokenize import TruncationReport
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.logprobs import rewards as scalar_rewards
from rlhfkit.losses import center_penalty, ranking_loss
from rlhfkit.models import apply_lora, load_tokenizer, save_adapter
from rlhfkit.rankings import load_rankings
from rlhfkit.records import Group
from rlhfkit.reward import (
    MEAN_KEY,
    STD_KEY,
    backbone_is_encoder,
    build_reward_model,
    encode,
)
from rlhfkit.stats import gold_agreement, spearman_rho
from rlhfkit.train.loop import (
    begin_stage,
    stage,
    start_training,
    sync_gradients,
)


@dataclass
class RMConfig:
    """Reward model from comparisons and K-wise rankings."""

    recipe: str = ""
    """Recipe name or YAML path whose `rm:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(micro_batch_size=4))
    """micro_batch_size counts prompts (each with all its K completions in one forward)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/rm", steps=100))
    center_coef: float = 0.0
    """Weight of the reward-centering penalty mean(r^2) (0 disables)."""
    normalize: bool = True
    """Store the mean/std of scores on reference responses, so they score mean 0 (InstructGPT)."""
    norm_examples: int = 256
    """Reference responses scored for the normalisation."""
    eval_batch_size: int = 32
    """Sequences per forward pass at evaluation."""

    def check(self) -> None:
        require_positive(self, "batch.micro_batch_size", "batch.grad_accum", "run.steps", "run.save_every", "data.max_seq_len")
        self.data.rollout.check(lora=False)  # the engine that samples the rankings' completions
        if self.data.k < 2:
            raise ConfigError(f"data.k must be at least 2 to rank, got {self.data.k}")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.data.eval_fraction}")


# --- 2. groups of tokenized completions ---------------------------------------------------------


def to_groups(tokenizer, rankings: list[Ranking], max_len: int, encoder: bool,
              report: TruncationReport | None = None) -> list[Group]:
    return [
        Group([encode(tokenizer, r.prompt, c, max_len, encoder, report) for c in r.completions], list(r.ranks),
              float(r.meta.get("margin") or 0.0), r.meta.get("gold"))
        for r in rankings
    ]


def group_rewards(model, groups: list[Group], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over every completion of every group.

    Returns rewards (B, K) with K the largest group, ranks (B, K), valid (B, K) and margin (B,).
    """
    flat = [s for g in groups for s in g.seqs]
    values = scalar_rewards(model, flat, pad_id)
    k = max(len(g.seqs) for g in groups)
    rewards = torch.zeros(len(groups), k, dtype=values.dtype, device=values.device)
    ranks = torch.zeros(len(groups), k, dtype=torch.long)
    valid = torch.zeros(len(groups), k, dtype=torch.bool)
    start = 0
    for i, g in enumerate(groups):
        n = len(g.seqs)
        rewards[i, :n] = values[start : start + n]
        ranks[i, :n] = torch.tensor(g.ranks)
        valid[i, :n] = True
        start += n
    margin = torch.tensor([g.margin for g in groups])
    return rewards, ranks.to(rewards.device), valid.to(rewards.device), margin.to(rewards.device)


def pair_stats(rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-group sums over untied pairs: correct orderings, reward margins, and best/worst means."""
    better = (ranks.unsqueeze(2) < ranks.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    diffs = rewards.unsqueeze(2) - rewards.unsqueeze(1)
    best = torch.where(valid, ranks, ranks.max() + 1).argmin(-1)
    worst = torch.where(valid, ranks, -1).argmax(-1)
    rows = torch.arange(len(rewards))
    return {
        "pairs": better.sum((1, 2)).float(),
        "correct": ((diffs > 0) & better).sum((1, 2)).float(),
        "margin": (diffs * better).sum((1, 2)),
        "best": rewards[rows, best],
        "worst": rewards[rows, worst],
    }


@torch.no_grad()
def evaluate(model, groups: list[Group], pad_id: int, batch_size: int) -> dict[str, float]:
    """Accuracy (share of untied pairs ordered like the labels), loss, margin, best/worst reward
    means, a per-K breakdown, and against the world's gold judge: pairwise accuracy and the mean
    per-prompt Spearman correlation of RM scores with gold scores."""
    model.eval()
    groups = sorted(groups, key=lambda g: max(len(s) for s in g.seqs))  # similar lengths: little padding
    sums: dict[str, float] = defaultdict(float)
    by_k: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    spearman: list[float] = []
    per_batch = max(1, batch_size // max(len(g.seqs) for g in groups))
    for start in range(0, len(groups), per_batch):
        batch = groups[start : start + per_batch]
        rewards, ranks, valid, margin = group_rewards(model, batch, pad_id)
        loss, n_pairs = ranking_loss(rewards, ranks, valid, margin)
        stats = pair_stats(rewards, ranks, valid)
        sums["loss"] += float(loss.sum())
        for key in ("pairs", "correct", "margin", "best", "worst"):
            sums[key] += float(stats[key].sum())
        for g, pairs, correct in zip(batch, stats["pairs"].tolist(), stats["correct"].tolist()):
            by_k[len(g.seqs)][0] += correct
            by_k[len(g.seqs)][1] += pairs
        for g, row in zip(batch, rewards.tolist()):
            if g.gold is not None:
                correct, pairs = gold_agreement(row[: len(g.seqs)], g.gold)
                sums["gold_correct"] += correct
                sums["gold_pairs"] += pairs
                rho = spearman_rho(row[: len(g.seqs)], g.gold)
                if rho is not None:
                    spearman.append(rho)
    model.train()
    n, pairs = len(groups), max(sums["pairs"], 1.0)
    out = {"loss": sums["loss"] / n, "accuracy": sums["correct"] / pairs, "margin": sums["margin"] / pairs,
           "reward_best": sums["best"] / n, "reward_worst": sums["worst"] / n}
    out.update({f"accuracy_k{k}": c / max(p, 1.0) for k, (c, p) in sorted(by_k.items())})
    if sums["gold_pairs"]:
        out["gold_accuracy"] = sums["gold_correct"] / sums["gold_pairs"]
    if spearman:
        out["gold_spearman"] = sum(spearman) / len(spearman)
    return out


# --- 5. normalisation ---------------------------------------------------------------------------


@torch.no_grad()
def reference_stats(model, tokenizer, cfg: RMConfig, train: list[Ranking], encoder: bool) -> tuple[float, float]:
    """Mean and std of raw rewards on reference responses: the world's demonstrations, or for
    user data the best-ranked (chosen) responses. InstructGPT biased its RM so that the
    demonstrations score mean 0 before RL."""
    if (world := world_of(cfg.data.train, cfg.data.world_seed)) is not None:
        pairs = [(d.prompt, d.response) for d in world.demonstrations(cfg.norm_examples, "train")]
    else:
        pairs = [(r.prompt, r.completions[r.ranks.index(0)]) for r in train[: cfg.norm_examples]]
    seqs = [encode(tokenizer, p, c, cfg.data.max_seq_len, encoder) for p, c in pairs]
    model.eval()
    values = torch.cat([scalar_rewards(model, seqs[i : i + cfg.eval_batch_size], tokenizer.pad_token_id)
                        for i in range(0, len(seqs), cfg.eval_batch_size)])
    return float(values.mean()), float(values.std()) if len(values) > 1 else 1.0


def model_card(encoder: bool, mean: float | None, std: float | None, max_len: int) -> str:
    """The README.md saved into a reward-model folder: how to score with plain transformers (the
    layout rlhfkit trained on), and raw vs normalised scores."""
    if encoder:
        layout = ("The text read is the conversation as `User: ...` / `Assistant: <response>` turns joined by blank "
                  "lines, tokenized with special tokens; the head reads `[CLS]` (see `rlhfkit.reward.encode`).")
        example, cut = "", "keeping `[CLS]` and the end"
    else:
        layout = ("Score the conversation exactly as the tokenizer's chat template tokenizes it, ending with the "
                  "assistant's response (for ChatML `...<|im_end|>\\n`); the head reads its last token. A right-padded "
                  "batch with an attention mask gives the same scores (the head takes each row's last non-pad token). "
                  "`FOLDER` is this folder:")
        code = [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "tok, rm = AutoTokenizer.from_pretrained(FOLDER), "
            "AutoModelForSequenceClassification.from_pretrained(FOLDER)",
            'chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]',
            'raw = rm(**tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt"))'
            ".logits[0, 0].item()",
            f"normalised = raw - rm.config.{MEAN_KEY}",
        ]
        example = "```python\n" + "\n".join(code) + "\n```\n\n"
        cut = "by dropping the oldest prompt tokens first, then the response's end"
    if mean is None:
        scores = ("No reference mean was stored (`normalize: false`): `RewardModel.score` returns the raw score "
                  "either way.")
    else:
        scores = (f"`config.json` holds `{MEAN_KEY}` = {mean:.6g}, the mean raw score of reference responses "
                  f"(demonstrations, or the best-ranked responses of the training data), and `{STD_KEY}` = "
                  f"{std:.6g}, their std (stored, not applied). The normalised score is raw - `{MEAN_KEY}`, so "
                  "reference responses average 0: what `RewardModel.score` returns by default and what rlhfkit's "
                  "RL stages optimise; `RewardModel.score(..., normalized=False)` returns the raw score.")
    return (
        "# Reward model (rlhfkit)\n\n"
        "A scalar reward model trained by `rlhfkit rm`: an `AutoModelForSequenceClassification` with `num_labels=1`. "
        "Higher is better; only differences between responses to the same prompt are meaningful.\n\n"
        f"## Loading\n\n{layout}\n\n{example}"
        "With rlhfkit: `RewardModel.load(FOLDER).score([prompt], [response])` (prompt: text or messages).\n\n"
        "## Raw and normalised scores\n\n"
        "The raw score is the head's output, `logits[:, 0]`: what a plain transformers load returns. "
        f"{scores}\n\n"
        "## Length\n\n"
        f"Trained on sequences of at most {max_len} tokens. rlhfkit cuts a longer one (`RewardModel.load(max_len=...)`,"
        f" default 512) {cut}; a plain load of the whole conversation scores other tokens, so the two agree only "
        "for sequences within that length.\n"
    )


# --- the stage ----------------------------------------------------------------------------------


@stage
def train(cfg: RMConfig) -> Path:
    acc, out = begin_stage(cfg)
    say = acc.print

    # 1-2. Rankings -> groups of token ids (every completion of a prompt stays together).
    # Sampled rankings: every process samples its share; the main process writes the cache
    train_rankings, eval_rankings = load_rankings(cfg.data, cfg.model, cfg.run.seed, out)
    encoder = backbone_is_encoder(cfg.model.name, cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, chat=not encoder)
    truncation = TruncationReport()
    train_groups = to_groups(tokenizer, train_rankings, cfg.data.max_seq_len, encoder, truncation)
    eval_groups = to_groups(tokenizer, eval_rankings, cfg.data.max_seq_len, encoder)
    if not train_groups:
        raise RlhfkitError(f"no training comparisons or rankings in {cfg.data.train}")
    ks = sorted({len(g.seqs) for g in train_groups})
    say(f"reward model data: {len(train_groups)} train / {len(eval_groups)} held-out prompts; K in {ks}; "
        f"completions: {truncation.summary(cfg.data.max_seq_len)}")

    # 3. Backbone + scalar head (head reads the last real token, the EOS), optionally LoRA.
    model = build_reward_model(cfg.model.name, tokenizer, cfg.run.seed, cfg.model.trust_remote_code)
    if cfg.model.lora:
        model = apply_lora(model, cfg.model, task_type="SEQ_CLS")
    run = start_training(acc, out, model, cfg.optim, cfg.run, cfg.batch, len(train_groups), "rm",
                         gradient_checkpointing=cfg.model.gradient_checkpointing)
    pad_id = tokenizer.pad_token_id

    @run.evaluation
    def held_out(step: int) -> dict[str, float]:
        if not eval_groups:
            return {}
        with acc.autocast():
            metrics = {f"eval/{k}": v for k, v in evaluate(run.raw_model, eval_groups, pad_id, cfg.eval_batch_size).items()}
        run.bar.print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    if run.start_step == 0:
        run.log.log(0, held_out(0))

    # 4. Loop: each prompt's K completions in one forward; loss = mean over prompts of the K-wise
    # loss, normalised by the global batch's prompt count (accumulation == one big batch).
    world_size, global_batch = acc.num_processes, run.global_batch
    train_seconds, metrics = 0.0, {}
    for step in range(run.start_step, cfg.run.steps):
        t_step = time.perf_counter()
        _, mine = run.step_batches(step)
        sums = defaultdict(lambda: torch.zeros(()))
        for m, micro in enumerate(mine):
            groups = [train_groups[i] for i in micro]
            with sync_gradients(acc, run.model, last=m == len(mine) - 1):
                with acc.autocast():  # packed forwards run outside the autocast patched into forward
                    rewards, ranks, valid, margin = group_rewards(run.model, groups, pad_id)
                loss, _ = ranking_loss(rewards, ranks, valid, margin)
                total = loss.sum() + cfg.center_coef * center_penalty(rewards, valid).sum()
                run.backward(total / global_batch * world_size)
            stats = pair_stats(rewards.detach(), ranks, valid)
            sums["loss"] += loss.detach().sum().cpu()
            for key in ("pairs", "correct", "best", "worst"):
                sums[key] += stats[key].sum().cpu()
        done = step + 1
        totals = {k: float(run.sum(v)) for k, v in sums.items()}
        grad_norm, skipped = run.update(done, totals["loss"] / global_batch)
        train_seconds += time.perf_counter() - t_step
        metrics = {"train/loss": totals["loss"] / global_batch,
                   "train/accuracy": totals["correct"] / max(totals["pairs"], 1.0),
                   "train/reward_best": totals["best"] / global_batch, "train/reward_worst": totals["worst"] / global_batch,
                   "train/grad_norm": grad_norm, "train/skipped": float(skipped), "train/lr": run.scheduler.get_last_lr()[0],
                   "train/prompts_per_s": (done - run.start_step) * global_batch / max(train_seconds, 1e-9)}
        run.bar.update(done, f"loss {metrics['train/loss']:.4f}  acc {metrics['train/accuracy']:.2f}")
        due = run.end_step(done, metrics)
        if due.eval:
            metrics.update(held_out(done))
        if due.log:
            run.log.log(done, metrics)
        if due.checkpoint:
            run.checkpoint(done)

    # 5. Normalise on reference responses, then save a plain sequence-classification folder.
    def save(out: Path, model: torch.nn.Module) -> None:
        if cfg.model.lora:  # the adapter and the fully trained head, before merging in place
            save_adapter(model, out)
        final = model.merge_and_unload() if cfg.model.lora else model
        if cfg.normalize:
            with acc.autocast():
                mean, std = reference_stats(final, tokenizer, cfg, train_rankings, encoder)
            setattr(final.config, MEAN_KEY, mean)
            setattr(final.config, STD_KEY, std)
            say(f"reference responses: raw reward mean {mean:.4f}, std {std:.4f} (stored; scores are shifted by -mean)")
        final.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        card = model_card(encoder, getattr(final.config, MEAN_KEY, None), getattr(final.config, STD_KEY, None),
                          cfg.data.max_seq_len)
        (out / "README.md").write_text(card)

    return run.finish(metrics, held_out, save)
