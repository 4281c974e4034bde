"""Every key a stage writes to metrics.jsonl and complete.json, with what it means.

The one list: stages write these keys, the report and the pipeline's summary read them, and
``tests/test_metrics.py`` fails when a run logs a key that is not here (or a reader asks for one
that is not). Namespaces say where a number comes from: ``train/`` (SFT and reward-model
updates), ``eval/`` (held-out evaluation), ``ppo/``, ``grpo/``, ``dpo/`` (one update or rollout
batch of that algorithm), ``online/`` (one round of online DPO) and ``gpu/`` (the device).
``<x>`` stands for any name.
"""

from __future__ import annotations

import re

_WIN_RATE = {
    "win_rate": "share of held-out prompts where the policy's answer beats the SFT policy's under the gold judge (ties count half)",
    "win_rate_low": "lower end of its 95% bootstrap interval",
    "win_rate_high": "upper end of its 95% bootstrap interval",
    "wins": "prompts won", "ties": "prompts tied (often the same answer)", "losses": "prompts lost",
    "lc_win_rate": "length-controlled win rate", "lc_win_rate_low": "its interval's lower end",
    "lc_win_rate_high": "its interval's upper end",
}

METRICS: dict[str, str] = {
    "step": "optimizer steps done (0: before training)",
    # SFT and the reward model's updates
    "train/loss": "SFT: mean NLL per response token; RM: mean ranking loss per prompt",
    "train/accuracy": "RM: share of the batch's untied pairs the reward orders correctly",
    "train/reward_best": "RM: mean reward of each prompt's best-ranked completion",
    "train/reward_worst": "RM: mean reward of each prompt's worst-ranked completion",
    "train/grad_norm": "gradient norm before clipping",
    "train/skipped": "1 when the update was skipped (non-finite loss or gradient)",
    "train/lr": "learning rate after the step",
    "train/tokens_per_s": "SFT: tokens trained per second (evaluation and saving excluded)",
    "train/prompts_per_s": "RM: prompts trained per second (evaluation and saving excluded)",
    # held-out evaluation
    "eval/loss": "SFT: held-out NLL per response token; RM: ranking loss; DPO: DPO loss on held-out pairs",
    "eval/accuracy": "RM and DPO: share of held-out pairs ordered as the labels order them",
    "eval/accuracy_k<x>": "RM: accuracy on held-out rankings of K = <x> completions",
    "eval/margin": "RM: mean reward margin of held-out pairs; DPO: mean implicit-reward margin",
    "eval/reward_best": "RM: mean reward of each held-out prompt's best completion",
    "eval/reward_worst": "RM: mean reward of each held-out prompt's worst completion",
    "eval/rewards_chosen": "DPO: mean implicit reward of held-out chosen responses",
    "eval/rewards_rejected": "DPO: mean implicit reward of held-out rejected responses",
    "eval/gold_accuracy": "RM: share of held-out pairs the reward orders as the gold judge does",
    "eval/gold_spearman": "RM: Spearman rank correlation of reward and gold score per prompt",
    "eval/gold_score": "mean gold-judge score of the policy's greedy answers to held-out prompts",
    "eval/gold/<x>": "the same, for one task family of the world",
    "eval/eos_fraction": "share of held-out greedy answers that ended with the end-of-turn token",
    "eval/response_tokens": "mean length of held-out greedy answers, in tokens",
    "eval/sft_gold_score": "mean gold score of the SFT policy's greedy answers (what the win rate compares with)",
    "eval/sft_sampled_gold_score": "the same for sampled answers",
    **{f"eval/vs_sft_{k}": v for k, v in _WIN_RATE.items()},
    **{f"eval/vs_sft_sampled_{k}": f"{v} (sampled answers)" for k, v in _WIN_RATE.items()},
    # PPO (InstructGPT; N+ details)
    "ppo/importance_weight": "with rollout.importance_cap: mean truncated importance weight min(pi_trainer / pi_sampler, cap) over response tokens (1 when the sampler is the trainer)",
    "ppo/score": "mean reward-model score of the step's rollouts",
    "ppo/reward": "mean score minus the KL penalty (what PPO maximises)",
    "ppo/kl": "mean per-sequence KL estimate to the reference",
    "ppo/kl_coef": "KL penalty coefficient (beta) in the step's rewards (the adaptive controller sets the next one after it)",
    "ppo/entropy": "mean per-token entropy of the policy on its rollouts",
    "ppo/response_tokens": "mean rollout length, in tokens",
    "ppo/eos_fraction": "share of rollouts that ended with the end-of-turn token",
    "ppo/explained_variance": "1 - Var(returns - values) / Var(returns): how well the critic predicts",
    "ppo/gold_score": "mean gold score of the step's rollouts (the world only)",
    "ppo/pg_loss": "mean clipped policy-gradient loss over the step's updates",
    "ppo/vf_loss": "mean clipped value loss",
    "ppo/clipfrac": "share of tokens whose ratio was clipped",
    "ppo/vf_clipfrac": "share of tokens whose value was clipped",
    "ppo/approx_kl": "k3 estimate of KL(old || new) per update",
    "ppo/ratio": "mean policy ratio over the step's updates",
    "ppo/ratio_first_minibatch": "the ratio before the first update: must be 1",
    "ppo/first_forward_gap": "once a run: largest logprob/value difference between two identical forwards",
    "ppo/logprob_rounding": "once a run: mean per-token |logprob in the stage's precision - in fp32| (0 in fp32)",
    "ppo/ptx_loss": "PPO-ptx's SFT loss on demonstrations (0 when off)",
    "ppo/seconds_per_step": "wall time of the step",
    "ppo/seconds_rollout": "of which generating",
    "ppo/seconds_score": "of which forwards, scoring and advantages",
    "ppo/seconds_train": "of which PPO updates",
    # GRPO / RLOO
    "grpo/importance_weight": "with rollout.importance_cap: mean truncated importance weight over the updated responses' tokens",
    "grpo/reward": "mean reward of the step's samples",
    "grpo/reward_std": "mean within-group standard deviation of the reward",
    "grpo/equal_reward_groups": "share of groups whose samples all got the same reward (no signal)",
    "grpo/kl": "mean per-token k3 KL to the reference (0 without a reference)",
    "grpo/response_tokens": "mean sample length, in tokens",
    "grpo/eos_fraction": "share of samples that ended with the end-of-turn token",
    "grpo/gold_score": "mean gold score of the step's samples (the world, reward not gold)",
    "grpo/grad_norm": "gradient norm before clipping",
    "grpo/skipped": "1 when the update was skipped",
    "grpo/seconds_per_step": "wall time of the step",
    # DPO and its variants
    "dpo/loss": "mean DPO-family loss per pair",
    "dpo/accuracy": "share of pairs whose chosen response has the higher implicit reward",
    "dpo/margin": "mean implicit-reward margin, chosen minus rejected",
    "dpo/rewards_chosen": "mean implicit reward beta * log(pi / pi_ref) of chosen responses",
    "dpo/rewards_rejected": "the same for rejected responses",
    "dpo/grad_norm": "gradient norm before clipping",
    "dpo/skipped": "1 when the update was skipped",
    "dpo/lr": "learning rate after the step",
    "dpo/pairs_per_s": "pairs trained per second (evaluation and saving excluded)",
    # online DPO rounds
    "online/iteration": "the round (1-based)",
    "online/reward_mean": "mean reward of the round's samples",
    "online/pairs": "pairs the round made",
    "online/all_equal_fraction": "share of prompts whose samples all got the same reward (no pair)",
    "online/sample_gold": "mean gold score of the round's samples (the world only)",
    # the machine
    "gpu/max_memory_gib": "on CUDA: the most GPU memory PyTorch has held so far in this process (main process), GiB",
}

_PATTERNS = [re.compile(re.escape(key).replace(re.escape("<x>"), r"[A-Za-z0-9_]+") + "$")
             for key in METRICS if "<x>" in key]


def known(key: str) -> bool:
    """Whether ``key`` is a documented metric (``<x>`` in a name matches any name)."""
    return key in METRICS or any(p.match(key) for p in _PATTERNS)
