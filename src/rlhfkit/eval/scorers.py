"""Who scores a response: the one resolver from a user's spec to a scorer, for the RL stages'
reward, best-of-N and the pipeline's evaluation. A spec is ``gold`` (the built-in world's gold
judge), a reward-model folder (or hub id), or a user's ``module:function``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhfkit.data.records import Prompt, messages_to_dicts
from rlhfkit.data.world import World
from rlhfkit.errors import RlhfkitError
from rlhfkit.eval.winrate import PairJudge
from rlhfkit.reward import RewardModel

GOLD = "gold"


@dataclass
class Scorer:
    """``scorer(prompts, responses)``: one number per response, higher is better."""

    spec: str
    world: World | None = None  # the gold judge
    rm: RewardModel | None = None  # a reward model (scores normalised: reference responses mean 0)
    fn: Callable | None = None  # a user's module:function

    def __call__(self, prompts: list[Prompt], texts: list[str]) -> list[float]:
        if self.world is not None:
            return [s.score for s in self.world.judge_many(prompts, texts)]
        if self.rm is not None:
            return self.rm.score([p.messages for p in prompts], texts)
        return [float(x) for x in self.fn([messages_to_dicts(p.messages) for p in prompts], texts)]

    def pair_judge(self) -> PairJudge:
        """The same scorer as a pairwise judge: the higher score wins, equal scores tie."""
        if self.world is not None:
            from rlhfkit.eval.winrate import gold_pair_judge

            return gold_pair_judge(self.world)
        if self.rm is not None:
            from rlhfkit.eval.judges import reward_model_judge

            return reward_model_judge(self.rm)
        raise RlhfkitError(f"'{self.spec}' scores responses but is no pairwise judge; use gold or a reward model")


def reward_function(spec: str, world_seed: int = 0, precision: str = "fp32", offload: bool = False) -> Scorer:
    """The scorer ``spec`` names: ``gold`` (to study over-optimisation without a learned RM), a
    reward-model folder, or a user's ``module:function`` taking (prompts as lists of message
    dicts, responses) and returning one number per response. ``offload``: a reward model's
    weights stay in host memory (``models.offload_to_host``)."""
    if spec == GOLD:
        return Scorer(spec, world=World(seed=world_seed))
    if ":" in spec and not Path(spec).exists():
        module, name = spec.split(":", 1)
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise RlhfkitError(f"reward '{spec}': cannot import {name} from {module} ({e})") from None
        return Scorer(spec, fn=fn)
    # A policy sample is scored from its decoded text as a finished turn (end-of-turn and the
    # template's suffix appended, the layout the RM was trained on), so a finished sample gets
    # exactly its apply_chat_template score. One cut at max_new_tokens is scored the same way;
    # PPO's missing_eos_penalty replaces that score when set.
    return Scorer(spec, rm=RewardModel.load(spec, precision=precision, offload=offload))
