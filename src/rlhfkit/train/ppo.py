"""PPO against a reward model with a per-token KL penalty to the SFT policy (InstructGPT §3.5).

Each iteration, top to bottom: 1. sample prompts, 2. roll out one response each (KV cache, stop at
EOS), 3. recompute logprobs (temperature-scaled), reference logprobs and values with forward
passes, 4. score (reward model at the EOS; a fixed penalty when no EOS), 5. per-token
KL-penalised rewards, GAE, whitened advantages, 6. PPO epochs over minibatches (clipped policy
and value losses), 7. adapt the KL coefficient, log. Every tensor is (B, R) over response tokens,
masked after the first EOS.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.advantages import (
    KLController,
    gae,
    kl_penalised_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    same,
)
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
from rlhfkit.data.formats import read_demonstrations
from rlhfkit.data.sources import gold_prompts, load_prompts, world_of
from rlhfkit.data.tokenize import Example, prompt_ids, tokenize_demonstrations
from rlhfkit.errors import ConfigError
from rlhfkit.eval.policy import PolicyEvaluator
from rlhfkit.eval.scorers import reward_function
from rlhfkit.generation import Sampler, request_seeds, sampling_logprobs
from rlhfkit.logprobs import demonstration_nll, logprobs, running_in, token_values
from rlhfkit.losses import ppo_policy_loss, ppo_value_loss, truncated_importance_weights
from rlhfkit.models import (
    apply_lora,
    frozen_copy,
    frozen_reference,
    load_model,
    load_tokenizer,
    save_model,
)
from rlhfkit.records import PPOStats, Scored, Sequences, join
from rlhfkit.train import sharding
from rlhfkit.train.loop import DataOrder, begin_stage, stage, start_training, sync_gradients
from rlhfkit.value import save_value_model, value_model


@dataclass
class PPOAlgoConfig:
    """PPO and its RLHF details (InstructGPT §3.5/App. C; the N+ implementation details)."""

    prompts_per_step: int = 16
    """Prompts sampled per PPO iteration (one response each)."""
    minibatch_size: int = 8
    """Rollouts per PPO update; prompts_per_step must be a multiple of it."""
    grad_accum: int = 1
    """Micro-batches each process splits its share of a minibatch into (memory, not maths: the
    update is the same)."""
    epochs: int = 4
    """PPO epochs over each iteration's rollouts."""
    temperature: float = 1.0
    """Sampling temperature; logprobs are recomputed with the same temperature."""
    max_new_tokens: int = 48
    """Response length limit; responses that never end get `missing_eos_penalty`."""
    clip: float = 0.2
    """Policy ratio clip."""
    value_clip: float = 0.2
    """Value clip around the rollout-time values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """Initial per-token KL penalty coefficient (beta)."""
    kl_target: float = 0.0
    """Adaptive KL: target KL per sequence (0 = fixed coefficient)."""
    kl_horizon: int = 10000
    """Adaptive KL horizon in samples."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward."""
    missing_eos_penalty: float | None = -1.0
    """Score given instead of the RM score to a response that never produced EOS (cut at max_new_tokens); None keeps the RM's score."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance before GAE (the mean is kept)."""
    ptx_coef: float = 0.0
    """PPO-ptx (InstructGPT gamma): weight of an SFT loss on demonstrations mixed into every update (0 = off)."""
    ptx_data: str = "world"
    """PPO-ptx demonstrations: `world` or a demonstrations file."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the policy weights, updated once per PPO step and saved to OUT/ema (0 = off)."""


@dataclass
class PPOConfig:
    """PPO against a reward model with a per-token KL penalty to the SFT policy."""

    recipe: str = ""
    """Recipe name or YAML path whose `ppo:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (usually the SFT output); also the frozen reference."""
    reward: str = "gold"
    """Reward: a reward-model folder, `gold` (the world's gold judge), or `module:function` taking (prompts, responses)."""
    value_model: str = ""
    """Value model initialisation: empty = the reward-model folder (or, for other rewards, the policy with a new head)."""
    prompts: str = "world"
    """Training prompts: `world` or a file of prompt records."""
    world_prompts: int = 2000
    """World training prompts."""
    world_seed: int = 0
    """Seed of the world's prompt generator."""
    algo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/ppo", steps=50, eval_every=0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        require_positive(self, "algo.prompts_per_step", "algo.minibatch_size", "algo.grad_accum", "algo.epochs",
                         "algo.max_new_tokens", "run.steps", "run.save_every")
        exact_div(self.algo.prompts_per_step, self.algo.minibatch_size, "algo.prompts_per_step / algo.minibatch_size")
        if not 0 <= self.algo.ema_decay < 1:
            raise ConfigError(f"algo.ema_decay must be in [0, 1), got {self.algo.ema_decay}")
        if self.algo.ptx_coef < 0:
            raise ConfigError(f"algo.ptx_coef must be >= 0, got {self.algo.ptx_coef}")
        self.rollout.check(self.model.lora)


# --- models and rewards -----------------------------------------------------------------------


class PolicyAndValue(torch.nn.Module):
    """The two trained models under one optimizer and one checkpoint, and the forward every
    update runs: logprobs (at the sampling temperature), entropy and values, (b, R) each. Called
    through its DDP / FSDP wrapper, so gradients are synchronised across processes."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module, temperature: float):
        super().__init__()
        self.policy, self.value, self.temperature = policy, value, temperature

    forward_methods = ("demonstration_nll",)  # forwards of the trained models besides forward (FSDP gathers for them)

    def forward(self, sub: Sequences) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (*logprobs(self.policy, sub, self.temperature, with_entropy=True), token_values(self.value, sub))

    def demonstration_nll(self, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, int]:
        """PPO-ptx: the policy's summed NLL of demonstrations, and their token count."""
        return demonstration_nll(self.policy, examples, pad_id)


def value_source(cfg: PPOConfig) -> str:
    """Where the critic starts: ``--value-model``, else the reward model (N+ detail 11), else, for
    gold or function rewards, the policy's own backbone."""
    return cfg.value_model or (cfg.reward if Path(cfg.reward).is_dir() else cfg.model.name)


class FirstForwardKept:
    """The policy-and-value forward, where the first call of an iteration's updates is answered by
    the forward the rollout-time logprobs came from: same weights, same rows, so it is the same
    computation, and it keeps its graph so the first update's backward can use it (one forward
    fewer per step)."""

    def __init__(self, forward, kept: tuple[torch.Tensor, ...]):
        self.forward, self.kept = forward, kept

    def __call__(self, sub: Sequences) -> tuple[torch.Tensor, ...]:
        kept, self.kept = self.kept, None  # its graph is freed by the first update's backward
        return kept if kept is not None else self.forward(sub)


def rollout_forwards(first: tuple[torch.Tensor, ...], forward, reference, seqs: Sequences,
                     micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(logprobs, entropy, values, ref_logprobs), each (B, R), computed micro-batch by micro-batch
    on the first epoch's rows at the whole batch's widths: the very inputs the first updates see
    (in bf16 another batch layout moves logprobs by ~1e-3, and the first ratio would not be 1).
    ``first``: the first micro-batch's forward, already run with its graph (kept for the first
    update); the rest run through ``forward`` without one."""
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for index, rows in enumerate(micro_batches):
            sub = seqs[rows]
            parts = (*(t.detach() for t in (first if index == 0 else forward(sub))), reference(sub))
            if not outputs:
                outputs = [part.new_zeros((len(seqs),) + part.shape[1:]) for part in parts]
            for whole, part in zip(outputs, parts):
                whole[rows] = part
    return tuple(outputs)


def epoch_micro_batches(generator: torch.Generator, rows: int, minibatch_size: int, shards: int,
                        mine: range) -> list[list[torch.Tensor]]:
    """One epoch's shuffle: for each update, this process's micro-batches (local row indices).

    The step's rollouts are cut into ``shards`` equal blocks (processes x grad_accum, in process
    order; a process holds its own blocks only) and each block is shuffled on its own: update u
    takes the u-th slice of every block's permutation, shard k being micro-batch k of that
    update. The permutations depend on the shard count alone, so 2 processes x 1 micro-batch see
    what 1 process x 2 micro-batches sees; with one shard this is a plain shuffle of the batch.
    ``mine``: the shards this process holds."""
    block, per_update = rows // shards, minibatch_size // shards
    perms = [torch.randperm(block, generator=generator) for _ in range(shards)]
    updates = rows // minibatch_size
    return [[(k - mine.start) * block + perms[k][u * per_update : (u + 1) * per_update] for k in mine]
            for u in range(updates)]


class EMA:
    """An exponential moving average of the trainable policy weights (InstructGPT keeps one),
    updated once per PPO step; checkpointed with the run and saved as a model in OUT/ema."""

    def __init__(self, model: torch.nn.Module, decay: float, saved: dict[str, torch.Tensor] | None = None):
        self.decay = decay
        with sharding.readable(model):  # FSDP: this process's shards; ZeRO-3: gathered whole
            self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        for key, value in (saved or {}).items():
            if key.startswith("ema."):  # whole: this process keeps its shard under FSDP
                self.shadow[key[4:]] = sharding.like(self.shadow[key[4:]], value)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        with sharding.readable(model):
            for name, p in model.named_parameters():
                if name in self.shadow:
                    self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averages, whole (gathered under FSDP: every process must call it)."""
        return {f"ema.{name}": sharding.full_tensor(t) for name, t in self.shadow.items()}

    @staticmethod
    def averaged_copy(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A copy of the (whole) ``model`` holding the averages ``tensors``."""
        averaged = copy.deepcopy(model)
        params = dict(averaged.named_parameters())
        with torch.no_grad():
            for key, t in tensors.items():
                params[key[4:]].copy_(t)
        return averaged


PTX_MAX_LEN = 1024  # demonstration tokens per PPO-ptx example (longer ones lose old context first)


def ptx_examples(cfg: PPOConfig, tokenizer) -> list[Example]:
    """Demonstrations for PPO-ptx: the SFT-style loss keeps the policy close to good answers
    while PPO chases the reward (InstructGPT mixes in pretraining data the same way)."""
    if (world := world_of(cfg.algo.ptx_data, cfg.world_seed)) is not None:
        demos = world.demonstrations(cfg.world_prompts, "train")
    else:
        demos, report = read_demonstrations(cfg.algo.ptx_data)
        print(report.summary())
    return tokenize_demonstrations(tokenizer, demos, PTX_MAX_LEN)[0]


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, total=same) -> float:
    """1 - Var(returns - values) / Var(returns): how much of the return the critic explains."""
    var_returns = masked_var(returns, mask, total=total)
    return float(1.0 - masked_var(returns - values, mask, total=total) / var_returns.clamp(min=1e-8))


# --- the stage --------------------------------------------------------------------------------


@stage
def train(cfg: PPOConfig) -> Path:
    acc, out = begin_stage(cfg)
    algo, say = cfg.algo, acc.print
    # Every process rolls out, scores and trains on its own blocks of each step's prompts: the
    # batch is cut into shards (processes x grad_accum), each minibatch taking rows of every shard.
    shards = acc.num_processes * algo.grad_accum
    exact_div(algo.minibatch_size, shards, "algo.minibatch_size / (processes x algo.grad_accum)")
    local = algo.prompts_per_step // acc.num_processes

    # Models: the policy (trained), the frozen reference (the same SFT weights), the value model.
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    policy = load_model(cfg.model, tokenizer, seed=cfg.run.seed)
    if cfg.model.lora:  # the reference is the same model with its adapters disabled
        policy, reference = apply_lora(policy, cfg.model), None
    else:
        reference = frozen_copy(policy, cfg.model.offload_frozen)
    models = PolicyAndValue(policy, value_model(value_source(cfg), cfg.model, tokenizer, cfg.run.seed),
                            algo.temperature)
    score_fn = reward_function(cfg.reward, cfg.world_seed, cfg.model.precision, cfg.model.offload_frozen)
    world = world_of(cfg.prompts, cfg.world_seed)  # None for a prompts file: no gold judge
    ptx = ptx_examples(cfg, tokenizer) if algo.ptx_coef > 0 else []
    prompts = load_prompts(cfg.prompts, cfg.world_prompts, "train", cfg.world_seed, say)
    encoded = [prompt_ids(tokenizer, p.messages) for p in prompts]
    gold = gold_prompts(cfg.prompts, cfg.eval.gold_prompts, cfg.world_seed) if acc.is_main_process else []

    updates_per_step = algo.epochs * (algo.prompts_per_step // algo.minibatch_size)
    run = start_training(acc, out, models, cfg.optim, cfg.run, BatchConfig(micro_batch_size=local),
                         len(prompts), "ppo", schedule_steps=cfg.run.steps * updates_per_step,
                         gradient_checkpointing=cfg.model.gradient_checkpointing)
    kl_ctl = KLController(run.state.get("kl_coef", algo.kl_coef), algo.kl_target or None, algo.kl_horizon)
    ema = EMA(policy, algo.ema_decay, run.state.get("tensors")) if algo.ema_decay else None
    ptx_order = DataOrder(len(ptx), cfg.run.seed + 1)
    pad_id = tokenizer.pad_token_id
    mine = run.my_shards(algo.grad_accum)

    sampler = Sampler(policy, tokenizer, cfg.rollout, cfg.model.precision, cfg.run.seed)
    evaluator = PolicyEvaluator(policy, lambda: frozen_reference(policy, reference), tokenizer, world, gold,
                                algo.max_new_tokens, cfg.eval.batch_size, cfg.model.precision, algo.temperature,
                                run.bar.print)

    @run.evaluation
    def evaluate(step: int) -> dict[str, float]:
        return evaluator(step, final=step == cfg.run.steps)

    if run.start_step == 0 and cfg.eval.at_start:
        run.log.log(0, evaluate(0))

    def reference_logprobs(sub: Sequences) -> torch.Tensor:
        # LoRA's reference is the policy, called outside the root's forward: under FSDP, gathered
        with run.whole_weights() if reference is None else contextlib.nullcontext(), \
                frozen_reference(policy, reference) as ref:
            return logprobs(ref, sub, algo.temperature)

    def forward_gap(kept: tuple[torch.Tensor, ...], sub: Sequences) -> float:
        """Largest |logprob or value| difference between the kept forward and a fresh no-grad one of
        the same micro-batch: 0 unless forwards are not deterministic (dropout left on, a
        non-deterministic kernel), which would make the rollout's logprobs noise."""
        again = models(sub)
        gap = max(float((a - b.detach()).abs().max()) for a, b in zip(again[::2], kept[::2]))
        if gap > 1e-3:
            run.bar.print(f"warning: the same forward gave logprobs/values {gap:.2e} apart: "
                          "PPO's ratios will not start at 1 (dropout on? a non-deterministic kernel?)")
        return gap

    def logprob_rounding(kept: tuple[torch.Tensor, ...], sub: Sequences) -> float:
        """Mean |logprob in the stage's precision - the same in fp32| over the micro-batch's response
        tokens (0 in fp32): how much of each logprob, so of each ratio and KL term, is rounding.
        Under bf16, ~0.02 per token on SmolLM2 against a ~6e-4 change per update (issue 27). The
        policy is called directly: the prepared model's forward carries accelerate's autocast."""
        with run.whole_weights(), running_in("fp32"):
            exact = logprobs(policy, sub, algo.temperature)
        mask = sub.response_mask.to(exact.device).bool()
        return float((kept[0].detach() - exact).abs()[mask].mean()) if mask.any() else 0.0

    def first_train_forward(sub: Sequences) -> tuple[torch.Tensor, ...]:
        # the first update's first micro-batch; DDP decides at the forward whether its backward syncs
        with sync_gradients(acc, run.model, last=algo.grad_accum == 1):
            return run.model(sub)

    # What each update reduces over processes: its loss share, the diagnostics' token-weighted
    # sums (divided by the minibatch's tokens), PPO-ptx's share, and a count of non-finite losses.
    STATS = ("loss", "pg_loss", "vf_loss", "vf_clipfrac", "clipfrac", "approx_kl", "ratio", "ptx_loss", "non_finite")
    metrics: dict[str, float] = {}
    metrics_first: dict[str, float] = {}  # logged at a run's first step only
    correct = cfg.rollout.importance_cap > 0
    for step in range(run.start_step, cfg.run.steps):
        t0 = time.perf_counter()
        # 1-2. Prompts and rollouts (a per-step seed: resuming replays the same samples; a seed per
        # prompt, so each process samples what one process would for its share).
        _, (indices,) = run.step_batches(step)
        batch_prompts = [prompts[i] for i in indices]
        seeds = request_seeds(cfg.run.seed * 1_000_003 + step, algo.prompts_per_step)
        with run.whole_weights():  # answers end at different lengths on each process
            gens = sampler.generate([p.messages for p in batch_prompts], algo.max_new_tokens, algo.temperature,
                                    local, seeds[run.my_slice(len(seeds))], logprobs=correct)
        seqs = join([encoded[i] for i in indices], [g.token_ids for g in gens], pad_id)
        mask = seqs.response_mask.float().to(acc.device)  # 1 up to and including the first EOS
        t_rollout = time.perf_counter()

        # 3. Logprobs (same temperature as sampling), reference logprobs and values, on the first
        # PPO epoch's micro-batches (every epoch's shuffle is drawn here); the first update reuses
        # the first micro-batch's forward (``rollout_forwards``).
        shuffle = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
        epochs = [epoch_micro_batches(shuffle, algo.prompts_per_step, algo.minibatch_size, shards, mine)
                  for _ in range(algo.epochs)]
        micro = [rows for update in epochs[0] for rows in update]
        first = first_train_forward(seqs[micro[0]])
        old_logprobs, entropy, values, ref_logprobs = rollout_forwards(first, models, reference_logprobs, seqs, micro)
        forward = FirstForwardKept(run.model, first)
        # Truncated importance sampling: the sampler's probabilities are not exactly the trainer's.
        weights = None
        if correct:
            sampled = sampling_logprobs(gens, mask.shape[1]).to(acc.device)
            weights = truncated_importance_weights(old_logprobs, sampled, mask, cfg.rollout.importance_cap)
        if step == run.start_step:  # once a run: the graph-keeping forward must equal a no-grad one
            with torch.no_grad():
                gap = forward_gap(forward.kept, seqs[epochs[0][0][0]])
                rounding = logprob_rounding(forward.kept, seqs[epochs[0][0][0]])
            metrics_first = {"ppo/first_forward_gap": float(run.max(torch.tensor(gap))),
                             "ppo/logprob_rounding": float(run.sum(torch.tensor(rounding))) / acc.num_processes}

        # 4. Scores at the EOS; the "EOS trick" replaces the score of responses that never ended.
        texts = [g.text for g in gens]
        raw_scores = torch.tensor(score_fn(batch_prompts, texts), dtype=torch.float32, device=acc.device)
        finished = torch.tensor([g.finished for g in gens], device=acc.device)
        scores = raw_scores.clone()
        if algo.missing_eos_penalty is not None:  # 0 scores them 0
            scores[~finished] = algo.missing_eos_penalty

        # 5. Per-token KL-penalised rewards, GAE (gamma, lambda), advantages whitened over the
        # whole batch (every process's share).
        rewards, kl = kl_penalised_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value, algo.kl_estimator)
        if algo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, total=run.sum)
        advantages, returns = gae(rewards, values, mask, algo.gamma, algo.lam)
        advantages = masked_whiten(advantages, mask, total=run.sum)
        batch = Scored(seqs, mask, old_logprobs, values, advantages, returns)
        t_score = time.perf_counter()

        # 6. PPO epochs over shuffled minibatches, each a sum of every process's micro-batches
        # (losses divided by the minibatch's tokens, all processes').
        # Optional PPO-ptx: an SFT loss on demonstrations in every update (InstructGPT eq. 2, gamma).
        tokens = run.sum(torch.tensor([[float(mask[rows].sum()) for rows in update]
                                       for epoch in epochs for update in epoch]).sum(-1))
        update, stats, first_ratio = step * updates_per_step, PPOStats(), 1.0
        for minibatch in (update for epoch in epochs for update in epoch):
            n_tokens = tokens[update - step * updates_per_step].clamp(min=1)
            ptx_batch = [ptx[i] for i in ptx_order.batch(update, algo.minibatch_size)] if ptx else []
            ptx_tokens = max(sum(len(ex.response) for ex in ptx_batch), 1)
            sums = torch.zeros(len(STATS))
            for a, rows in enumerate(minibatch):
                # The batch's full widths, not the micro-batch's own (select() cuts them; GRPO does):
                # in bf16 another padding width moves padded logprobs, and the first ratio off 1.
                mb = batch[rows]
                with sync_gradients(acc, run.model, last=a == len(minibatch) - 1):
                    new_logprobs, _, new_values = forward(mb.seqs)
                    pg, pg_stats = ppo_policy_loss(new_logprobs, mb.logprobs, mb.advantages, mb.mask, algo.clip)
                    if weights is not None:
                        pg = pg * weights[rows]
                    vf, vf_stats = ppo_value_loss(new_values, mb.values, mb.returns, mb.mask, algo.value_clip)
                    ptx_loss = torch.zeros(())
                    if ptx:  # this shard's slice of the update's demonstrations
                        k, share = mine[a], algo.minibatch_size // shards
                        ptx_loss = run.raw_model.demonstration_nll(ptx_batch[k * share : (k + 1) * share], pad_id)[0] / ptx_tokens
                    pg_sum, vf_sum = masked_sum(pg, mb.mask), masked_sum(vf, mb.mask)
                    loss = pg_sum / n_tokens + algo.vf_coef * vf_sum / n_tokens + algo.ptx_coef * ptx_loss
                    finite = bool(torch.isfinite(loss))
                    # DDP averages over processes, and each one's loss is its share of the sum
                    # a non-finite loss backpropagates 0 through both models (DDP reduces every bucket)
                    run.backward((loss if finite else (new_logprobs.sum() + new_values.sum()) * 0.0) * acc.num_processes)
                n = float(mb.mask.sum())
                sums += torch.tensor([float(loss.detach()), float(pg_sum.detach()), float(vf_sum.detach()),
                                      n * float(vf_stats["value_clipfrac"]), n * float(pg_stats["clipfrac"]),
                                      n * float(pg_stats["approx_kl"]), n * float(pg_stats["ratio"]),
                                      float(ptx_loss.detach()), float(not finite)])
            sums = run.sum(sums)
            total = dict(zip(STATS, (sums / torch.cat([torch.ones(1), n_tokens.expand(6), torch.ones(2)])).tolist()))
            if update == step * updates_per_step:  # no update yet, so the ratio must be 1
                first_ratio = total["ratio"]
                if abs(first_ratio - 1) > 1e-3:
                    run.bar.print(f"warning: step {step + 1}: ratio {first_ratio:.4f} != 1 before the first update: "
                                  "the rollout's logprobs are not the policy's (rows mixed up? temperature?)")
            update += 1
            if total["non_finite"]:  # on every process alike: the update is skipped
                run.optimizer.zero_grad(set_to_none=True)
                total["loss"] = float("nan")
            run.update(step + 1, total["loss"], loss_has_scale=False)
            if total["non_finite"]:
                continue
            for name in STATS[1:-1]:
                getattr(stats, name).append(total[name])

        sampler.load_weights(policy)  # vLLM samples the next step from the updated weights
        t_train = time.perf_counter()
        # 7. EMA, KL controller, metrics (over every process's rollouts).
        if ema is not None:
            ema.update(policy)
        seq_kl = run.gather((kl * mask).sum(-1))
        all_scores, all_raw = run.gather(scores), run.gather(raw_scores)
        if float(seq_kl.mean()) < 0:
            run.bar.print(f"warning: step {step + 1}: mean KL to the reference is negative ({float(seq_kl.mean()):.4f})")
        shaped_by = kl_ctl.value  # the coefficient in this step's rewards; the controller sets the next one
        kl_ctl.update(float(seq_kl.mean()), len(seq_kl))
        done = step + 1
        metrics = {
            "ppo/score": float(all_raw.mean()), "ppo/kl": float(seq_kl.mean()), "ppo/kl_coef": shaped_by,
            "ppo/reward": float((all_scores - seq_kl * shaped_by).mean()),
            "ppo/entropy": float(masked_mean(entropy, mask, total=run.sum)),
            "ppo/response_tokens": float(run.sum(mask.sum())) / algo.prompts_per_step,
            "ppo/eos_fraction": float(run.gather(finished.float()).mean()),
            "ppo/explained_variance": explained_variance(values, returns, mask, run.sum),
            "ppo/seconds_per_step": time.perf_counter() - t0, "ppo/seconds_rollout": t_rollout - t0,
            "ppo/seconds_score": t_score - t_rollout, "ppo/seconds_train": t_train - t_score,
            "ppo/ratio_first_minibatch": first_ratio,
            **{f"ppo/{k}": v for k, v in stats.means().items()}, **metrics_first,
        }
        metrics_first = {}
        if weights is not None:
            metrics["ppo/importance_weight"] = float(masked_mean(weights, mask, total=run.sum))
        if world is not None:
            judged = sum(s.score for s in world.judge_many(batch_prompts, texts))
            metrics["ppo/gold_score"] = float(run.sum(torch.tensor(judged))) / algo.prompts_per_step
        run.bar.update(done, f"score {metrics['ppo/score']:.3f}  kl {metrics['ppo/kl']:.3f}")
        due = run.end_step(done, metrics)
        if due.eval:
            metrics.update(evaluate(done))
        if due.log:
            run.log.log(done, metrics)
        if due.checkpoint:
            run.checkpoint(done, state={"kl_coef": kl_ctl.value}, tensors=ema.tensors() if ema is not None else None)

    # Save the policy as a plain model folder and the value model beside it.
    averages = ema.tensors() if ema is not None else None  # on every process: FSDP gathers them

    def save(out: Path, trained: PolicyAndValue) -> None:
        save_model(trained.policy, tokenizer, out)
        save_value_model(trained.value.merge_and_unload() if cfg.model.lora else trained.value, out / "value_model")
        if averages is not None:
            save_model(EMA.averaged_copy(trained.policy, averages), tokenizer, out / "ema")

    return run.finish(metrics, evaluate, save)
