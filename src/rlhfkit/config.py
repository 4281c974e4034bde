"""Typed configs. Each dataclass is also the CLI (through tyro) and the schema of a YAML recipe.

A recipe (``src/rlhfkit/recipes/<name>.yaml`` or any YAML path) has one section per stage
(``sft:``, later ``rm:``, ``ppo:`` ...) whose keys mirror the stage config's nested fields. The
recipe fills the defaults; command-line flags override them. Derived sizes (global batch, ...)
are computed once here and checked loudly.
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
class SFTConfig:
    """Supervised fine-tuning on demonstrations."""

    recipe: str = ""
    """Recipe name (`tiny`, `smollm2`) or YAML path whose `sft:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        require_positive(self, "batch.micro_batch_size", "batch.grad_accum", "run.steps", "run.save_every", "data.max_seq_len")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.data.eval_fraction}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.optim.lr}")


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
    labeler_temperature: float = 0.05
    """Simulated labelers' noise (0.05: 92% agreement between labelers; 0.23: InstructGPT's ~73%)."""


@dataclass
class RMConfig:
    """Reward model from comparisons and K-wise rankings."""

    recipe: str = ""
    """Recipe name or YAML path whose `rm:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(micro_batch_size=4))
    """micro_batch_size counts prompts (each with all its K completions in one forward)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/rm", steps=100))
    center_coef: float = 0.0
    """Weight of the reward-centering penalty mean(r^2) (0 disables)."""
    normalize: bool = True
    """Store the mean/std of scores on reference responses, so they score mean 0 (InstructGPT)."""
    norm_examples: int = 256
    """Reference responses scored for the normalisation."""
    eval_batch_size: int = 32
    """Sequences per forward pass at evaluation."""

    def check(self) -> None:
        require_positive(self, "batch.micro_batch_size", "batch.grad_accum", "run.steps", "run.save_every", "data.max_seq_len")
        if self.data.k < 2:
            raise ConfigError(f"data.k must be at least 2 to rank, got {self.data.k}")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.data.eval_fraction}")


@dataclass
class PPOAlgoConfig:
    """PPO and its RLHF details (InstructGPT §3.5/App. C; the N+ implementation details)."""

    prompts_per_step: int = 16
    """Prompts sampled per PPO iteration (one response each)."""
    minibatch_size: int = 8
    """Rollouts per PPO update; prompts_per_step must be a multiple of it."""
    epochs: int = 4
    """PPO epochs over each iteration's rollouts."""
    temperature: float = 1.0
    """Sampling temperature; logprobs are recomputed with the same temperature."""
    max_new_tokens: int = 48
    """Response length limit; responses that never end get `missing_eos_penalty`."""
    clip: float = 0.2
    """Policy ratio clip."""
    value_clip: float = 0.2
    """Value clip around the rollout-time values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """Initial per-token KL penalty coefficient (beta)."""
    kl_target: float = 0.0
    """Adaptive KL: target KL per sequence (0 = fixed coefficient)."""
    kl_horizon: int = 10000
    """Adaptive KL horizon in samples."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward."""
    missing_eos_penalty: float = -1.0
    """Score given instead of the RM score to a response that never produced EOS (0 disables)."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance before GAE (the mean is kept)."""
    ptx_coef: float = 0.0
    """PPO-ptx (InstructGPT gamma): weight of an SFT loss on demonstrations mixed into every update (0 = off)."""
    ptx_data: str = "world"
    """PPO-ptx demonstrations: `world` or a demonstrations file."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the policy weights, updated once per PPO step and saved to OUT/ema (0 = off)."""


@dataclass
class PPOConfig:
    """PPO against a reward model with a per-token KL penalty to the SFT policy."""

    recipe: str = ""
    """Recipe name or YAML path whose `ppo:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (usually the SFT output); also the frozen reference."""
    reward: str = "gold"
    """Reward: a reward-model folder, `gold` (the world's gold judge), or `module:function` taking (prompts, responses)."""
    value_model: str = ""
    """Value model initialisation: empty = the reward-model folder (or, for other rewards, the policy with a new head)."""
    prompts: str = "world"
    """Training prompts: `world` or a file of prompt records."""
    world_prompts: int = 2000
    """World training prompts."""
    world_seed: int = 0
    """Seed of the world's prompt generator."""
    algo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/ppo", steps=50, eval_every=0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        require_positive(self, "algo.prompts_per_step", "algo.minibatch_size", "algo.epochs", "algo.max_new_tokens",
                         "run.steps", "run.save_every")
        exact_div(self.algo.prompts_per_step, self.algo.minibatch_size, "algo.prompts_per_step / algo.minibatch_size")
        if not 0 <= self.algo.ema_decay < 1:
            raise ConfigError(f"algo.ema_decay must be in [0, 1), got {self.algo.ema_decay}")
        if self.algo.ptx_coef < 0:
            raise ConfigError(f"algo.ptx_coef must be >= 0, got {self.algo.ptx_coef}")


@dataclass
class DPOAlgoConfig:
    """The DPO family (losses.DPOLoss): what the loss is and how rankings become pairs."""

    loss: Literal["sigmoid", "ipo", "cdpo", "simpo"] = "sigmoid"
    """`sigmoid` (DPO), `ipo`, `cdpo` (conservative: label smoothing), `simpo` (reference-free)."""
    beta: float = 0.1
    """Strength of the implicit KL to the reference (IPO: its tau; SimPO: the reward scale)."""
    label_smoothing: float = 0.0
    """cdpo: the probability that a preference label is flipped, in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin."""
    pairs: Literal["all", "best_worst"] = "all"
    """A ranking of K becomes all its untied pairs, or its best vs its worst completion."""
    precompute_reference: bool = True
    """Reference logprobs of every pair once, before training, saved with the run: no reference
    model in memory while training. Off: a frozen copy (or, with LoRA, the adapters disabled)
    scores each batch."""


@dataclass
class DPOConfig:
    """DPO and its variants: learn from preferences directly, with no reward model."""

    recipe: str = ""
    """Recipe name or YAML path whose `dpo:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (usually the SFT output); also the frozen reference."""
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    algo: DPOAlgoConfig = field(default_factory=DPOAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=5))
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(micro_batch_size=8))
    """micro_batch_size counts pairs (chosen and rejected go through one forward together)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/dpo", steps=100, eval_every=0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        require_positive(self, "batch.micro_batch_size", "batch.grad_accum", "run.steps", "run.save_every",
                         "data.max_seq_len", "algo.beta")
        if not 0.0 <= self.algo.label_smoothing < 0.5:
            raise ConfigError(f"algo.label_smoothing must be in [0, 0.5), got {self.algo.label_smoothing}")
        if self.data.k < 2:
            raise ConfigError(f"data.k must be at least 2 to make pairs, got {self.data.k}")


@dataclass
class OnlineAlgoConfig:
    """The RLHFlow "Online RLHF" loop: sample N, rank with the reward, best vs worst, DPO, repeat."""

    iterations: int = 3
    """Rounds of (sample -> score -> pair -> DPO); each starts from the previous round's model."""
    prompts_per_iteration: int = 256
    """Fresh prompts per round (round i uses the i-th slice of the training prompts)."""
    samples_per_prompt: int = 4
    """N responses sampled per prompt from the current policy."""
    pairing: Literal["best_worst", "best_random", "random"] = "best_worst"
    """Which two of the N become the pair: the highest vs the lowest reward, the highest vs a random
    lower one, or two random ones with different rewards (the higher is chosen)."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 48
    """Response length limit."""


@dataclass
class OnlineDPOConfig:
    """Online iterative DPO: each round's pairs come from the current policy, ranked by a reward."""

    recipe: str = ""
    """Recipe name or YAML path whose `online-dpo:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The starting policy (usually the SFT output)."""
    reward: str = "gold"
    """Ranks the samples: a reward-model folder, `gold` (the world's gold judge), or `module:function`."""
    prompts: str = "world"
    """Training prompts: `world` or a file of prompt records."""
    world_seed: int = 0
    """Seed of the world's prompt generator."""
    max_seq_len: int = 256
    """Prompt + response tokens in DPO training."""
    online: OnlineAlgoConfig = field(default_factory=OnlineAlgoConfig)
    dpo: DPOAlgoConfig = field(default_factory=DPOAlgoConfig)
    """The DPO loss of each round (its reference is the round's starting model; `pairs` is unused)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=5))
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(micro_batch_size=8))
    """micro_batch_size counts pairs."""
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/online_dpo", steps=30, eval_every=0))
    """`steps` are DPO steps per round; each round is a folder OUT/iter_<i>."""
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        require_positive(self, "online.iterations", "online.prompts_per_iteration", "online.max_new_tokens",
                         "batch.micro_batch_size", "batch.grad_accum", "run.steps", "run.save_every", "max_seq_len",
                         "dpo.beta")
        if self.online.samples_per_prompt < 2:
            raise ConfigError(f"online.samples_per_prompt must be at least 2 to make a pair, got {self.online.samples_per_prompt}")
        if not 0.0 <= self.dpo.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.dpo.label_smoothing}")


@dataclass
class GRPOAlgoConfig:
    """Policy gradient with a group baseline: G samples per prompt, no value model."""

    prompts_per_step: int = 8
    """Prompts per update."""
    group_size: int = 4
    """Samples per prompt (G); the group's other samples are the baseline."""
    baseline: Literal["grpo", "rloo"] = "grpo"
    """`grpo`: (r - group mean) / group std; `rloo`: r - mean of the other G-1 samples."""
    loss_aggregation: Literal["token", "sequence"] = "token"
    """`token`: every token of the batch weighs the same (DAPO); `sequence`: each response's token
    mean, then the mean over responses (the GRPO paper)."""
    kl_coef: float = 0.0
    """k3 KL to the reference in the loss (GRPO used 0.04; 0 keeps no reference model)."""
    temperature: float = 1.0
    """Sampling temperature; logprobs are computed at the same temperature."""
    max_new_tokens: int = 48
    """Response length limit."""
    micro_batch_size: int = 16
    """Responses per forward/backward (the update still covers the whole step)."""


@dataclass
class GRPOConfig:
    """GRPO / RLOO against a reward: sample a group per prompt, reinforce the better-than-group answers."""

    recipe: str = ""
    """Recipe name or YAML path whose `grpo:` section fills these defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (usually the SFT output)."""
    reward: str = "gold"
    """A reward-model folder, `gold` (the world's gold judge), or `module:function` taking (prompts, responses)."""
    prompts: str = "world"
    """Training prompts: `world` or a file of prompt records."""
    world_prompts: int = 2000
    """World training prompts."""
    world_seed: int = 0
    """Seed of the world's prompt generator."""
    algo: GRPOAlgoConfig = field(default_factory=GRPOAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant"))
    run: RunConfig = field(default_factory=lambda: RunConfig(out="runs/grpo", steps=50, eval_every=0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        require_positive(self, "algo.prompts_per_step", "algo.max_new_tokens", "algo.micro_batch_size", "run.steps",
                         "run.save_every")
        if self.algo.group_size < 2:
            raise ConfigError(f"algo.group_size must be at least 2 (the group is the baseline), got {self.algo.group_size}")
        if self.algo.kl_coef < 0:
            raise ConfigError(f"algo.kl_coef must be >= 0, got {self.algo.kl_coef}")


@dataclass
class BestOfNConfig:
    """Best-of-N: sample N responses per prompt and keep the one the reward scores highest."""

    model: str = "tiny"
    """The policy that samples (a model folder or built-in name)."""
    reward: str = "gold"
    """Picks the best: a reward-model folder, `gold` (the world's gold judge), or `module:function`."""
    n: int = 4
    """Samples per prompt."""
    prompts: str = "world"
    """`world` (held-out world prompts, judged by the gold judge too) or a file of prompt records."""
    split: Literal["train", "eval"] = "eval"
    """World split: `eval` for an inference-time baseline, `train` to make rejection-sampling SFT data."""
    num_prompts: int = 128
    """World prompts to answer (a prompts file is read whole)."""
    out: str = "bon.jsonl"
    """Output JSONL: prompt, completion (the best sample, so the file is SFT data), reward, and every
    sample with its reward."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 48
    """Response length limit."""
    batch_size: int = 32
    """Prompts per generation batch."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` (default): bf16 autocast where it measures clearly faster for this model on this machine, else fp32 (measured once, cached). `bf16`: forward passes under bf16 autocast, weights stay fp32. `fp32`."""
    seed: int = 0
    """Sampling seed."""

    def check(self) -> None:
        require_positive(self, "n", "num_prompts", "max_new_tokens", "batch_size")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive to sample {self.n} different responses, got {self.temperature}")


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
