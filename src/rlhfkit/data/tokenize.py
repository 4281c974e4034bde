"""Chat templates, loss masks, truncation and padding.

One rule makes training and generation agree: a prompt is rendered by the tokenizer's chat
template with the generation prompt (``<|im_start|>assistant\\n`` for ChatML), and a response is
the tokens the model would generate after it — the response text followed by the end-of-turn
token. Training on ``prompt_ids + response_ids`` with the loss on ``response_ids`` only is then
exactly the distribution a rollout samples from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.data.records import Demonstration, Message, Messages, messages_to_dicts

# Text is cut to ``max_len * CHARS_PER_TOKEN`` characters before tokenising: a token of natural
# text covers far fewer, so what ``fit`` keeps is unchanged, and a 20 MB field no longer takes
# ~4 GB and minutes to tokenise only to be cut to max_len tokens.
CHARS_PER_TOKEN = 32


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    return tokenizer.apply_chat_template(messages_to_dicts(messages), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages, max_len: int | None = None) -> list[int]:
    """Token ids of a prompt ready for generation; with ``max_len``, each message is first cut to
    its last ``max_len * CHARS_PER_TOKEN`` characters (``fit`` keeps a prompt's most recent tokens).

    The template already writes any BOS it wants, so we tokenize with add_special_tokens=False;
    otherwise tokenizers that add BOS themselves (Llama) would start with two of them.
    """
    if max_len:
        messages = tuple(Message(m.role, m.content[-max_len * CHARS_PER_TOKEN :]) for m in messages)
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return _end_of_turn_id(tokenizer)


@lru_cache(maxsize=8)
def _end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the chat template writes right after an assistant message.

    ChatML ends a turn with ``<|im_end|>`` (which is also EOS in SmolLM2), Llama 3 with
    ``<|eot_id|>`` (not its EOS). Rendering a sentinel message finds it for any template; we fall
    back to EOS when the template writes no special token there.
    """
    sentinel = "RLHFKIT_SENTINEL"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    tail = text[text.rindex(sentinel) + len(sentinel) :]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if ids and ids[0] in tokenizer.all_special_ids:
        return ids[0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither an end-of-turn special token nor an EOS token")
    return tokenizer.eos_token_id


def turn_suffix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return list(_turn_suffix_ids(tokenizer))


@lru_cache(maxsize=8)
def _turn_suffix_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokens a chat template writes after the last assistant turn's end-of-turn token: ``\\n``
    for ChatML (``<|im_end|>\\n``), nothing for Llama 3. A reward model reads the last token of the
    conversation as ``apply_chat_template`` tokenizes it, so its sequences end with these.
    Found by rendering a sentinel conversation; empty when the template writes no end-of-turn
    token there (EOS fallback)."""
    sentinel = "RLHFKIT_SENTINEL"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
    )
    ids = tokenizer(text[text.rindex(sentinel) + len(sentinel) :], add_special_tokens=False)["input_ids"]
    eot = end_of_turn_id(tokenizer)
    return tuple(ids[ids.index(eot) + 1 :]) if eot in ids else ()


def response_ids(tokenizer: PreTrainedTokenizerBase, response: str, max_len: int | None = None) -> list[int]:
    """Response tokens plus the end-of-turn token: what a rollout should produce. With
    ``max_len``, the text is first cut to its first ``max_len * CHARS_PER_TOKEN`` characters."""
    if max_len:
        response = response[: max_len * CHARS_PER_TOKEN]
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]


@dataclass
class Example:
    """One tokenized (prompt, response) pair; the loss covers ``response`` tokens only."""

    prompt: list[int]
    response: list[int]
    prompt_truncated: bool = False
    response_truncated: bool = False

    @property
    def input_ids(self) -> list[int]:
        return self.prompt + self.response

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


def fit(prompt: list[int], response: list[int], max_len: int) -> Example:
    """Truncate to ``max_len`` keeping what matters: the response and the most recent context.

    The prompt loses its oldest tokens first, but keeps at least ``max_len // 2`` of its last
    tokens (the question being answered); only then is the response cut at its end (losing EOS).
    """
    if len(prompt) + len(response) <= max_len:
        return Example(prompt, response)
    keep_prompt = max(max_len - len(response), min(len(prompt), max_len // 2))
    new_prompt = prompt[len(prompt) - keep_prompt :]
    new_response = response[: max_len - len(new_prompt)]
    return Example(new_prompt, new_response, len(new_prompt) < len(prompt), len(new_response) < len(response))


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: Messages, response: str, max_len: int) -> tuple[Example, int]:
    """(prompt, response) fitted to ``max_len``, and its length before ``fit`` (for a report)."""
    p, r = prompt_ids(tokenizer, prompt, max_len), response_ids(tokenizer, response, max_len)
    return fit(p, r, max_len), len(p) + len(r)


def tokenize_demonstration(tokenizer: PreTrainedTokenizerBase, demo: Demonstration, max_len: int) -> Example:
    return tokenize_pair(tokenizer, demo.prompt, demo.response, max_len)[0]


@dataclass
class TruncationReport:
    examples: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    longest: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def add(self, example: Example, original_len: int) -> None:
        self.examples += 1
        self.prompt_truncated += example.prompt_truncated
        self.response_truncated += example.response_truncated
        self.longest = max(self.longest, original_len)

    def summary(self, max_len: int) -> str:
        if not (self.prompt_truncated or self.response_truncated):
            return f"{self.examples} examples, none longer than max_seq_len={max_len} (longest {self.longest})"
        return (
            f"{self.examples} examples; longer than max_seq_len={max_len}: {self.prompt_truncated} lost "
            f"old prompt context, {self.response_truncated} lost the end of their response (longest {self.longest})"
        )


def tokenize_demonstrations(
    tokenizer: PreTrainedTokenizerBase, demos: list[Demonstration], max_len: int
) -> tuple[list[Example], TruncationReport]:
    report = TruncationReport()
    examples = []
    for demo in demos:
        ex, length = tokenize_pair(tokenizer, demo.prompt, demo.response, max_len)
        report.add(ex, length)
        examples.append(ex)
    return examples, report


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (B, T): sequences start at column 0."""
    width = max(1, max(len(s) for s in sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    return input_ids, attention_mask


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (B, T) for generation: every prompt ends
    at the last column, so new tokens are appended at the same position for the whole batch."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq) :] = torch.tensor(seq)
        attention_mask[i, width - len(seq) :] = 1
    return input_ids, attention_mask


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens every sequence starts with (0 for fewer than two), leaving each at least one more."""
    if len(sequences) < 2:
        return 0
    return max(0, min(len(os.path.commonprefix(sequences)), min(len(s) for s in sequences) - 1))


def left_pad_after_common_prefix(sequences: list[list[int]], pad_id: int,
                                 shared: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Like ``left_pad``, but the prefix every sequence shares (a chat template's system prompt)
    stays in the first ``shared`` columns and the padding goes after it, so that decoding can
    compute the prefix once and copy its KV cache to every row. ``shared`` defaults to
    ``common_prefix_length``; a smaller value (a prefix computed for more sequences) may be
    given. Returns (input_ids, attention_mask, shared)."""
    shared = common_prefix_length(sequences) if shared is None else shared
    if shared <= 0:
        return (*left_pad(sequences, pad_id), 0)
    input_ids, attention_mask = left_pad([s[shared:] for s in sequences], pad_id)
    prefix = torch.tensor(sequences[0][:shared], dtype=torch.long).expand(len(sequences), shared)
    return torch.cat([prefix, input_ids], 1), torch.cat([torch.ones_like(prefix), attention_mask], 1), shared


def count_loss_tokens(examples: list[Example]) -> int:
    """Tokens that carry loss in a batch: labels are shifted, so every response token counts."""
    return sum(len(ex.response) for ex in examples)
