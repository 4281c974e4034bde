"""Reward models: a backbone with a scalar head, and the ``RewardModel.score`` API.

A decoder backbone (any causal LM, usually the SFT checkpoint) reads the conversation exactly as
``tokenizer.apply_chat_template(prompt + [assistant response])`` tokenizes it: the response, its
end-of-turn token and whatever the template writes after it (``<|im_end|>\n`` for ChatML); the
head reads the hidden state of that last token (InstructGPT / N+ detail: reward at the end of the
response). It is a plain ``AutoModelForSequenceClassification`` with ``num_labels=1``:
transformers' Llama/GPT-2 heads take the rightmost non-pad token (pad != eos, batches are
right-padded), so the usual TRL-style scoring of a chat-templated conversation gives the same
raw score.

An encoder backbone (BERT-style) scores the decoded conversation as plain text with its own
tokenizer, through its usual [CLS] head.

After training, the stage stores the mean and std of the RM's scores on reference responses
(demonstrations) in the model config (``rlhfkit_reward_mean`` / ``rlhfkit_reward_std``).
``RewardModel.score`` subtracts the mean, so reference responses score 0 on average
(InstructGPT); a plain ``AutoModelForSequenceClassification`` load returns the raw score.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from transformers import logging as transformers_logging
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from rlhfkit import processes
from rlhfkit.data.records import Message, Messages, user
from rlhfkit.data.tokenize import (CHARS_PER_TOKEN, Example, TruncationReport, fit, prompt_ids, response_ids,
                                   turn_suffix_ids)
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import (SMOLLM2, TINY, build_tiny_model, check_model_name, disable_dropout, ensure_pad_token, is_encoder,
                            loading, offload_to_host, prefer_eager_attention_on_cpu, resolve)
from rlhfkit.logprobs import rewards, running_in

MEAN_KEY, STD_KEY = "rlhfkit_reward_mean", "rlhfkit_reward_std"


def backbone_is_encoder(name: str, trust_remote_code: bool = False) -> bool:
    if name == TINY:
        return False
    path = resolve(name, "reward-model backbone")
    with loading(name, "reward-model backbone config"):
        return is_encoder(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings (restored afterwards)."""
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)


def build_reward_model(name: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, trust_remote_code: bool = False,
                       keep_head: bool = False):
    """A sequence-classification model with one output, its head initialised as in the N+ paper
    (normal, std = 1 / sqrt(hidden + 1)) so initial rewards are small and comparable.
    ``keep_head`` keeps a trained head (a value model initialised from a reward model)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if name == TINY:
            from transformers import LlamaForSequenceClassification

            config = build_tiny_model(tokenizer, seed).config
            config.num_labels = 1
            model = LlamaForSequenceClassification(config)
        else:
            path = resolve(name, "reward-model backbone")
            # quiet: the head is missing from a causal LM by design; no load report
            with loading(name, "reward-model backbone"), quiet_transformers():
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code
                )
        head = _head(model)
        if not keep_head:
            torch.nn.init.normal_(head.weight, std=1 / math.sqrt(head.weight.shape[1] + 1))
            if head.bias is not None:
                torch.nn.init.zeros_(head.bias)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    prefer_eager_attention_on_cpu(model)
    return model


def _head(model) -> torch.nn.Linear:
    """The final scalar projection: ``score`` (decoders) or ``classifier``'s last Linear (encoders)."""
    for name in ("score", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Linear):
            return module
        if module is not None:
            linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
            if linears:
                return linears[-1]
    raise RlhfkitError(f"{type(model).__name__} has no recognisable scalar head (score/classifier)")


def encode(tokenizer: PreTrainedTokenizerBase, prompt: Messages, response: str, max_len: int, encoder: bool,
           report: TruncationReport | None = None) -> list[int]:
    """Token ids the reward model reads for one (prompt, response); ``report`` counts truncation.

    For a decoder, the conversation exactly as ``apply_chat_template(prompt + [assistant])``
    tokenizes it (ChatML: ending ``<|im_end|>\\n``), so that a plain transformers load, whose head
    reads the last token, scores what rlhfkit trained. A sequence over ``max_len`` is cut by
    ``fit`` (oldest prompt tokens first, then the response's end, the suffix first of all); a
    plain load of the whole conversation then scores other tokens (the model card says so).
    """
    if not encoder:
        p = prompt_ids(tokenizer, prompt, max_len)
        r = response_ids(tokenizer, response, max_len) + turn_suffix_ids(tokenizer)
        example, length = fit(p, r, max_len), len(p) + len(r)
    else:
        turns = [f"{m.role.capitalize()}: {m.content}" for m in prompt] + [f"Assistant: {response}"]
        text = "\n\n".join(turns)[-max_len * CHARS_PER_TOKEN :]  # the end is kept, where the response is
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        length = len(ids)
        if len(ids) > max_len:  # keep [CLS] and the end
            ids = ids[:1] + ids[len(ids) - max_len + 1 :]
        example = Example(ids, [], prompt_truncated=len(ids) < length)
    if report is not None:
        report.add(example, length)
    return example.input_ids


class RewardModel:
    """Score (prompt, response) pairs with a trained reward model folder.

    >>> rm = RewardModel.load("runs/smollm2/rm")
    >>> rm.score(["What is 2+2? Answer with just the number."], ["4"])
    """

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, max_len: int = 512, precision: str = "fp32"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.precision = precision
        self.encoder = is_encoder(model.config)
        self.mean = float(getattr(model.config, MEAN_KEY, 0.0) or 0.0)
        self.std = float(getattr(model.config, STD_KEY, 1.0) or 1.0)

    @classmethod
    def load(cls, path: str | Path, max_len: int = 512, precision: str = "fp32", offload: bool = False) -> "RewardModel":
        """A reward-model folder (the output of `rlhfkit rm`) or a hub id of one. ``offload``:
        its weights stay in host memory (``models.offload_to_host``)."""
        name = str(path)
        if name in (TINY, SMOLLM2):
            raise RlhfkitError(f"{name} is a built-in language model, not a reward model; train one with `rlhfkit rm`")
        check_model_name(name, "reward model")  # a missing or unfinished folder, by name
        path = Path(name).expanduser()
        if path.is_dir() and not (path / "config.json").exists():  # a PEFT adapter alone has no head to score with
            raise RlhfkitError(f"{name} is not a reward model folder (no config.json); train one with `rlhfkit rm`")
        source = str(path) if path.is_dir() else name  # else a hub id
        with loading(name, "reward model"):
            config = AutoConfig.from_pretrained(source)
        if getattr(config, "num_labels", None) != 1:
            raise RlhfkitError(f"{name} is not a reward model: expected num_labels=1, found {config.num_labels}")
        with loading(name, "reward model"):
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32)
        ensure_pad_token(tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(offload_to_host(model.eval()) if offload else model.to(processes.device()), tokenizer, max_len, precision)

    @torch.no_grad()
    def score(self, prompts: list[Messages | str], responses: list[str], batch_size: int = 16,
              normalized: bool = True) -> list[float]:
        """One reward per (prompt, response); prompts are message tuples or plain user text.

        ``normalized`` subtracts the stored reference mean, so demonstrations average 0.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs = [
            encode(self.tokenizer, user(p) if isinstance(p, str) else p, r, self.max_len, self.encoder)
            for p, r in zip(prompts, responses)
        ]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
        out = [0.0] * len(seqs)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            with running_in(self.precision):
                values = rewards(self.model, [seqs[i] for i in idx], self.tokenizer.pad_token_id)
            for i, v in zip(idx, values.tolist()):
                out[i] = v - self.mean if normalized else v
        return out


def score_file(model_path: str, input_path: str, out_path: str, batch_size: int = 16, max_len: int = 512,
               precision: str = "fp32") -> int:
    """Score a JSONL/JSON/Parquet file of {prompt, response} records (prompt: text or messages;
    `completion` is accepted for `response`); writes the rows with a `reward` field added."""
    import json
    import os

    from rlhfkit.data.formats import read_rows
    from rlhfkit.errors import DataError

    rm = RewardModel.load(model_path, max_len=max_len, precision=precision)
    rows, prompts, responses = [], [], []
    for line, row in read_rows(input_path):
        response = row.get("response", row.get("completion"))
        if not isinstance(response, str):
            raise DataError(input_path, line, "response", f"expected a string, got {type(response).__name__}")
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            prompt = user(prompt)
        elif isinstance(prompt, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt):
            prompt = tuple(Message(m["role"], m["content"]) for m in prompt)
        else:
            raise DataError(input_path, line, "prompt", "expected a string or a list of {role, content} messages")
        rows.append(row)
        prompts.append(prompt)
        responses.append(response)
    scores = rm.score(prompts, responses, batch_size=batch_size)
    tmp = f"{out_path}.tmp"
    with open(tmp, "w") as f:
        for row, score in zip(rows, scores):
            f.write(json.dumps({**row, "reward": score}) + "\n")
    os.replace(tmp, out_path)
    return len(rows)
