"""Generation engines: what the generation seam (``rlhfkit.generation``) runs on.

An engine takes prompts as token ids and gives back, for each, its new token ids through the
first stop token, whether a stop token ended it, and (when asked) each token's logprob under the
distribution it was sampled from. ``load_weights`` hands it a policy's new weights after an
update. The built-in engine (``builtin.py``) decodes with the training model itself; an engine
that runs elsewhere (vLLM) takes the same calls, the weights pushed to it in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """One sampler for every caller: softmax(logits / temperature), optionally cut to the
    smallest set of tokens whose probability reaches ``top_p``; temperature 0 is greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    stop: tuple[int, ...] = ()  # token ids that end an answer (end of turn, eos): the one stop rule
    top_p: float = 1.0  # < 1 only for serving: RL's logprobs assume the plain softmax
    logprobs: bool = False  # also return each token's log softmax(logits / T) (T = 1 when greedy)


@dataclass
class Output:
    token_ids: list[int]  # new tokens, through the first stop token when one came
    finished: bool  # True when a stop token ended it (False: cut at max_new_tokens)
    logprobs: list[float] | None = None  # one per token when SamplingParams.logprobs


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, *, on_finished=None,
                 seeds: list[int] | None = None) -> list[Output]:
        """One answer per prompt, in the prompts' order; ``on_finished(n)`` as answers end.
        ``seeds``: one per prompt, each answer sampled from its own; None: unseeded."""
        ...

    def stream(self, prompt: list[int], params: SamplingParams,
               generator: torch.Generator | None = None) -> Iterator[int]:
        """One answer's tokens as they come; closing the iterator stops the generation."""
        ...

    def load_weights(self, model: torch.nn.Module) -> None:
        """Generate with ``model``'s current weights from now on."""
        ...
