"""The value model (critic) of PPO: a scalar head on a backbone, read at every response token.

Its per-token values come from ``rlhfkit.logprobs.token_values``; this module builds, shifts and
saves it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhfkit.config import ModelConfig
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import TINY, apply_lora, load_tokenizer, resolve
from rlhfkit.reward import MEAN_KEY, build_reward_model


def value_model(source: str, policy: ModelConfig, tokenizer, seed: int) -> torch.nn.Module:
    """The critic, from ``source``: a reward model (N+ detail 11: initialised from the RM) or
    another folder; for gold or function rewards, the policy's backbone with a fresh scalar head.
    It reads the policy's token ids, so its tokenizer must be the policy's. A folder with a
    trained scalar head (a reward model, or a value model saved by an earlier PPO run) keeps it,
    shifted onto PPO's normalised scale."""
    check_same_tokenizer(source, policy.name, tokenizer)
    stored_mean = trained_head_mean(source)
    model = build_reward_model(source, tokenizer, seed, keep_head=stored_mean is not None)
    if stored_mean is not None:
        shift_head(model, stored_mean)
    return apply_lora(model, policy, task_type="SEQ_CLS") if policy.lora else model


def trained_head_mean(source: str) -> float | None:
    """The reward mean stored by the RM stage (or by ``save_value_model``) in a model folder's
    config; 0 for another scalar-head model (a reward model trained elsewhere: one label); None
    for folders without a trained scalar head (an SFT model, a hub id)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    fields = json.loads(config.read_text())
    if fields.get(MEAN_KEY) is not None:
        return float(fields[MEAN_KEY])
    return 0.0 if len(fields.get("id2label") or {}) == 1 else None


def save_value_model(value: torch.nn.Module, path: Path) -> None:
    """Save the value model so that loading it the way PPO loads a reward model gives back the
    same values: the head's bias (which models like Llama's classifier cannot hold) is folded
    into the stored mean, since V = w.h + b = w.h - (-b)."""
    head = value.score
    bias = float(head.bias.item()) if head.bias is not None else 0.0
    plain = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    plain.weight = head.weight
    stored_mean = getattr(value.config, MEAN_KEY, None)
    value.score = plain
    setattr(value.config, MEAN_KEY, -bias)
    try:
        value.save_pretrained(path, safe_serialization=True)
    finally:  # the live model is left as it was
        value.score = head
        setattr(value.config, MEAN_KEY, stored_mean)


def shift_head(model, offset: float) -> None:
    """Start the value head on the reward's scale: PPO sees normalised scores (raw - mean), so a
    value model copied from the raw reward model would be off by ``mean`` everywhere. A constant
    value error is not harmless: GAE weights it by lambda^(T-t), so early tokens would look
    better than late ones (the EOS token gets pushed down and responses grow)."""
    head = model.score
    if head.bias is None:
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        with torch.no_grad():
            biased.weight.copy_(head.weight)
            biased.bias.zero_()
        model.score = head = biased
    with torch.no_grad():
        head.bias -= offset


def check_same_tokenizer(source: str, policy_name: str, policy_tokenizer) -> None:
    """Fail early, naming both models, when the value model would read ids from another vocabulary."""
    if source == policy_name or source == TINY or not (Path(resolve(source)) / "tokenizer_config.json").exists():
        return
    theirs = load_tokenizer(source)
    if theirs.get_vocab() != policy_tokenizer.get_vocab():
        raise RlhfkitError(
            f"value model '{source}' has a different tokenizer from the policy '{policy_name}' "
            f"({len(theirs)} vs {len(policy_tokenizer)} tokens); the value model reads the policy's token ids, "
            "so pass --value-model with a model that shares the policy's tokenizer (e.g. the policy itself)")
