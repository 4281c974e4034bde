"""Canonical records that flow between readers, the task world and the training stages.

Every reader (``formats.py``) and the built-in world (``world.py``) produce these; every stage
consumes them. A prompt is always a list of chat messages, so plain-text prompts become a single
user message and multi-turn transcripts keep their history.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from rlhfkit.errors import RlhfkitError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


Messages = tuple[Message, ...]


def user(text: str) -> Messages:
    """A one-turn prompt: the common case for plain-text prompts."""
    return (Message("user", text),)


@dataclass(frozen=True)
class Prompt:
    """A prompt to sample from. ``meta`` carries world task data (family, answer, constraints)."""

    messages: Messages
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Demonstration:
    """An SFT example: the prompt conversation and the assistant's response to its last turn."""

    prompt: Messages
    response: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Comparison:
    """A pairwise preference: ``chosen`` was preferred to ``rejected`` (optionally by ``margin``)."""

    prompt: Messages
    chosen: str
    rejected: str
    margin: float | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Ranking:
    """K completions of one prompt with a rank each: 0 is best, equal ranks are ties.

    ``ranks[i]`` is the rank of ``completions[i]``; e.g. ranks (1, 0, 1) means completion 1 is best
    and completions 0 and 2 are tied behind it.
    """

    prompt: Messages
    completions: tuple[str, ...]
    ranks: tuple[int, ...]
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) index pairs; tied pairs are skipped (InstructGPT eq. 1)."""
        k = len(self.completions)
        return [
            (i, j) if self.ranks[i] < self.ranks[j] else (j, i)
            for i in range(k)
            for j in range(i + 1, k)
            if self.ranks[i] != self.ranks[j]
        ]

    def best_worst(self) -> Comparison | None:
        """The best vs the worst completion, or None when all are tied."""
        best = min(range(len(self.ranks)), key=lambda i: self.ranks[i])
        worst = max(range(len(self.ranks)), key=lambda i: self.ranks[i])
        if self.ranks[best] == self.ranks[worst]:
            return None
        return Comparison(self.prompt, self.completions[best], self.completions[worst], meta=self.meta)

    def to_comparisons(self) -> list[Comparison]:
        return [
            Comparison(self.prompt, self.completions[i], self.completions[j], meta=self.meta)
            for i, j in self.pairs()
        ]


Record = Prompt | Demonstration | Comparison | Ranking


def messages_to_dicts(messages: Messages) -> list[dict]:
    return [m.to_dict() for m in messages]


def prompt_bucket(messages: Messages) -> float:
    """A stable number in [0, 1) from the prompt text, for held-out splits: the same prompt always
    lands on the same side, so no prompt is both trained on and evaluated."""
    text = json.dumps(messages_to_dicts(messages))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def split_by_prompt(records: list, fraction: float, source: str) -> tuple[list, list]:
    """(train, held out): records whose ``prompt_bucket`` is below ``fraction`` are held out.
    Refuses a split that leaves nothing to train on, and says when nothing is held out."""
    held = [r for r in records if prompt_bucket(r.prompt) < fraction]
    train = [r for r in records if prompt_bucket(r.prompt) >= fraction]
    if not train:
        raise RlhfkitError(f"{source}: all {len(records)} records fell in the held-out share (eval_fraction "
                           f"{fraction}); pass more data, a smaller --data.eval-fraction or a --data.eval file")
    if not held and fraction > 0:
        print(f"warning: {source}: none of its {len(records)} records fell in the held-out share (eval_fraction "
              f"{fraction}), so nothing is evaluated; pass more data or a --data.eval file")
    return train, held
