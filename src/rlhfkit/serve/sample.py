"""`rlhfkit sample`: answer a file of prompts (or the built-in world's eval prompts), write JSONL.

One row per sample: ``{"prompt": messages, "completion", "finished", "tokens", "sample"}``, plus
``gold_score`` when the prompts carry world task data (``prompts=world``, or a file written by
``rlhfkit world export``), so a checkpoint's samples can be read and scored without training code.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.config import ModelConfig, require_positive
from rlhfkit.data import sources
from rlhfkit.data.records import Prompt, messages_to_dicts
from rlhfkit.data.tokenize import prompt_ids
from rlhfkit.data.world import World
from rlhfkit.errors import ConfigError
from rlhfkit.models import load_model, load_tokenizer
from rlhfkit.generation import Generation, generate

WORLD_PROMPTS = 200  # `prompts=world` with n_prompts 0: the eval split size `rlhfkit world export` writes


@dataclass
class SampleConfig:
    """Batch generation: answer every prompt n times and write one JSONL row per sample."""

    model: str
    """Built-in name (`tiny`, `smollm2-135m-instruct`), a local model folder (e.g. the output of `rlhfkit sft`), or a hub id."""
    prompts: str = "world"
    """`world` (the built-in world's held-out eval prompts, gold-scored) or a JSONL/JSON/Parquet file whose rows have
    `prompt`: a string or a list of {role, content} messages."""
    n_prompts: int = 0
    """How many world prompts, or at most this many rows of a file. 0: the whole file, or 200 world prompts."""
    out: str = "samples.jsonl"
    """Output JSONL: prompt (messages), completion, finished, tokens (generated, end-of-turn included), sample
    (0..n-1) and, for world prompts, gold_score."""
    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy decoding (then n must be 1)."""
    max_new_tokens: int = 256
    """Longest completion, in tokens; `finished` is false for a completion cut here."""
    batch_size: int = 16
    """Sequences per generation batch."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` (default): bf16 autocast where it measures clearly faster for this model on this machine, else fp32 (measured once, cached). `bf16`: forward passes under bf16 autocast, weights stay fp32. `fp32`."""
    seed: int = 0
    """Sampling seed, and the world's seed for `prompts=world` (0: the prompts the training stages evaluate on)."""

    def check(self) -> None:
        require_positive(self, "n", "max_new_tokens", "batch_size")
        if self.n_prompts < 0:
            raise ConfigError(f"n_prompts must be >= 0 (0 = all), got {self.n_prompts}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise ConfigError(f"temperature 0 (greedy) gives {self.n} identical samples per prompt; use n=1 or temperature > 0")


def load_prompts(cfg: SampleConfig) -> list[Prompt]:
    """The prompts to answer; a bad file raises a DataError naming the file, line and field."""
    # format="prompt" reads each row's `prompt` (and `meta`) and ignores other fields, so a file
    # of demonstrations or comparisons can be answered too.
    return sources.load_prompts(cfg.prompts, cfg.n_prompts or WORLD_PROMPTS, "eval", cfg.seed, say=None, format="prompt",
                                limit=cfg.n_prompts or None)


def gold_scores(prompts: list[Prompt], completions: list[str], seed: int) -> list[float] | None:
    """The world's gold judge's scores, or None when some prompt carries no world task data."""
    try:
        return [s.score for s in World(seed=seed).judge_many(prompts, completions)]
    except ValueError:
        return None


def generate_all(model, tokenizer, prompts: list[Prompt], cfg: SampleConfig) -> list[Generation]:
    """``generation.generate`` over every prompt, a few batches at a time for a progress bar.

    Prompts are sorted by length across the whole set first (each chunk then pads little), and one
    RNG stream seeded once runs through all chunks, so the output depends on the config only.
    """
    from rich.progress import Progress

    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids(tokenizer, prompts[i].messages)))
    chunk = cfg.batch_size * 4
    results: list[Generation | None] = [None] * len(prompts)
    from rlhfkit.progress import columns

    with torch.random.fork_rng(), Progress(*columns(), transient=True, disable=not sys.stdout.isatty()) as bar:
        torch.manual_seed(cfg.seed)
        task = bar.add_task(f"sampling {cfg.model}", total=len(prompts))
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            gens = generate(model, tokenizer, [prompts[i].messages for i in idx], cfg.max_new_tokens,
                            temperature=cfg.temperature, batch_size=cfg.batch_size, precision=cfg.precision)
            for i, g in zip(idx, gens):
                results[i] = g
            bar.advance(task, len(idx))
    return results  # type: ignore[return-value]


def sample(cfg: SampleConfig) -> None:
    from rlhfkit.precision import resolve

    cfg.check()
    cfg.precision = resolve(cfg.precision, cfg.model, flag="--precision")
    prompts = load_prompts(cfg)  # before the model loads: a bad file fails in a second
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(ModelConfig(name=cfg.model, precision=cfg.precision), tokenizer, seed=cfg.seed)
    model.to("cuda" if torch.cuda.is_available() else "cpu")

    # Prompt-major: the samples of prompt i are rows i*n .. i*n+n-1.
    flat = [p for p in prompts for _ in range(cfg.n)]
    print(f"sampling {cfg.n} completion(s) for each of {len(prompts)} prompts from {cfg.model}")
    gens = generate_all(model, tokenizer, flat, cfg)
    gold = gold_scores(flat, [g.text for g in gens], cfg.seed)

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for row, (p, g) in enumerate(zip(flat, gens)):
            record = {"prompt": messages_to_dicts(p.messages), "completion": g.text, "finished": g.finished,
                      "tokens": len(g.token_ids), "sample": row % cfg.n}
            if gold is not None:
                record["gold_score"] = gold[row]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)  # a crash never leaves a half-written file under the real name

    finished = sum(g.finished for g in gens) / len(gens)
    summary = f"wrote {len(gens)} samples -> {out} ({finished:.0%} finished"
    if gold is not None:
        summary += f", mean gold score {sum(gold) / len(gold):.4f}"
    print(summary + ")")
