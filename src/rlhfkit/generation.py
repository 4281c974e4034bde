"""The generation seam: chat prompts in, answers out, through one engine, sampler and stop rule.

Every caller generates here: the RL stages' rollouts, labels, evaluation, best-of-N, `rlhfkit
sample`, `serve` and `chat`. An answer ends after its first end-of-turn (or eos) token;
``finished`` says whether one came (the PPO "EOS trick" penalises answers that never end).
Sampling is plain softmax(logits / T), T = 0 greedy; ``top_p`` exists for serving only.
The engine below (``rlhfkit.engines``) is the built-in decoder.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit import processes
from rlhfkit.data.records import Messages
from rlhfkit.data.tokenize import end_of_turn_id, prompt_ids
from rlhfkit.engines import Output, SamplingParams
from rlhfkit.engines.builtin import BuiltinEngine
from rlhfkit.errors import RlhfkitError


@dataclass
class Generation:
    text: str  # decoded response without special tokens
    token_ids: list[int]  # response tokens, up to and including the end-of-turn token if any
    finished: bool  # True when the response ended with the end-of-turn token
    logprobs: list[float] | None = None  # each token's sampling logprob, when asked for


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokens that end an answer: the chat template's end of turn and the tokenizer's eos."""
    return tuple(sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None}))


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 16,
    precision: str = "fp32",
    generator_seed: int | None = None,
    progress: str = "",
    logprobs: bool = False,
    seeds: list[int] | None = None,
    spread: bool = False,
) -> list[Generation]:
    """One response per prompt, in the caller's order. ``temperature`` 0 means greedy decoding.
    At most ``batch_size`` prompts decode together; as answers finish, waiting prompts take their
    places. ``progress`` names a progress bar over the prompts (none when empty).

    Prompts are taken shortest first, so rows that decode together pad little. Each answer is
    sampled from its own RNG, ``request_seeds(generator_seed, ...)`` (or ``seeds``, one per
    prompt): an answer depends on its seed, not on the batch or process that generates it, and
    the training RNG stream is left alone (exact resume depends on that).

    ``spread``: under several processes (torchrun, accelerate launch) each generates its share of
    the prompts and every process gets every answer."""
    if seeds is None and generator_seed is not None:
        seeds = request_seeds(generator_seed, len(prompts))
    if spread and processes.distributed():
        mine = processes.share(len(prompts))
        return processes.gather(generate(model, tokenizer, prompts[mine], max_new_tokens, temperature, batch_size,
                                         precision, progress=progress if processes.is_main() else "",
                                         logprobs=logprobs, seeds=None if seeds is None else seeds[mine]))
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    engine = BuiltinEngine(model, tokenizer.pad_token_id, precision, batch_size)
    params = SamplingParams(max_new_tokens, temperature, stop_ids(tokenizer), logprobs=logprobs)
    with progress_bar(progress, len(prompts)) as advance:
        outputs = engine.generate([encoded[i] for i in order], params, on_finished=advance,
                                  seeds=None if seeds is None else [seeds[i] for i in order])
    results: list[Generation | None] = [None] * len(prompts)
    for i, output in zip(order, outputs):
        results[i] = as_generation(output, tokenizer)
    return results  # type: ignore[return-value]


def request_seeds(seed: int, n: int) -> list[int]:
    """One sampling seed per request of a batch seeded ``seed``: request i's answer depends on
    (seed, i) only, so a batch split across processes samples what it samples whole."""
    return [(seed * 1_000_003 + i) % 2**63 for i in range(n)]


class SavedModelSampler:
    """A saved model (a folder or a built-in name) held for a block of sampling, through the
    engine ``rollout.engine`` names: the built-in decoder on the model loaded here (or on
    ``loaded``), or vLLM started from the folder and closed at the end of the ``with`` block.
    Commands that sample a model they do not train (labels, best-of-N, eval) and online DPO's
    rounds, which leave the memory to training in between. ``seed``: the built-in tiny model's
    initialisation."""

    def __init__(self, name: str, tokenizer: PreTrainedTokenizerBase, model_cfg, rollout, batch_size: int,
                 seed: int = 0, loaded: PreTrainedModel | None = None):
        from rlhfkit.models import TINY, load_model, resolve, save_model

        self.tokenizer, self.precision, self.batch_size = tokenizer, model_cfg.precision, batch_size
        self.model, self.engine = loaded, None
        if rollout.engine != "vllm":
            if self.model is None:
                self.model = load_model(model_cfg, tokenizer, seed=seed, path=name)
            return
        from rlhfkit.engines.vllm import VLLMEngine, require_vllm

        require_vllm()
        folder = resolve(name)
        with contextlib.ExitStack() as stack:
            if name == TINY:  # built on the fly: vLLM reads it from a temporary folder
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="rlhfkit-vllm-"))
                save_model(load_model(model_cfg, tokenizer, seed=seed, path=TINY), tokenizer, Path(folder))
            self.engine = VLLMEngine(folder, self.precision, rollout.vllm_memory)

    def generate(self, prompts: list[Messages], max_new_tokens: int, temperature: float,
                 seeds: list[int] | None = None, spread: bool = False, progress: str = "") -> list[Generation]:
        """As ``generate``: one answer per prompt, each from its seed; ``spread`` across processes."""
        if self.engine is None:
            return generate(self.model, self.tokenizer, prompts, max_new_tokens, temperature, self.batch_size,
                            self.precision, progress=progress, seeds=seeds, spread=spread)
        if spread and processes.distributed():
            mine = processes.share(len(prompts))
            return processes.gather(self.generate(prompts[mine], max_new_tokens, temperature,
                                                  None if seeds is None else seeds[mine]))
        return engine_generate(self.engine, self.tokenizer, prompts, max_new_tokens, temperature, seeds)

    def __enter__(self) -> SavedModelSampler:
        return self

    def __exit__(self, *exc) -> None:
        if self.engine is not None:
            self.engine.close()


def engine_generate(engine, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages], max_new_tokens: int,
                    temperature: float, seeds: list[int] | None, logprobs: bool = False) -> list[Generation]:
    """Chat prompts through an engine that takes token ids (vLLM), answers with their text."""
    params = SamplingParams(max_new_tokens, temperature, stop_ids(tokenizer), logprobs=logprobs)
    outputs = engine.generate([prompt_ids(tokenizer, p) for p in prompts], params, seeds=seeds)
    return [as_generation(output, tokenizer) for output in outputs]


def sampling_logprobs(gens: list[Generation], width: int) -> torch.Tensor:
    """The answers' sampling logprobs right-padded with 0 to ``width`` response columns, (B, width)."""
    out = torch.zeros(len(gens), width)
    for row, g in enumerate(gens):
        out[row, : len(g.logprobs)] = torch.tensor(g.logprobs[:width])
    return out


def as_generation(output: Output, tokenizer: PreTrainedTokenizerBase) -> Generation:
    """An engine's output with its text: the tokens before the stop token, special tokens skipped."""
    shown = output.token_ids[:-1] if output.finished else output.token_ids
    return Generation(tokenizer.decode(shown, skip_special_tokens=True), output.token_ids, output.finished,
                      output.logprobs)


class Sampler:
    """Rollouts of a policy that trains, through the engine ``rollout.engine`` names: the built-in
    decoder reads the policy's weights as they are; vLLM gets them pushed by ``load_weights``
    after every update."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rollout, precision: str,
                 seed: int = 0):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.engine = None
        if rollout.engine == "vllm":
            from rlhfkit.engines.vllm import VLLMEngine, require_vllm
            from rlhfkit.models import save_model

            require_vllm()  # before writing the folder: a missing install fails at once
            from rlhfkit.models import splits_weights

            if splits_weights(model):
                raise RlhfkitError("--rollout.engine vllm does not run with FSDP or ZeRO-3 yet (the weights would have to "
                                   "be gathered for every push): launch with a DDP or ZeRO-2 config, or use --rollout.engine builtin")
            # vLLM starts from a model folder (read once, at start), then takes the pushes.
            with tempfile.TemporaryDirectory(prefix="rlhfkit-rollout-") as folder:
                save_model(model, tokenizer, Path(folder))
                self.engine = VLLMEngine(folder, precision, rollout.vllm_memory, seed=seed, sleep=rollout.vllm_sleep)

    def generate(self, prompts: list[Messages], max_new_tokens: int, temperature: float, batch_size: int,
                 seeds: list[int], logprobs: bool = False) -> list[Generation]:
        """One answer per prompt, each sampled from its seed (``request_seeds``)."""
        if self.engine is None:
            return generate(self.model, self.tokenizer, prompts, max_new_tokens, temperature, batch_size,
                            self.precision, logprobs=logprobs, seeds=seeds)
        answers = engine_generate(self.engine, self.tokenizer, prompts, max_new_tokens, temperature, seeds, logprobs)
        self.engine.rest()  # sleep mode: training gets vLLM's memory until the next push wakes it
        return answers

    def load_weights(self, model: PreTrainedModel) -> None:
        if self.engine is not None:
            self.engine.load_weights(model)


class Answerer:
    """A model held for answering one prompt at a time, token by token (`rlhfkit serve` and
    `chat`): its weights do not change, so they are cast for decoding once, here."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, precision: str = "fp32"):
        self.engine = BuiltinEngine(model, tokenizer.pad_token_id, precision, batch_size=1, frozen=True)
        self.stop = stop_ids(tokenizer)

    def stream(self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> Iterator[int]:
        """The answer's tokens as they are generated, through the stop token if one comes. Close
        the iterator (or stop consuming it and drop it) to stop the generation."""
        return self.engine.stream(ids, SamplingParams(max_new_tokens, temperature, self.stop, top_p), generator)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins a stop string: it may still become one."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class Detokenizer:
    """Generated tokens in, text pieces to send out, the answer cut before the first stop string.

    Each step decodes all tokens so far (cheap next to a forward pass) rather than token by
    token: a token need not be whole characters (byte-level BPE splits UTF-8), so text is sent
    only once it is complete, and never the end that might still turn into a stop string.
    Every piece extends what was sent, so the pieces always add up to the answer.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was generated

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            return self._send(text[: min(cuts)])
        ready = text.rstrip("\ufffd")  # a character whose remaining bytes are still to come
        return self._send(ready[: len(ready) - held_back(ready, self.stops)])

    def flush(self) -> str:
        """What is left once generation has ended without a stop string."""
        return "" if self.stopped else self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _send(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


@contextlib.contextmanager
def progress_bar(description: str, total: int):
    """A transient rich progress bar over ``total`` prompts; yields ``advance(n)``. No bar when
    ``description`` is empty."""
    if not description:
        yield lambda n: None
        return
    from rich.progress import Progress

    from rlhfkit.progress import columns

    with Progress(*columns(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
