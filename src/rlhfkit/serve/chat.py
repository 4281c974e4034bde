"""`rlhfkit chat MODEL`: talk to a model in the terminal, its answer streamed as it is generated.

The whole conversation is rendered by the tokenizer's chat template each turn (``prompt_ids``,
the same rendering training and rollouts use), so a model answers here exactly as it would in
an evaluation, through the same decoder (``generation.Answerer``). It decodes in the main thread,
the one that receives Ctrl-C: KeyboardInterrupt stops the answer without leaving the program.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import tyro
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.config import ModelConfig
from rlhfkit.data.records import Message, Messages
from rlhfkit.data.tokenize import prompt_ids
from rlhfkit.errors import ConfigError
from rlhfkit.models import load_model, load_tokenizer
from rlhfkit.generation import Answerer, Detokenizer

HELP = "/reset clears the history, /system TEXT sets the system prompt, /quit or Ctrl-D exits, Ctrl-C stops an answer"
USER_PROMPT = "you> "
ANSWER_PREFIX = "model> "


@dataclass
class ChatConfig:
    """Streaming terminal chat with a model; the conversation is kept across turns."""

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    """Built-in name (`tiny`, `smollm2-135m-instruct`), a local model folder (e.g. the output of `rlhfkit sft`), or a hub id."""
    temperature: float = 0.7
    """Sampling temperature; 0 = greedy decoding."""
    max_new_tokens: int = 256
    """Longest answer, in tokens."""
    system: str = ""
    """System prompt (empty: none, so the chat template's default applies if it has one)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` (default): bf16 autocast where it measures clearly faster for this model on this machine, else fp32 (measured once, cached). `bf16`: forward passes under bf16 autocast, weights stay fp32. `fp32`."""
    seed: int = 0
    """Sampling seed (and the `tiny` model's initialisation)."""


# --- the conversation: pure state, no model ---------------------------------------------------


@dataclass
class Conversation:
    """A system prompt and the turns so far: user, assistant, user, assistant, ..."""

    system: str = ""
    turns: list[Message] = field(default_factory=list)

    def messages(self) -> Messages:
        """What the chat template renders: the system prompt (if any), then every turn."""
        head = (Message("system", self.system),) if self.system else ()
        return head + tuple(self.turns)

    def reset(self) -> None:
        self.turns.clear()

    def set_system(self, text: str) -> None:
        """A new system prompt starts a new conversation: old answers were written without it."""
        self.system = text
        self.reset()

    def drop_oldest_exchange(self) -> None:
        del self.turns[:2]  # a user message and the answer to it, so roles keep alternating


def command(conv: Conversation, line: str) -> str | None:
    """Apply a `/command` to the conversation; returns what to tell the user, or None to quit."""
    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return None
    if name == "/reset":
        conv.reset()
        return "(history cleared)"
    if name == "/system":
        conv.set_system(arg.strip())
        said = f"set to {conv.system!r}" if conv.system else "removed"
        return f"(system prompt {said}; history cleared)"
    return f"(unknown command {name}; {HELP})"


def fit_context(conv: Conversation, tokenizer: PreTrainedTokenizerBase, budget: int | None) -> tuple[list[int], int]:
    """Token ids of the conversation's prompt, dropping the oldest exchanges until it is at most
    ``budget`` tokens (None: no limit). Returns (ids, exchanges dropped). When the last user
    message alone is too long, the conversation is left as it was and the ids are too long."""
    trial = Conversation(conv.system, list(conv.turns))
    ids = prompt_ids(tokenizer, trial.messages())
    while budget is not None and len(ids) > budget and len(trial.turns) > 1:
        trial.drop_oldest_exchange()
        ids = prompt_ids(tokenizer, trial.messages())
    if budget is not None and len(ids) > budget:
        return ids, 0
    dropped = (len(conv.turns) - len(trial.turns)) // 2
    conv.turns[:] = trial.turns
    return ids, dropped


def context_length(model: PreTrainedModel) -> int | None:
    """Positions the model was built for (None when its config does not say)."""
    return getattr(model.config, "max_position_embeddings", None)


# --- generation -------------------------------------------------------------------------------


def stream_answer(answerer: Answerer, tokenizer: PreTrainedTokenizerBase, ids: list[int], cfg: ChatConfig,
                  max_new_tokens: int) -> tuple[str, str]:
    """Generate an answer to the prompt ``ids``, printing it as it comes. Returns (the answer text,
    a note for the user: "" when it ended with the end-of-turn token)."""
    text = Detokenizer(tokenizer, stops=())
    stop = set(answerer.stop)
    note = f"(cut at {max_new_tokens} tokens)"
    print(ANSWER_PREFIX, end="", flush=True)
    try:
        with contextlib.closing(answerer.stream(ids, max_new_tokens, cfg.temperature)) as tokens:
            for token in tokens:
                if token in stop:
                    note = ""
                    break
                print(text.add(token), end="", flush=True)
    except KeyboardInterrupt:  # Ctrl-C stops the answer, not the program
        note = "(stopped)"
    print(text.flush())
    return text.sent, note


# --- the loop ---------------------------------------------------------------------------------


def chat(cfg: ChatConfig) -> None:
    if cfg.max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be positive, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    # Ctrl-C stops an answer. A process started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: restore it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from rlhfkit.precision import resolve

    cfg.precision = resolve(cfg.precision, cfg.model, flag="--precision")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(ModelConfig(name=cfg.model, precision=cfg.precision), tokenizer, seed=cfg.seed,
                       training=False)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    answerer = Answerer(model, tokenizer, cfg.precision)  # casts the weights for decoding once
    torch.manual_seed(cfg.seed)
    ctx = context_length(model)
    # Leave room for an answer; a long answer may still use up to the rest of the context.
    budget = None if ctx is None else ctx - min(cfg.max_new_tokens, ctx // 2)
    conv = Conversation(system=cfg.system)
    print(f"rlhfkit chat: {cfg.model} | {HELP}", flush=True)

    while True:
        try:
            line = input(USER_PROMPT).strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # at the prompt Ctrl-C only clears the line, as in Python's REPL
            print(f"\n({HELP})")
            continue
        if not line:
            continue
        if line.startswith("/"):
            reply = command(conv, line)
            if reply is None:
                return
            print(reply)
            continue
        conv.turns.append(Message("user", line))
        ids, dropped = fit_context(conv, tokenizer, budget)
        if dropped:
            print(f"(dropped the oldest {dropped} exchange(s): the conversation outgrew the model's {ctx}-token context)")
        if budget is not None and len(ids) > budget:
            conv.turns.pop()
            print(f"(message too long: {len(ids)} tokens; the model's {ctx}-token context holds {budget} "
                  f"besides the answer; not sent)")
            continue
        room = cfg.max_new_tokens if ctx is None else min(cfg.max_new_tokens, ctx - len(ids))
        answer, note = stream_answer(answerer, tokenizer, ids, cfg, room)
        conv.turns.append(Message("assistant", answer))
        if note:
            print(note)
