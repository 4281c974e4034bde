"""GRPO and RLOO: policy gradient where a prompt's other samples are the baseline (no value model).

Each step, top to bottom: 1. take P prompts, 2. sample G responses each (KV cache, stop at EOS),
3. score them (reward model, gold judge or function), 4. group advantages (GRPO: normalised by the
group's mean and std; RLOO: leave-one-out mean), one per response, 5. one update: the on-policy
loss per token (plus optional k3 KL to the reference), aggregated per token or per sequence over
the whole batch, in micro-batches; responses with zero advantage are skipped when there is no
KL term (their gradient is exactly 0), 6. log. DeepSeekMath (Shao et al. 2024), Ahmadian et al. 2024.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.advantages import equal_reward_groups, group_advantages
from rlhfkit.config import (
    BatchConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    exact_div,
    require_positive,
)
from rlhfkit.data.sources import gold_prompts, load_prompts, world_of
from rlhfkit.data.tokenize import prompt_ids
from rlhfkit.errors import ConfigError
from rlhfkit.eval.policy import (
    PolicyEvaluator,
    frozen_reference,
    remember_reference_answers,
)
from rlhfkit.eval.scorers import reward_function
from rlhfkit.generation import Sampler, request_seeds, sampling_logprobs
from rlhfkit.logprobs import logprobs as response_logprobs
from rlhfkit.losses import aggregate_loss, policy_gradient_loss, truncated_importance_weights
from rlhfkit.models import apply_lora, frozen_copy, load_model, load_tokenizer, save_model
from rlhfkit.records import join, select
from rlhfkit.train.loop import begin_stage, stage, start_training, sync_gradients


@dataclass
class GRPOAlgoConfig:
    """Policy gradient with a group baseline: G samples per prompt, no value model."""

    prompts_per_step: int = 8
    """Prompts per update."""
    group_size: int = 4
    """Samples per prompt (G); the group's other samples are the baseline."""
    baseline: Literal["grpo", "rloo"] = "grpo"
    """`grpo`: (r - group mean) / group std; `rloo`: r - mean of the other G-1 samples."""
    loss_aggregation: Literal["token", "sequence"] = "token"
    """`token`: every token of the batch weighs the same (DAPO); `sequence`: each response's token
    mean, then the mean over responses (the GRPO paper)."""
    kl_coef: float = 0.0
    """k3 KL to the reference in the loss (GRPO used 0.04; 0 keeps no reference model)."""
    temperature: float = 1.0
    """Sampling temperature; logprobs are computed at the same temperature."""
    max_new_tokens: int = 48
    """Response length limit."""
    missing_eos_penalty: float | None = None
    """Reward given instead of the scorer's to an answer cut at max_new_tokens (it never reached EOS; a reward model, which appends the end-of-turn token, would score it as finished); None keeps the scorer's."""
    mask_truncated: bool = False
    """Leave answers cut at max_new_tokens out of the loss (TRL's mask_truncated_completions); they still count in their group's baseline."""
    micro_batch_size: int = 16
    """Responses per forward/backward (the update still covers the whole step)."""


@dataclass
class GRPOConfig:
    """GRPO / RLOO against a reward: sample a group per prompt, reinforce the better-than-group answers."""

    recipe: str = ""
    """Recipe name or YAML path whose `grpo:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (usually the SFT output)."""
    reward: str = "gold"
    """A reward-model folder, `gold` (the world's gold judge), or `module:function` taking (prompts, responses)."""
    prompts: str = "world"
    """Training prompts: `world` or a file of prompt records."""
    world_prompts: int = 2000
    """World training prompts."""
    world_seed: int = 0
    """Seed of the world's prompt generator."""
    algo: GRPOAlgoConfig = field(default_factory=GRPOAlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant"))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/grpo", steps=50, eval_every=0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        require_positive(self, "algo.prompts_per_step", "algo.max_new_tokens", "algo.micro_batch_size", "run.steps",
                         "run.save_every")
        if self.algo.group_size < 2:
            raise ConfigError(f"algo.group_size must be at least 2 (the group is the baseline), got {self.algo.group_size}")
        if self.algo.kl_coef < 0:
            raise ConfigError(f"algo.kl_coef must be >= 0, got {self.algo.kl_coef}")
        self.rollout.check(self.model.lora)



@stage
def train(cfg: GRPOConfig) -> Path:
    acc, out = begin_stage(cfg)
    algo, say = cfg.algo, acc.print
    # Each process samples and scores its share of the step's prompts, whole groups each.
    exact_div(algo.prompts_per_step, acc.num_processes, "algo.prompts_per_step / processes")

    # The policy; a frozen reference only when the KL term needs one (LoRA: adapters disabled).
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    policy = load_model(cfg.model, tokenizer, seed=cfg.run.seed)
    reference = None
    if cfg.model.lora:
        policy = apply_lora(policy, cfg.model)
    elif algo.kl_coef > 0:
        reference = frozen_copy(policy, cfg.model.offload_frozen)
    score_fn = reward_function(cfg.reward, cfg.world_seed, cfg.model.precision, cfg.model.offload_frozen)
    world = world_of(cfg.prompts, cfg.world_seed)  # None for a prompts file: no gold judge
    prompts = load_prompts(cfg.prompts, cfg.world_prompts, "train", cfg.world_seed, say)
    encoded = [prompt_ids(tokenizer, p.messages) for p in prompts]
    gold = gold_prompts(cfg.prompts, cfg.eval.gold_prompts, cfg.world_seed) if acc.is_main_process else []

    run = start_training(acc, out, policy, cfg.optim, cfg.run,
                         BatchConfig(micro_batch_size=algo.prompts_per_step // acc.num_processes), len(prompts), "grpo",
                         gradient_checkpointing=cfg.model.gradient_checkpointing)
    policy = run.raw_model
    keeps_reference = reference is not None or cfg.model.lora
    evaluator = PolicyEvaluator(policy, (lambda: frozen_reference(policy, reference)) if keeps_reference else None,
                                tokenizer, world, gold, algo.max_new_tokens, cfg.eval.batch_size,
                                cfg.model.precision, algo.temperature, say=run.bar.print)
    with run.whole_weights():
        if not keeps_reference and gold:  # the SFT answers, for the final win rate
            remember_reference_answers(evaluator, out / "data" / "reference_answers.json", resuming=run.start_step > 0)

    @run.evaluation
    def evaluate(step: int) -> dict[str, float]:
        return evaluator(step, final=step == cfg.run.steps)

    if run.start_step == 0 and cfg.eval.at_start:
        run.log.log(0, evaluate(0))
    sampler = Sampler(policy, tokenizer, cfg.rollout, cfg.model.precision, cfg.run.seed)

    group, metrics = algo.group_size, {}
    correct = cfg.rollout.importance_cap > 0  # truncated importance sampling (sampler != trainer)
    for step in range(run.start_step, cfg.run.steps):
        t0 = time.perf_counter()
        # 1-2. P prompts, G samples each (a per-step seed: resuming replays the same samples; one
        # seed per response, so a process samples what one process would for its share).
        _, (mine,) = run.step_batches(step)
        batch_prompts = [prompts[i] for i in mine for _ in range(group)]
        seeds = request_seeds(cfg.run.seed * 1_000_003 + step, algo.prompts_per_step * group)
        with acc.autocast(), run.whole_weights():  # answers end at different lengths on each process
            gens = sampler.generate([p.messages for p in batch_prompts], algo.max_new_tokens, algo.temperature,
                                    len(batch_prompts), seeds[run.my_slice(len(seeds))], logprobs=correct)
        seqs = join([encoded[i] for i in mine for _ in range(group)], [g.token_ids for g in gens], tokenizer.pad_token_id)
        mask = seqs.response_mask.float().to(acc.device)
        sampled = sampling_logprobs(gens, mask.shape[1]).to(acc.device) if correct else None

        # 3-4. Rewards and group advantages, one per response.
        rewards = torch.tensor(score_fn(batch_prompts, [g.text for g in gens]), dtype=torch.float32).view(-1, group)
        cut = torch.tensor([not g.finished for g in gens])  # reached max_new_tokens without an EOS
        if algo.missing_eos_penalty is not None:
            rewards.view(-1)[cut] = algo.missing_eos_penalty
        advantages = group_advantages(rewards, algo.baseline).view(-1).to(acc.device)
        all_rewards = run.gather(rewards)
        equal = equal_reward_groups(all_rewards)
        if equal.all():
            run.bar.print(f"step {step + 1}: every group's rewards are equal, so every advantage is 0 and this "
                          "step teaches nothing (raise the temperature or group size, or check the reward)")

        # 5. One update over the whole batch, in micro-batches (as many on every process: DDP and
        # FSDP meet in each; a process short of rows runs an empty one, its loss 0).
        response_tokens = int(run.sum(mask.sum()))
        kept = ~cut if algo.mask_truncated else torch.ones(len(gens), dtype=torch.bool)
        mask = mask * kept.to(mask.device)[:, None]  # cut answers' tokens out of the loss and its normalisation
        active = torch.nonzero(kept & ((advantages.cpu() != 0) | (algo.kl_coef > 0))).flatten()
        micro = list(active.split(algo.micro_batch_size)) if len(active) else []
        n_micro = int(run.max(torch.tensor(len(micro))))
        micro += [active[:0]] * (n_micro - len(micro))
        n_tokens = int(run.sum(mask.sum()))
        active_tokens = run.sum(mask[active].sum())
        n_sequences = algo.prompts_per_step * group
        kl_sum, non_finite, weight_sum = torch.zeros(()), torch.zeros(()), torch.zeros(())
        for m, rows in enumerate(micro):
            empty = len(rows) == 0
            rows = rows if not empty else torch.zeros(1, dtype=torch.long)
            sub = select(seqs, rows)  # cut to the micro-batch's own widths
            sub_mask = mask[rows, : sub.response_mask.shape[1]]
            with sync_gradients(acc, run.model, last=m == n_micro - 1), acc.autocast():
                logprobs = response_logprobs(run.model, sub, algo.temperature)
                ref_logprobs = None
                if algo.kl_coef > 0:
                    with torch.no_grad(), frozen_reference(policy, reference) as ref:
                        ref_logprobs = response_logprobs(ref, sub, algo.temperature)
                weights = None
                if correct:  # the sampler's probabilities are not exactly the trainer's
                    weights = truncated_importance_weights(logprobs.detach(), sampled[rows, : sub_mask.shape[1]],
                                                           sub_mask, cfg.rollout.importance_cap)
                    weight_sum += float(weights.sum()) if not empty else 0.0
                per_token, stats = policy_gradient_loss(logprobs, advantages[rows], sub_mask, ref_logprobs, algo.kl_coef,
                                                        weights)
                loss = aggregate_loss(per_token, sub_mask, algo.loss_aggregation, n_tokens, n_sequences)
                finite = bool(torch.isfinite(loss))
                if empty or not finite:  # a NaN/inf reward or logprob would poison the weights: left out, said below
                    non_finite += 0 if empty else 1
                    loss = logprobs.sum() * 0.0 if acc.num_processes > 1 else None  # the others meet this backward
                if loss is not None:  # DDP averages over processes; each process's loss is its share of the sum
                    run.backward(loss * acc.num_processes)
            if not empty:
                kl_sum += float(stats.get("kl", 0.0)) * float(sub_mask.sum())
        done = step + 1
        kl_sum, non_finite, weight_sum = run.sum(kl_sum), int(run.sum(non_finite)), run.sum(weight_sum)
        grad_norm, skipped = run.update(done, None)  # non-finite micro-batches were left out above
        sampler.load_weights(policy)  # vLLM samples the next step from the updated weights
        if non_finite:
            run.bar.print(f"step {done}: non-finite loss in {non_finite} micro-batch(es), left out of the update "
                          f"(rewards this step: {all_rewards.flatten().tolist()[:8]}...)")

        # 6. Log.
        finished = run.sum(torch.tensor(float(sum(g.finished for g in gens))))
        metrics = {"grpo/reward": float(all_rewards.mean()), "grpo/reward_std": float(all_rewards.std(-1).mean()),
                   "grpo/equal_reward_groups": float(equal.float().mean()), "grpo/kl": float(kl_sum) / max(n_tokens, 1),
                   "grpo/response_tokens": response_tokens / n_sequences,
                   "grpo/eos_fraction": float(finished) / n_sequences,
                   "grpo/grad_norm": grad_norm, "grpo/skipped": float(skipped),
                   "grpo/seconds_per_step": time.perf_counter() - t0}
        if correct:
            metrics["grpo/importance_weight"] = float(weight_sum) / max(int(active_tokens), 1)
        if world is not None and cfg.reward != "gold":  # the true quality of what it sampled
            judged = world.judge_many(batch_prompts, [g.text for g in gens])
            metrics["grpo/gold_score"] = float(run.sum(torch.tensor(sum(s.score for s in judged)))) / n_sequences
        run.bar.update(done, f"reward {metrics['grpo/reward']:.3f}  equal {metrics['grpo/equal_reward_groups']:.2f}")
        due = run.end_step(done, metrics)
        if due.eval:
            metrics.update(evaluate(done))
        if due.log:
            run.log.log(done, metrics)
        if due.checkpoint:
            run.checkpoint(done)

    return run.finish(metrics, evaluate, save=lambda out, model: save_model(model, tokenizer, out))
