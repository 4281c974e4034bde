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

from rlhfkit.data.records import Prompt, messages_to_dicts
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.winrate import bootstrap_interval
from rlhfkit.train.loop import mark_complete


def held_out_prompts(source: str, n: int, fraction: float) -> list[Prompt]:
    """The world's eval split, or the prompts of a data file's held-out share (by prompt hash, the
    same rule the training stages use to hold data out)."""
    if source == "world":
        from rlhfkit.data.world import World

        return World(seed=0).prompts(n, "eval")
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


class Judge:
    """Scores responses: the gold judge (world prompts) or a reward model folder."""

    def __init__(self, spec: str, precision: str):
        self.spec = spec
        if spec == "gold":
            from rlhfkit.data.world import World

            self.world = World(seed=0)
        else:
            from rlhfkit.reward import RewardModel

            self.rm = RewardModel.load(spec, precision=precision)

    def scores(self, prompts: list[Prompt], texts: list[str]) -> list[float]:
        if self.spec == "gold":
            return [s.score for s in self.world.judge_many(prompts, texts)]
        return self.rm.score([p.messages for p in prompts], texts)

    def pair_judge(self):
        """The same judge, pairwise: higher score wins, equal scores tie."""
        if self.spec == "gold":
            from rlhfkit.eval.winrate import gold_pair_judge

            return gold_pair_judge(self.world)
        from rlhfkit.eval.judges import reward_model_judge

        return reward_model_judge(self.rm)


def load(path: str, seed: int):
    """(model, tokenizer) of a model folder or built-in name."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(path)
    return load_model(ModelConfig(name=path), tokenizer, seed=seed), tokenizer


def evaluate_run(models: dict[str, str], rl: str, judge: str, prompts: str, cfg: Any, out: Path) -> dict:
    """``models``: display name -> model (base, sft, the RL stage), in that order."""
    from rich.console import Console

    from rlhfkit.eval.evaluate import sequence_kl
    from rlhfkit.eval.winrate import win_rate
    from rlhfkit.rollout import generate

    from rlhfkit.precision import resolve

    say = Console(highlight=False).print
    cfg = dataclasses.replace(cfg, precision=resolve(cfg.precision, next(iter(models.values())), say,
                                                     flag="eval.precision"))
    held = held_out_prompts(prompts, cfg.prompts, cfg.held_out_fraction)
    scorer = Judge(judge, cfg.precision)
    decodings = {"greedy": 0.0, "sampled": cfg.temperature}
    texts: dict[str, dict[str, list[str]]] = {}
    lengths: dict[str, dict[str, list[int]]] = {}  # response tokens, for the length-controlled win rate
    summary: dict[str, dict] = {}
    for name, path in models.items():
        say(f"eval: {name} ({path}) answers {len(held)} held-out prompts, greedy and sampled at T={cfg.temperature}")
        summary[name] = {"path": path, "kl_to_sft": None}
        texts[name], lengths[name] = {}, {}
        model, tokenizer = load(path, cfg.seed)
        for decoding, temperature in decodings.items():
            generations = generate(model, tokenizer, [p.messages for p in held], cfg.max_new_tokens,
                                   temperature=temperature, batch_size=cfg.batch_size, precision=cfg.precision,
                                   generator_seed=cfg.seed, progress=f"{name}, {decoding}")
            texts[name][decoding] = [g.text for g in generations]
            lengths[name][decoding] = [len(g.token_ids) for g in generations]
            scores = scorer.scores(held, texts[name][decoding])
            low, high = bootstrap_interval(scores, seed=cfg.seed)
            summary[name][decoding] = {
                "score": sum(scores) / len(scores), "score_low": low, "score_high": high,
                "eos_fraction": sum(g.finished for g in generations) / len(generations),
                "response_tokens": sum(len(g.token_ids) for g in generations) / len(generations),
                "scores": scores,
            }
            if name == rl and decoding == "sampled":
                # k1 KL estimate on the RL model's own samples: unbiased when sampled at T = 1.
                reference, _ = load(models["sft"], cfg.seed)
                kl = sequence_kl(model, reference, tokenizer, [p.messages for p in held], generations,
                                 batch_size=cfg.batch_size, precision=cfg.precision)
                summary[name]["kl_to_sft"] = sum(kl) / len(kl)
                del reference
        del model
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
    headline_row = next(r for r in win_rates if r["against"] == "sft" and r["decoding"] == "greedy")
    mark_complete(out, {"stage": "eval", "judge": result["judge"], "headline": (
        f"{rl} vs SFT (greedy): {100 * headline_row['win_rate']:.1f}% "
        f"[{100 * headline_row['low']:.1f}, {100 * headline_row['high']:.1f}]")})
    return result


def judge_name(spec: str) -> str:
    return "gold" if spec == "gold" else "rm"

