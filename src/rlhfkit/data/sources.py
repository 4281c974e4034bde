"""Where prompts and demonstrations come from: the built-in task world (the default, whose gold
judge scores answers) or a data file. The only module that knows the name "world"."""

from __future__ import annotations

from typing import Any, Callable

from rlhfkit.data.formats import read_prompts
from rlhfkit.data.records import Prompt
from rlhfkit.data.world import World

WORLD = "world"  # any other source names a file (or an hh-rlhf folder)


def is_world(source: str | None) -> bool:
    return source == WORLD


def world_of(source: str | None, seed: int) -> World | None:
    """The task world behind ``source`` (its prompts, gold judge, demonstrations), or None for a file."""
    return World(seed=seed) if is_world(source) else None


def load_prompts(source: str, n: int, split: str, seed: int, say: Callable[[str], None] | None = print,
                 **read: Any) -> list[Prompt]:
    """``n`` prompts of the world's ``split``, or a file's prompts (``read``: ``read_prompts``'
    options), whose reading report goes to ``say``."""
    if is_world(source):
        return World(seed=seed).prompts(n, split)
    prompts, report = read_prompts(source, **read)
    if say is not None:
        say(report.summary())
    return prompts


def gold_prompts(source: str, n: int, seed: int) -> list[Prompt]:
    """Held-out world prompts for the gold judge's evaluations; none for a file (no gold judge)."""
    return World(seed=seed).prompts(n, "eval") if is_world(source) else []
