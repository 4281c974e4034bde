"""Gold-judge evaluation: answer held-out world prompts and score them with the world's judge.

The gold judge is separate from any learned reward model, so this measures true improvement.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from rlhfkit.data.records import Prompt
from rlhfkit.data.world import World
from rlhfkit.generation import Generation, generate


@dataclass
class GoldReport:
    score: float  # mean gold score in [0, 1]
    by_family: dict[str, float]
    eos_fraction: float  # share of responses that ended with the end-of-turn token
    mean_tokens: float  # mean response length in tokens
    prompts: list[Prompt]
    generations: list[Generation]
    scores: list[float]

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {
            f"{prefix}gold_score": self.score,
            f"{prefix}eos_fraction": self.eos_fraction,
            f"{prefix}response_tokens": self.mean_tokens,
        }
        out.update({f"{prefix}gold/{family}": value for family, value in sorted(self.by_family.items())})
        return out


def gold_evaluate(model, tokenizer, world: World, prompts: list[Prompt], *, max_new_tokens: int,
                  batch_size: int = 16, precision: str = "fp32", temperature: float = 0.0) -> GoldReport:
    generations = generate(
        model, tokenizer, [p.messages for p in prompts], max_new_tokens,
        temperature=temperature, batch_size=batch_size, precision=precision, generator_seed=0,
    )
    scores = [s.score for s in world.judge_many(prompts, [g.text for g in generations])]
    families: dict[str, list[float]] = defaultdict(list)
    for prompt, score in zip(prompts, scores):
        families[prompt.meta.get("family", "?")].append(score)
    n = max(1, len(prompts))
    return GoldReport(
        score=sum(scores) / n,
        by_family={f: sum(v) / len(v) for f, v in families.items()},
        eos_fraction=sum(g.finished for g in generations) / n,
        mean_tokens=sum(len(g.token_ids) for g in generations) / n,
        prompts=prompts,
        generations=generations,
        scores=scores,
    )
