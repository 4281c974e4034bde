"""Best-of-N: sample N responses per prompt and keep the one the reward scores highest.

Two uses: an inference-time baseline that needs no training (how much of RL's gain does simply
reranking N samples buy? Gao et al. 2022 compare RL with best-of-N at equal KL), and rejection
sampling to make SFT data (Llama 2): the output file has `prompt` and `completion` fields, so
`rlhfkit sft --data.train bon.jsonl` trains on the winners. On world prompts it also reports the
gold judge's verdict: best-of-N against plain sampling (the first of the N samples), each pair
judged in both orders.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from rlhfkit import processes
from rlhfkit.chunks import (
    CHUNK,
    PartialFile,
    chunk_ranges,
    chunk_seed,
    fingerprint,
    partial_path,
)
from rlhfkit.config import ModelConfig, RolloutConfig, require_positive
from rlhfkit.data.records import Prompt, messages_to_dicts
from rlhfkit.data.sources import load_prompts, world_of
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.eval.scorers import reward_function
from rlhfkit.eval.winrate import WinRate, gold_pair_judge, win_rate
from rlhfkit.generation import SavedModelSampler, request_seeds
from rlhfkit.models import load_tokenizer


@dataclass
class BestOfNConfig:
    """Best-of-N: sample N responses per prompt and keep the one the reward scores highest."""

    model: str = "tiny"
    """The policy that samples (a model folder or built-in name)."""
    reward: str = "gold"
    """Picks the best: a reward-model folder, `gold` (the world's gold judge), or `module:function`."""
    # `--samples` too: torchrun and accelerate launch take `--n` for an abbreviation of their own flags
    n: Annotated[int, tyro.conf.arg(aliases=("--samples",))] = 4
    """Samples per prompt."""
    prompts: str = "world"
    """`world` (held-out world prompts, judged by the gold judge too) or a file of prompt records."""
    split: Literal["train", "eval"] = "eval"
    """World split: `eval` for an inference-time baseline, `train` to make rejection-sampling SFT data."""
    num_prompts: int = 128
    """World prompts to answer (a prompts file is read whole)."""
    out: str = "bon.jsonl"
    """Output JSONL: prompt, completion (the best sample, so the file is SFT data), reward, and every
    sample with its reward."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 48
    """Response length limit."""
    batch_size: int = 32
    """Prompts per generation batch."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` (default): bf16 autocast where it measures clearly faster for this model on this machine, else fp32 (measured once, cached). `bf16`: forward passes under bf16 autocast, weights stay fp32. `fp32`."""
    seed: int = 0
    """Sampling seed."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Which engine samples (vLLM: started from the model folder, closed after)."""

    def check(self) -> None:
        require_positive(self, "n", "num_prompts", "max_new_tokens", "batch_size")
        self.rollout.check(lora=False)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive to sample {self.n} different responses, got {self.temperature}")



def pick_best(rewards: list[float], n: int) -> list[int]:
    """Index of the highest reward in each consecutive group of n (the first one on ties)."""
    if len(rewards) % n:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {n}")
    return [max(range(g * n, (g + 1) * n), key=lambda i: rewards[i]) - g * n for g in range(len(rewards) // n)]


def best_of_n(cfg: BestOfNConfig, chunk: int = CHUNK) -> dict[str, float]:
    """Samples come in chunks of about ``chunk`` responses, each recorded beside ``cfg.out``
    (OUT.partial.jsonl), so an interrupted run resumes after its last finished chunk."""
    from rlhfkit.precision import resolve

    cfg.check()
    cfg.precision = resolve(cfg.precision, cfg.model, flag="--precision")
    world = world_of(cfg.prompts, seed=0)  # None for a prompts file: no gold judge
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.split, seed=0)
    if not prompts:
        raise RlhfkitError(f"no prompts in {cfg.prompts}")
    score = reward_function(cfg.reward, 0, cfg.precision)
    out = Path(cfg.out)

    # 1. N samples per prompt (prompt-major: samples of prompt i are rows i*N .. i*N+N-1), in
    # chunks of whole prompts, each generated with its own seed and recorded as it finishes.
    flat_prompts: list[Prompt] = [p for p in prompts for _ in range(cfg.n)]
    ranges = chunk_ranges(len(prompts), max(1, chunk // cfg.n))
    settings = {"model": cfg.model, "engine": cfg.rollout.engine, "prompts": fingerprint([messages_to_dicts(p.messages) for p in prompts]),
                "chunk": chunk, **{k: getattr(cfg, k) for k in ("n", "temperature", "max_new_tokens", "batch_size",
                                                                "precision", "seed")}}
    log = PartialFile(partial_path(out), settings, [len(r) * cfg.n for r in ranges], "bon")
    texts = [text for rows in log.load() for text in rows]
    if processes.is_main():
        print(f"sampling {cfg.n} responses for each of {len(prompts)} prompts from {cfg.model}, "
              f"scoring them with {cfg.reward}")
    with contextlib.ExitStack() as stack:
        if log.count < len(ranges):
            sampler = stack.enter_context(SavedModelSampler(
                cfg.model, load_tokenizer(cfg.model), ModelConfig(name=cfg.model, precision=cfg.precision),
                cfg.rollout, cfg.batch_size, seed=cfg.seed))
        for c in range(log.count, len(ranges)):
            part = [p.messages for p in flat_prompts[ranges[c].start * cfg.n : ranges[c].stop * cfg.n]]
            gens = sampler.generate(part, cfg.max_new_tokens, cfg.temperature,
                                    request_seeds(chunk_seed(cfg.seed, "bon", c), len(part)), spread=True,
                                    progress=f"sampling, chunk {c + 1}/{len(ranges)}" if len(ranges) > 1 else "")
            log.append([g.text for g in gens])
            texts += [g.text for g in gens]
    if not processes.is_main():  # the others sampled their shares; the main process scores and writes
        processes.close()  # leave now, not wait on the main process's scoring (past the group's timeout)
        return {}
    # 2. Score every sample; keep each prompt's best.
    rewards = score(flat_prompts, texts)
    if any(not math.isfinite(r) for r in rewards):
        raise RlhfkitError(f"reward '{cfg.reward}' returned a non-finite score")
    best = pick_best(rewards, cfg.n)
    chosen = [texts[i * cfg.n + b] for i, b in enumerate(best)]

    # 3. Write the file (atomically): the best sample as `completion`, so it is SFT data.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w") as f:
        for i, p in enumerate(prompts):
            group = slice(i * cfg.n, (i + 1) * cfg.n)
            f.write(json.dumps({"prompt": messages_to_dicts(p.messages), "completion": chosen[i],
                                "reward": rewards[i * cfg.n + best[i]], "samples": texts[group],
                                "rewards": rewards[group]}) + "\n")
    tmp.replace(out)
    log.remove()

    n_prompts = len(prompts)
    metrics = {"bon/reward_best": sum(rewards[i * cfg.n + b] for i, b in enumerate(best)) / n_prompts,
               "bon/reward_first": sum(rewards[i * cfg.n] for i in range(n_prompts)) / n_prompts}
    print(f"best-of-{cfg.n} over {n_prompts} prompts -> {out}: mean reward {metrics['bon/reward_best']:.4f} "
          f"(plain sampling: {metrics['bon/reward_first']:.4f})")
    if world is not None:  # the gold judge's view: best-of-N vs the first sample
        plain = [texts[i * cfg.n] for i in range(n_prompts)]
        result: WinRate = win_rate(gold_pair_judge(world), prompts, chosen, plain)
        gold_best = [s.score for s in world.judge_many(prompts, chosen)]
        gold_plain = [s.score for s in world.judge_many(prompts, plain)]
        metrics.update({"bon/gold_best": sum(gold_best) / n_prompts, "bon/gold_plain": sum(gold_plain) / n_prompts,
                        **result.metrics("bon/vs_plain_")})
        print(f"gold score: best-of-{cfg.n} {metrics['bon/gold_best']:.4f} vs plain sampling {metrics['bon/gold_plain']:.4f}; "
              f"gold win rate vs plain sampling: {result}")
    return metrics
