"""The rankings the reward model and the DPO family train on: read from a file, or made from the
built-in world (completions sampled from a policy and/or the world's synthetic candidates, ranked
by simulated labelers). Sampled rankings are cached in the stage's folder, so a resumed run sees
exactly the same rankings.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

from rlhfkit.chunks import CHUNK, PartialFile, chunk_ranges, chunk_seed, partial_path
from rlhfkit.config import ModelConfig, PreferenceDataConfig
from rlhfkit.data.preferences import read_cached_rankings, read_rankings_file, write_rankings
from rlhfkit import processes
from rlhfkit.data.records import Ranking, split_by_prompt
from rlhfkit.data.sources import is_world
from rlhfkit.data.world import Labeler, World
from rlhfkit.models import load_tokenizer
from rlhfkit.generation import SavedModelSampler, request_seeds


def load_rankings(data: PreferenceDataConfig, model_cfg: ModelConfig, seed: int, out: Path,
                  chunk: int = CHUNK) -> tuple[list[Ranking], list[Ranking]]:
    """Train and held-out rankings. Sampled world data is cached in OUT/data so a resumed run
    trains on exactly the same rankings without sampling again; an interrupted sampling resumes
    from its partial files there."""
    if is_world(data.train):
        cache = {split: out / "data" / f"{split}_rankings.jsonl" for split in ("train", "eval")}
        if not all(p.exists() for p in cache.values()):
            # Both finals are written only once both splits are sampled: their existence means done.
            # Under several processes each samples its share; the main process writes.
            train = sample_world_rankings(data, model_cfg, "train", data.world_prompts, seed,
                                          partial_path(cache["train"]), chunk)
            held = sample_world_rankings(data, model_cfg, "eval", data.world_eval_prompts, seed,
                                         partial_path(cache["eval"]), chunk)
            if processes.is_main():
                for split, rankings in (("train", train), ("eval", held)):
                    write_rankings(rankings, cache[split])
                for path in cache.values():
                    partial_path(path).unlink(missing_ok=True)
        processes.wait_for_everyone()
        return read_cached_rankings(cache["train"]), read_cached_rankings(cache["eval"])
    train = read_rankings_file(data.train, data)
    if data.eval:
        held = read_rankings_file(data.eval, data)
    else:
        train, held = split_by_prompt(train, data.eval_fraction, data.train)
    if data.max_examples:
        train = train[: data.max_examples]
    if data.max_eval_examples:
        held = held[: data.max_eval_examples]
    return train, held


def sample_world_rankings(data: PreferenceDataConfig, model_cfg: ModelConfig, split: str, n: int, seed: int,
                          partial: Path | None = None, chunk: int = CHUNK) -> list[Ranking]:
    """K completions per world prompt (sampled from the policy, synthetic candidates, or half of
    each), ranked by simulated labelers. The policy samples in chunks of about ``chunk``
    completions, each recorded in ``partial`` when given, so an interrupted run resumes there."""
    world = World(seed=data.world_seed)
    prompts = world.prompts(n, split)
    labeler = Labeler(temperature=data.labeler_temperature, seed=seed)
    n_policy = {"candidates": 0, "policy": data.k, "mixed": data.k - data.k // 2}[data.responses]
    sampled: list[list[str]] = [[] for _ in prompts]
    if n_policy:
        from dataclasses import replace

        from rlhfkit.precision import resolve

        policy_name = data.policy or model_cfg.name
        model_cfg = replace(model_cfg, precision=resolve(model_cfg.precision, policy_name))  # callers with `auto`
        ranges = chunk_ranges(len(prompts), max(1, chunk // n_policy))
        settings = {"policy": policy_name, "split": split, "n": n, "world_seed": data.world_seed, "seed": seed,
                    "samples": n_policy, "chunk": chunk, "max_new_tokens": data.max_new_tokens,
                    "temperature": data.temperature, "precision": model_cfg.precision, "engine": data.rollout.engine}
        log = PartialFile(partial, settings, [len(r) for r in ranges], f"labels ({split})")
        sampled = [texts for rows in log.load() for texts in rows]
        with contextlib.ExitStack() as stack:
            if log.count < len(ranges):
                sampler = stack.enter_context(SavedModelSampler(
                    policy_name, load_tokenizer(policy_name, model_cfg.trust_remote_code), model_cfg, data.rollout,
                    batch_size=32, seed=seed))
                if processes.is_main():
                    print(f"sampling {n_policy} completions for {n} {split} prompts from {policy_name}"
                          + (" with vLLM" if data.rollout.engine == "vllm" else ""))
            for c in range(log.count, len(ranges)):
                chunk_prompts = prompts[ranges[c].start : ranges[c].stop]
                asked = [p.messages for p in chunk_prompts for _ in range(n_policy)]
                flat = sampler.generate(asked, data.max_new_tokens, data.temperature,
                                        request_seeds(chunk_seed(seed, f"labels:{split}", c), len(asked)), spread=True,
                                        progress=f"sampling ({split}), chunk {c + 1}/{len(ranges)}")
                rows = [[g.text for g in flat[i * n_policy : (i + 1) * n_policy]] for i in range(len(chunk_prompts))]
                log.append(rows)
                sampled += rows
    # Synthetic candidates cover what the policy rarely writes (complying with a harmful request,
    # a confident wrong answer), so a "mixed" reward model is harder to exploit off-distribution.
    groups = [s + world.candidates(p, data.k - n_policy, random.Random(f"{seed}:{split}:{i}"))
              for i, (p, s) in enumerate(zip(prompts, sampled))]
    return [labeler.rank(p, g, random.Random(f"{seed}:{split}:rank:{i}")) for i, (p, g) in enumerate(zip(prompts, groups))]
