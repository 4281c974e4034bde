"""PPO against a reward model with a per-token KL penalty to the SFT policy (InstructGPT §3.5).

Each iteration, top to bottom: 1. sample prompts, 2. roll out one response each (KV cache, stop at
EOS), 3. recompute logprobs (temperature-scaled), reference logprobs and values with forward
passes, 4. score (reward model at the EOS; a fixed penalty when no EOS), 5. per-token
KL-penalised rewards, GAE, whitened advantages, 6. PPO epochs over minibatches (clipped policy
and value losses), 7. adapt the KL coefficient, log. Every tensor is (B, R) over response tokens,
masked after the first EOS.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from rlhfkit.advantages import KLController, gae, kl_penalised_rewards, masked_mean, masked_var, masked_whiten
from rlhfkit.config import BatchConfig, PPOConfig
from rlhfkit.data.formats import read_demonstrations, read_prompts
from rlhfkit.data.tokenize import Example, prompt_ids, tokenize_demonstrations
from rlhfkit.data.world import World
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.policy import PolicyEvaluator, frozen_reference
from rlhfkit.losses import ppo_policy_loss, ppo_value_loss
from rlhfkit.models import TINY, apply_lora, load_model, load_tokenizer, resolve, save_model
from rlhfkit.packing import packs_exactly, relative_gap, unwrap
from rlhfkit.reward import MEAN_KEY, build_reward_model, reward_function
from rlhfkit.rollout import (Sequences, demonstration_nll, generate, join, packed_response_hidden, probe_batch,
                             response_logprobs, scatter_responses)
from rlhfkit.train.loop import DataOrder, begin_stage, mark_complete, stage, start_training

# --- models and rewards -----------------------------------------------------------------------


class PolicyAndValue(torch.nn.Module):
    """The two trained models under one optimizer and one checkpoint."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module):
        super().__init__()
        self.policy, self.value = policy, value


def value_model(cfg: PPOConfig, tokenizer) -> torch.nn.Module:
    """Initialised from the reward model (N+ detail) unless told otherwise; for gold or function
    rewards, the policy's backbone with a fresh scalar head. It reads the policy's token ids, so
    its tokenizer must be the policy's. A folder with a trained scalar head (a reward model, or a
    value model saved by an earlier PPO run) keeps it, shifted onto PPO's normalised scale."""
    source = cfg.value_model or (cfg.reward if Path(cfg.reward).is_dir() else cfg.model.name)
    check_same_tokenizer(source, cfg.model.name, tokenizer)
    stored_mean = trained_head_mean(source)
    model = build_reward_model(source, tokenizer, cfg.run.seed, keep_head=stored_mean is not None)
    if stored_mean is not None:
        shift_head(model, stored_mean)
    return apply_lora(model, cfg.model, task_type="SEQ_CLS") if cfg.model.lora else model


def trained_head_mean(source: str) -> float | None:
    """The reward mean stored by the RM stage (or by ``save_value_model``) in a model folder's
    config; 0 for another scalar-head model (a reward model trained elsewhere: one label); None
    for folders without a trained scalar head (an SFT model, a hub id)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    fields = json.loads(config.read_text())
    if fields.get(MEAN_KEY) is not None:
        return float(fields[MEAN_KEY])
    return 0.0 if len(fields.get("id2label") or {}) == 1 else None


def save_value_model(value: torch.nn.Module, path: Path) -> None:
    """Save the value model so that loading it the way PPO loads a reward model gives back the
    same values: the head's bias (which models like Llama's classifier cannot hold) is folded
    into the stored mean, since V = w.h + b = w.h - (-b)."""
    head = value.score
    bias = float(head.bias.item()) if head.bias is not None else 0.0
    plain = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    plain.weight = head.weight
    stored_mean = getattr(value.config, MEAN_KEY, None)
    value.score = plain
    setattr(value.config, MEAN_KEY, -bias)
    try:
        value.save_pretrained(path, safe_serialization=True)
    finally:  # the live model is left as it was
        value.score = head
        setattr(value.config, MEAN_KEY, stored_mean)


def shift_head(model, offset: float) -> None:
    """Start the value head on the reward's scale: PPO sees normalised scores (raw - mean), so a
    value model copied from the raw reward model would be off by ``mean`` everywhere. A constant
    value error is not harmless: GAE weights it by lambda^(T-t), so early tokens would look
    better than late ones (measured: the EOS token was pushed down and responses grew)."""
    head = model.score
    if head.bias is None:
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        with torch.no_grad():
            biased.weight.copy_(head.weight)
            biased.bias.zero_()
        model.score = head = biased
    with torch.no_grad():
        head.bias -= offset


def check_same_tokenizer(source: str, policy_name: str, policy_tokenizer) -> None:
    """Fail early, naming both models, when the value model would read ids from another vocabulary."""
    if source == policy_name or source == TINY or not (Path(resolve(source)) / "tokenizer_config.json").exists():
        return
    theirs = load_tokenizer(source)
    if theirs.get_vocab() != policy_tokenizer.get_vocab():
        raise RlhfkitError(
            f"value model '{source}' has a different tokenizer from the policy '{policy_name}' "
            f"({len(theirs)} vs {len(policy_tokenizer)} tokens); the value model reads the policy's token ids, "
            "so pass --value-model with a model that shares the policy's tokenizer (e.g. the policy itself)")


def token_values(model: torch.nn.Module, seqs: Sequences) -> torch.Tensor:
    """V(prompt + response[:t]) for every response position t, (B, R): the value head applied to
    the hidden state that predicts response token t (aligned with the logprobs). Packed when the
    model packs exactly (rlhfkit.packing), 0 on padding."""
    inner = unwrap(model)  # LoRA: adapters stay active
    if packs_exactly(model, _value_packing_gap):
        hidden, b, t = packed_response_hidden(model, seqs)
        return scatter_responses(inner.score(hidden).squeeze(-1).float(), b, t, seqs)
    return _padded_token_values(model, seqs)


def _padded_token_values(model: torch.nn.Module, seqs: Sequences) -> torch.Tensor:
    inner = unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                      position_ids=seqs.position_ids).last_hidden_state
    values = inner.score(hidden[:, seqs.prompt_width - 1 : -1]).squeeze(-1).float()
    return values * seqs.response_mask.to(values.device)


def _value_packing_gap(model: torch.nn.Module) -> float:
    seqs = probe_batch(model)
    inner = unwrap(model)
    hidden, b, t = packed_response_hidden(model, seqs)
    packed = scatter_responses(inner.score(hidden).squeeze(-1).float(), b, t, seqs)
    return relative_gap(packed, _padded_token_values(model, seqs))


def full_width(seqs: Sequences, rows: torch.Tensor) -> Sequences:
    """The sequences at ``rows`` with the whole batch's prompt and response widths."""
    return Sequences(seqs.input_ids[rows], seqs.attention_mask[rows], seqs.position_ids[rows],
                     seqs.response_mask[rows], seqs.prompt_width)


def ptx_batch_loss(policy, examples: list[Example], pad_id: int) -> torch.Tensor:
    """Mean NLL of the demonstrations' response tokens."""
    nll, n = demonstration_nll(policy, examples, pad_id)
    return nll / max(n, 1)


def logprobs_and_entropy(model, seqs: Sequences, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return response_logprobs(model, seqs, temperature, with_entropy=True)


def per_minibatch(forward, seqs: Sequences, minibatches: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``forward(index, minibatch) -> tensors (b, R)`` run on each minibatch, reassembled as (B, R).

    The rollout-time logprobs and values are computed on the first epoch's minibatches, the
    very inputs (same rows, same packing) the first updates will see: in bf16 another batch
    layout moves logprobs by ~1e-3, enough to make the first ratio visibly differ from 1."""
    outputs: list[torch.Tensor] = []
    for index, rows in enumerate(minibatches):
        parts = forward(index, full_width(seqs, rows))
        if not outputs:
            outputs = [part.new_zeros((len(seqs.input_ids),) + part.shape[1:]) for part in parts]
        for whole, part in zip(outputs, parts):
            whole[rows] = part
    return tuple(outputs)


def reference_logprobs(policy, reference, seqs: Sequences, temperature: float) -> torch.Tensor:
    with frozen_reference(policy, reference) as ref:
        return logprobs_and_entropy(ref, seqs, temperature)[0]


class EMA:
    """An exponential moving average of the trainable policy weights (InstructGPT keeps one),
    updated once per PPO step; checkpointed with the run and saved as a model in OUT/ema."""

    def __init__(self, model: torch.nn.Module, decay: float, saved: dict[str, torch.Tensor] | None = None):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        for key, value in (saved or {}).items():
            if key.startswith("ema."):
                self.shadow[key[4:]].copy_(value)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{name}": t for name, t in self.shadow.items()}

    def averaged_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        averaged = copy.deepcopy(model)
        params = dict(averaged.named_parameters())
        with torch.no_grad():
            for name, t in self.shadow.items():
                params[name].copy_(t)
        return averaged


PTX_MAX_LEN = 1024  # demonstration tokens per PPO-ptx example (longer ones lose old context first)


def ptx_examples(cfg: PPOConfig, tokenizer) -> list[Example]:
    """Demonstrations for PPO-ptx: the SFT-style loss keeps the policy close to good answers
    while PPO chases the reward (InstructGPT mixes in pretraining data the same way)."""
    if cfg.algo.ptx_data == "world":
        demos = World(seed=cfg.world_seed).demonstrations(cfg.world_prompts, "train")
    else:
        demos, report = read_demonstrations(cfg.algo.ptx_data)
        print(report.summary())
    return tokenize_demonstrations(tokenizer, demos, PTX_MAX_LEN)[0]


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): how much of the return the critic explains."""
    var_returns = masked_var(returns, mask)
    return float(1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8))


# --- the stage --------------------------------------------------------------------------------


@stage
def train(cfg: PPOConfig) -> Path:
    acc, out = begin_stage(cfg)
    if acc.num_processes > 1:
        raise RlhfkitError("rlhfkit ppo runs in one process for now; launch it without accelerate/torchrun")
    algo, say = cfg.algo, acc.print

    # Models: the policy (trained), the frozen reference (the same SFT weights), the value model.
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    policy = load_model(cfg.model, tokenizer, seed=cfg.run.seed)
    if cfg.model.lora:  # the reference is the same model with its adapters disabled
        policy, reference = apply_lora(policy, cfg.model), None
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    models = PolicyAndValue(policy, value_model(cfg, tokenizer))
    score_fn = reward_function(cfg.reward, cfg.world_seed, cfg.model.precision)
    world = World(seed=cfg.world_seed)
    ptx = ptx_examples(cfg, tokenizer) if algo.ptx_coef > 0 else []
    if cfg.prompts != "world":
        prompts, report = read_prompts(cfg.prompts)
        say(report.summary())
    else:
        prompts = world.prompts(cfg.world_prompts, "train")
    encoded = [prompt_ids(tokenizer, p.messages) for p in prompts]
    gold_prompts = world.prompts(cfg.eval.gold_prompts, "eval") if cfg.prompts == "world" else []

    updates_per_step = algo.epochs * (algo.prompts_per_step // algo.minibatch_size)
    run = start_training(acc, out, models, cfg.optim, cfg.run, BatchConfig(micro_batch_size=algo.prompts_per_step),
                         len(prompts), "ppo", schedule_steps=cfg.run.steps * updates_per_step)
    if run is None:
        return out
    kl_ctl = KLController(run.state.get("kl_coef", algo.kl_coef), algo.kl_target or None, algo.kl_horizon)
    ema = EMA(policy, algo.ema_decay, run.state.get("tensors")) if algo.ema_decay else None
    ptx_order = DataOrder(len(ptx), cfg.run.seed + 1)
    pad_id = tokenizer.pad_token_id

    evaluator = PolicyEvaluator(policy, lambda: frozen_reference(policy, reference), tokenizer, world, gold_prompts,
                                algo.max_new_tokens, cfg.eval.batch_size, cfg.model.precision, algo.temperature,
                                acc.autocast, run.bar.print)

    def evaluate(step: int) -> dict[str, float]:
        return evaluator(step, final=step == cfg.run.steps)

    if run.start_step == 0 and cfg.eval.at_start:
        run.log.log(0, evaluate(0))

    def policy_and_value(sub: Sequences) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward every update runs: logprobs, entropy and values, (b, R) each."""
        with acc.autocast():
            return (*logprobs_and_entropy(policy, sub, algo.temperature), token_values(models.value, sub))

    def forward_gap(kept: tuple[torch.Tensor, ...], sub: Sequences) -> float:
        """Largest |logprob or value| difference between the kept forward and a fresh no-grad one of
        the same minibatch: 0 unless forwards are not deterministic (dropout left on, a
        non-deterministic kernel), which would make the rollout's logprobs noise."""
        again = policy_and_value(sub)
        gap = max(float((a - b.detach()).abs().max()) for a, b in zip(again[::2], kept[::2]))
        if gap > 1e-3:
            run.bar.print(f"warning: the same forward gave logprobs/values {gap:.2e} apart: "
                          "PPO's ratios will not start at 1 (dropout on? a non-deterministic kernel?)")
        return gap

    metrics: dict[str, float] = {}
    metrics_first: dict[str, float] = {}  # logged at a run's first step only
    for step in range(run.start_step, cfg.run.steps):
        t0 = time.perf_counter()
        # 1-2. Prompts and rollouts (a per-step seed: resuming replays the same samples).
        indices, _ = run.step_batches(step)
        batch_prompts = [prompts[i] for i in indices]
        with acc.autocast():
            gens = generate(policy, tokenizer, [p.messages for p in batch_prompts], algo.max_new_tokens,
                            temperature=algo.temperature, batch_size=algo.prompts_per_step,
                            precision=cfg.model.precision, generator_seed=cfg.run.seed * 1_000_003 + step)
        seqs = join([encoded[i] for i in indices], [g.token_ids for g in gens], pad_id)
        mask = seqs.response_mask.float()  # 1 up to and including the first EOS
        t_rollout = time.perf_counter()

        # 3. Logprobs (same temperature as sampling), reference logprobs and values on the first
        # PPO epoch's minibatches (every epoch's shuffle is drawn here). The first minibatch's
        # forward keeps its graph: with the same weights and inputs it is also the first update's
        # forward, which so runs once instead of twice (one policy and one value forward a step).
        shuffle = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
        epochs = [torch.randperm(len(gens), generator=shuffle).split(algo.minibatch_size) for _ in range(algo.epochs)]
        first_sub = full_width(seqs, epochs[0][0])
        first_update = policy_and_value(first_sub)
        with torch.no_grad(), acc.autocast():
            if step == run.start_step:  # once a run: the graph-keeping forward must be the no-grad one
                metrics_first = {"ppo/first_forward_gap": forward_gap(first_update, first_sub)}
            logprobs, entropy, values, ref_logprobs = per_minibatch(
                lambda index, sub: (*(t.detach() for t in (first_update if index == 0 else policy_and_value(sub))),
                                    reference_logprobs(policy, reference, sub, algo.temperature)),
                seqs, epochs[0])

        # 4. Scores at the EOS; the "EOS trick" replaces the score of responses that never ended.
        texts = [g.text for g in gens]
        raw_scores = torch.tensor(score_fn(batch_prompts, texts), dtype=torch.float32)
        finished = torch.tensor([g.finished for g in gens])
        scores = raw_scores.clone()
        if algo.missing_eos_penalty:
            scores[~finished] = algo.missing_eos_penalty

        # 5. Per-token KL-penalised rewards, GAE (gamma, lambda), whitened advantages.
        rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, kl_ctl.value, algo.kl_estimator)
        if algo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, algo.gamma, algo.lam)
        advantages = masked_whiten(advantages, mask)
        t_score = time.perf_counter()

        # 6. PPO epochs over shuffled minibatches.
        # Optional PPO-ptx: an SFT loss on demonstrations in every update (InstructGPT eq. 2, gamma).
        stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "ratio",
                                                         "vf_clipfrac", "ptx_loss")}
        update = step * updates_per_step
        for minibatches in epochs:
            for rows in minibatches:
                # The batch's full widths, not the minibatch's own (select() cuts them; GRPO does):
                # where padded forwards are used, another padding width changes bf16 logprobs by
                # ~1e-3 and the first ratio drifted from 1 by up to 0.65% (measured, SmolLM2).
                sub, m = full_width(seqs, rows), mask[rows]
                new_logprobs, _, new_values = first_update if first_update is not None else policy_and_value(sub)
                first_update = None  # its graph is freed by this update's backward
                with acc.autocast():
                    ptx_loss = ptx_batch_loss(policy, [ptx[i] for i in ptx_order.batch(update, algo.minibatch_size)],
                                              pad_id) if ptx else torch.zeros(())
                update += 1
                pg, pg_stats = ppo_policy_loss(new_logprobs, logprobs[rows], advantages[rows], m, algo.clip)
                vf, vf_stats = ppo_value_loss(new_values, values[rows], returns[rows], m, algo.value_clip)
                loss = masked_mean(pg, m) + algo.vf_coef * masked_mean(vf, m) + algo.ptx_coef * ptx_loss
                if not stats["ratio"]:  # first minibatch: no update yet, so the ratio must be 1
                    first_ratio = float(pg_stats["ratio"])
                    if abs(first_ratio - 1) > 1e-3:
                        run.bar.print(f"warning: step {step + 1}: ratio {first_ratio:.4f} != 1 before the first update: "
                                      "the rollout's logprobs are not the policy's (rows mixed up? temperature?)")
                finite = bool(torch.isfinite(loss))
                if finite:
                    loss.backward()
                run.update(step + 1, float(loss.detach()), loss_has_scale=False)  # a non-finite loss: the update is skipped
                if not finite:
                    continue
                stats["pg_loss"].append(float(masked_mean(pg.detach(), m)))
                stats["vf_loss"].append(float(masked_mean(vf.detach(), m)))
                stats["vf_clipfrac"].append(float(vf_stats["value_clipfrac"]))
                stats["ptx_loss"].append(float(ptx_loss.detach()))
                for key in ("clipfrac", "approx_kl", "ratio"):
                    stats[key].append(float(pg_stats[key]))

        t_train = time.perf_counter()
        # 7. EMA, KL controller, metrics.
        if ema is not None:
            ema.update(policy)
        seq_kl = (kl * mask).sum(-1)
        if float(seq_kl.mean()) < 0:
            run.bar.print(f"warning: step {step + 1}: mean KL to the reference is negative ({float(seq_kl.mean()):.4f})")
        kl_ctl.update(float(seq_kl.mean()), len(gens))
        done = step + 1
        metrics = {
            "ppo/score": float(raw_scores.mean()), "ppo/kl": float(seq_kl.mean()), "ppo/kl_coef": kl_ctl.value,
            "ppo/reward": float((scores - seq_kl * kl_ctl.value).mean()),
            "ppo/entropy": float(masked_mean(entropy, mask)), "ppo/response_tokens": float(mask.sum(-1).mean()),
            "ppo/eos_fraction": float(finished.float().mean()),
            "ppo/explained_variance": explained_variance(values, returns, mask),
            "ppo/seconds_per_step": time.perf_counter() - t0, "ppo/seconds_rollout": t_rollout - t0,
            "ppo/seconds_score": t_score - t_rollout, "ppo/seconds_train": t_train - t_score,
            "ppo/ratio_first_minibatch": first_ratio,
            **{f"ppo/{k}": sum(v) / max(len(v), 1) for k, v in stats.items()}, **metrics_first,
        }
        metrics_first = {}
        if cfg.prompts == "world":
            metrics["ppo/gold_score"] = sum(s.score for s in world.judge_many(batch_prompts, texts)) / len(texts)
        run.bar.update(done, f"score {metrics['ppo/score']:.3f}  kl {metrics['ppo/kl']:.3f}")
        metrics = run.finish_step(done, metrics, evaluate, extra_state=lambda: {"kl_coef": kl_ctl.value},
                                  extra_tensors=lambda: ema.tensors() if ema is not None else {})

    # Save the policy as a plain model folder and the value model beside it.
    if run.start_step == cfg.run.steps:
        metrics = evaluate(cfg.run.steps)
    save_model(policy, tokenizer, out)
    value = models.value.merge_and_unload() if cfg.model.lora else models.value
    save_value_model(value, out / "value_model")
    if ema is not None:
        save_model(ema.averaged_copy(policy), tokenizer, out / "ema")
    mark_complete(out, {"stage": "ppo", "steps": cfg.run.steps, **metrics})
    run.close()
    return out
