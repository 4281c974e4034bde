"""The pipeline's final evaluation: base vs SFT vs RL on the same held-out prompts.

Every model answers every prompt greedily and by sampling (same seed for all models); a judge
scores the answers: the world's gold judge, or, on data without one (hh-rlhf), the run's reward
model. Win rates judge each pair in both orders (ties count half, 95% bootstrap interval), with a
length-controlled variant; the RL model's KL to SFT is estimated on its own samples. Writes
``eval.json``, the numbers the report's headline table shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from rlhfkit.chunks import (
    CHUNK,
    PARTIAL_SUFFIX,
    PartialFile,
    chunk_ranges,
    chunk_seed,
    fingerprint,
)
from rlhfkit.data.records import Prompt, messages_to_dicts
from rlhfkit.data.sources import gold_prompts, is_world
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.scorers import reward_function
from rlhfkit.eval.winrate import bootstrap_interval
from rlhfkit.runs import mark_complete


def held_out_prompts(source: str, n: int, fraction: float) -> list[Prompt]:
    """The world's eval split, or the prompts of a data file's held-out share (by prompt hash, the
    same rule the training stages use to hold data out)."""
    if is_world(source):
        return gold_prompts(source, n, seed=0)
    from rlhfkit.data.formats import read_records
    from rlhfkit.data.records import prompt_bucket

    records, _ = read_records(source, skip_bad=True)
    seen, held = set(), []
    for r in records:
        messages = r.messages if isinstance(r, Prompt) else r.prompt
        if prompt_bucket(messages) < fraction and messages not in seen:
            seen.add(messages)
            held.append(Prompt(messages))
    if not held:
        raise RlhfkitError(f"{source}: no held-out prompts to evaluate on")
    return held[:n]


def load(path: str, seed: int):
    """(model, tokenizer) of a model folder or built-in name."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(path)
    return load_model(ModelConfig(name=path), tokenizer, seed=seed), tokenizer


def evaluate_run(models: dict[str, str], rl: str, judge: str, prompts: str, cfg: Any, out: Path,
                 chunk: int = CHUNK) -> dict:
    """``models``: display name -> model (base, sft, the RL stage), in that order. Each model
    answers in chunks of ``chunk`` prompts per decoding, each recorded in OUT/eval.partial.jsonl,
    so an interrupted evaluation resumes after its last finished chunk."""
    from rich.console import Console

    from rlhfkit.eval.evaluate import sequence_kl
    from rlhfkit.eval.winrate import win_rate
    from rlhfkit.generation import Generation, generate

    from rlhfkit.precision import resolve

    say = Console(highlight=False).print
    cfg = dataclasses.replace(cfg, precision=resolve(cfg.precision, next(iter(models.values())), say,
                                                     flag="eval.precision"))
    held = held_out_prompts(prompts, cfg.prompts, cfg.held_out_fraction)
    scorer = reward_function(judge, 0, cfg.precision)
    decodings = {"greedy": 0.0, "sampled": cfg.temperature}
    ranges = chunk_ranges(len(held), chunk)
    settings = {"models": models, "rl": rl, "prompts": fingerprint([messages_to_dicts(p.messages) for p in held]),
                "chunk": chunk, **{k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "batch_size", "precision",
                                                                "seed")}}
    log = PartialFile(out / f"eval{PARTIAL_SUFFIX}", settings, [len(r) for _ in models for _ in decodings for r in ranges],
                      "eval")
    done = log.load()  # the finished (model, decoding, chunk) units, in this loop's order
    unit = 0
    texts: dict[str, dict[str, list[str]]] = {}
    lengths: dict[str, dict[str, list[int]]] = {}  # response tokens, for the length-controlled win rate
    summary: dict[str, dict] = {}
    for name, path in models.items():
        say(f"eval: {name} ({path}) answers {len(held)} held-out prompts, greedy and sampled at T={cfg.temperature}")
        summary[name] = {"path": path, "kl_to_sft": None}
        texts[name], lengths[name] = {}, {}
        model = reference = None  # loaded once a chunk is left to answer
        for decoding, temperature in decodings.items():
            rows: list[dict] = []
            for c, r in enumerate(ranges):
                if unit < len(done):
                    rows += done[unit]
                else:
                    if model is None:
                        model, tokenizer = load(path, cfg.seed)
                    part = [held[i].messages for i in r]
                    # Every model's chunk c draws with the same seed: differences come from the models.
                    chunk_gens = generate(model, tokenizer, part, cfg.max_new_tokens, temperature=temperature,
                                          batch_size=cfg.batch_size, precision=cfg.precision,
                                          generator_seed=chunk_seed(cfg.seed, "eval", c),
                                          progress=f"{name}, {decoding}" + (f", chunk {c + 1}/{len(ranges)}"
                                                                            if len(ranges) > 1 else ""))
                    new = [{"text": g.text, "token_ids": g.token_ids, "finished": g.finished} for g in chunk_gens]
                    if name == rl and decoding == "sampled":
                        # k1 KL estimate on the RL model's own samples: unbiased when sampled at T = 1.
                        if reference is None:
                            reference, _ = load(models["sft"], cfg.seed)
                        kl = sequence_kl(model, reference, tokenizer, part, chunk_gens, batch_size=cfg.batch_size,
                                         precision=cfg.precision)
                        for row, value in zip(new, kl):
                            row["kl"] = value
                    log.append(new)
                    rows += new
                unit += 1
            generations = [Generation(row["text"], row["token_ids"], row["finished"]) for row in rows]
            texts[name][decoding] = [g.text for g in generations]
            lengths[name][decoding] = [len(g.token_ids) for g in generations]
            scores = scorer(held, texts[name][decoding])
            low, high = bootstrap_interval(scores, seed=cfg.seed)
            summary[name][decoding] = {
                "score": sum(scores) / len(scores), "score_low": low, "score_high": high,
                "eos_fraction": sum(g.finished for g in generations) / len(generations),
                "response_tokens": sum(len(g.token_ids) for g in generations) / len(generations),
                "scores": scores,
            }
            if name == rl and decoding == "sampled":
                summary[name]["kl_to_sft"] = sum(row["kl"] for row in rows) / len(rows)
        del model, reference
        say(f"  {name}: {judge_name(judge)} score greedy {summary[name]['greedy']['score']:.3f}, "
            f"sampled {summary[name]['sampled']['score']:.3f}")

    win_rates = []
    pair_judge = scorer.pair_judge()
    for a, b in ((rl, "sft"), (rl, "base"), ("sft", "base")):
        for decoding in decodings:
            diffs = [x - y for x, y in zip(lengths[a][decoding], lengths[b][decoding])]
            result = win_rate(pair_judge, held, texts[a][decoding], texts[b][decoding], seed=cfg.seed, length_diffs=diffs)
            lc = result.length_controlled
            row = {"model": a, "against": b, "decoding": decoding, "win_rate": result.win_rate, "low": result.low,
                   "high": result.high, "wins": result.wins, "ties": result.ties, "losses": result.losses,
                   "length_controlled": lc.win_rate, "length_controlled_low": lc.low, "length_controlled_high": lc.high}
            win_rates.append(row)
            say(f"  {a} vs {b} ({decoding}): {result}")

    samples = []
    for i in range(min(cfg.report_samples, len(held))):
        samples.append({
            "prompt": held[i].messages[-1].content, "messages": messages_to_dicts(held[i].messages),
            "family": held[i].meta.get("family", ""),
            "responses": {name: texts[name]["greedy"][i] for name in models},
            "gold": {name: summary[name]["greedy"]["scores"][i] for name in models},
        })
    result = {"judge": judge_name(judge), "prompts": len(held), "temperature": cfg.temperature, "rl": rl,
              "models": summary, "win_rates": win_rates, "samples": samples}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "eval.json")
    log.remove()
    headline_row = next(r for r in win_rates if r["against"] == "sft" and r["decoding"] == "greedy")
    mark_complete(out, {"stage": "eval", "judge": result["judge"], "headline": (
        f"{rl} vs SFT (greedy): {100 * headline_row['win_rate']:.1f}% "
        f"[{100 * headline_row['low']:.1f}, {100 * headline_row['high']:.1f}]")})
    return result


def judge_name(spec: str) -> str:
    return "gold" if spec == "gold" else "rm"

