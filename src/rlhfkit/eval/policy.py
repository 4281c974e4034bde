"""Evaluate a policy being trained against its starting point (the SFT model) under the gold judge.

Every preference-learning stage (PPO, DPO, online DPO, GRPO) reports the same numbers, so they
are comparable across algorithms: the held-out greedy gold score at each evaluation, and at the
end the gold win rate against the reference, greedy and sampled at the training temperature
(each pair judged in both orders, ties counted half, bootstrap 95% interval).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch

from rlhfkit.data.records import Prompt
from rlhfkit.data.world import World
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.gold import GoldReport, gold_evaluate
from rlhfkit.eval.winrate import gold_pair_judge, win_rate
from rlhfkit.models import frozen_reference  # noqa: F401  (stages and tests import it from here too)


@dataclass
class PolicyEvaluator:
    """Greedy gold score of ``policy``; with ``final``, also win rates against the reference."""

    policy: torch.nn.Module
    reference: Callable[[], ContextManager] | None  # enters a context that yields the reference model
    tokenizer: object
    world: World | None  # the gold judge; None when the prompts come from a file (then there are none)
    prompts: list[Prompt]
    max_new_tokens: int
    batch_size: int
    precision: str
    temperature: float  # the training temperature, for the sampled win rate
    say: Callable[[str], None] = print
    reference_cache: dict[str, list[str]] = field(default_factory=dict)  # temperature -> answers

    def answers(self, model, temperature: float) -> GoldReport:
        return gold_evaluate(model, self.tokenizer, self.world, self.prompts, max_new_tokens=self.max_new_tokens,
                             batch_size=self.batch_size, precision=self.precision, temperature=temperature)

    def reference_texts(self, temperature: float) -> list[str]:
        """The reference's answers: remembered by ``snapshot_reference``, else generated now."""
        if str(temperature) in self.reference_cache:
            return self.reference_cache[str(temperature)]
        if self.reference is None:
            raise RuntimeError("no reference model and no snapshot of its answers")
        with self.reference() as ref:
            return [g.text for g in self.answers(ref, temperature).generations]

    def snapshot_reference(self) -> dict[str, list[str]]:
        """Remember the reference's answers (greedy and sampled), for stages that keep no reference
        model: the policy's answers, so call it before the first update, while it is the reference,
        and save the result with the run so a resumed run compares against the same answers."""
        self.say(f"remembering the starting policy's answers to {len(self.prompts)} held-out prompts (greedy and sampled)")
        self.reference_cache = {str(t): [g.text for g in self.answers(self.policy, t).generations]
                                for t in (0.0, self.temperature)}
        return self.reference_cache

    def __call__(self, step: int, final: bool = False) -> dict[str, float]:
        if not self.prompts:
            return {}
        report = self.answers(self.policy, 0.0)
        self.say(f"step {step}: eval/gold_score={report.score:.4f} eos={report.eos_fraction:.2f}")
        metrics = report.metrics()
        if final:
            judge = gold_pair_judge(self.world)
            for name, temperature in (("", 0.0), ("_sampled", self.temperature)):
                theirs = self.reference_texts(temperature)
                ours = report if temperature == 0 else self.answers(self.policy, temperature)
                result = win_rate(judge, self.prompts, [g.text for g in ours.generations], theirs)
                metrics.update(result.metrics(f"eval/vs_sft{name}_"))
                scores = [s.score for s in self.world.judge_many(self.prompts, theirs)]
                metrics[f"eval/sft{name}_gold_score"] = sum(scores) / len(scores)
                self.say(f"gold win rate vs SFT{name.replace('_', ', ')}: {result}")
        return metrics


def remember_reference_answers(evaluator: PolicyEvaluator, path: Path, resuming: bool) -> None:
    """For stages that keep no reference model: the starting policy's answers, taken before the
    first update and saved with the run (``path``), read back when the run resumes."""
    if path.exists():
        evaluator.reference_cache = json.loads(path.read_text())
    elif resuming:
        raise RlhfkitError(f"resuming needs {path} (the starting policy's answers), which is missing")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(evaluator.snapshot_reference()))
        tmp.replace(path)
