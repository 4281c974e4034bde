"""How the trained model is split across processes.

Either every process holds all of the weights (one process, or DDP), or the launch asked for
FSDP2 and each process holds 1/N of every weight, gradient and optimizer state (PyTorch's
``fully_shard``, one unit per transformer block plus the rest, as accelerate wraps a model). The
training loop reaches the weights only through this module, so stages read the same either way:

- ``whole_weights(model)``: every process holds all weights for the forwards inside, which then
  need no communication (generation to different lengths, evaluation on the main process alone);
- ``state_dicts`` / ``load_state_dicts``: full weights and optimizer state for a checkpoint that
  any number of processes, sharded or not, can resume;
- ``plain_copy``: the trained model unsharded, on the main process, for saving a model folder.

FSDP is requested with accelerate's FSDP config (``configs/accelerate/fsdp2.yaml``; what
``accelerate launch`` puts in the environment) or the same variables under torchrun. accelerate
itself enables FSDP only on GPUs; rlhfkit applies ``fully_shard`` on any device, so an FSDP
request is honoured on CPU too, never silently trained as DDP.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import torch

from rlhfkit.errors import RlhfkitError


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class Sharding:
    """What the launch asked for. ``fsdp``: shard with FSDP2; ``cpu_offload``: keep the shards
    (and their optimizer state) in host memory between uses; ``reshard_after_forward``: free
    the gathered weights after each forward (ZeRO-3) or keep them until the backward (ZeRO-2);
    ``activation_checkpointing``: the config's name for ``model.gradient_checkpointing``."""

    fsdp: bool = False
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False

    @staticmethod
    def requested(processes: int) -> "Sharding":
        """From the environment ``accelerate launch`` sets for its config file. DeepSpeed and
        FSDP1 stop with what to launch instead; FSDP on one process has nothing to split."""
        if _flag("ACCELERATE_USE_DEEPSPEED"):
            raise RlhfkitError(
                "the launch asks for DeepSpeed, which rlhfkit's training loop does not drive yet: launch with "
                "configs/accelerate/fsdp2.yaml (FSDP2, ZeRO-3's sharding) or a DDP config (README, Scale)")
        if not _flag("ACCELERATE_USE_FSDP"):
            return Sharding()
        # accelerate's FSDP configs ask transformers to load weights on the main process only (meta
        # tensors elsewhere) for accelerate's prepare to broadcast; rlhfkit loads every model (the
        # frozen reference and reward model too) whole on each process, then shards the trained one.
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise RlhfkitError(
                f"the accelerate config asks for FSDP version {version}; rlhfkit shards with FSDP2 only: set "
                "`fsdp_version: 2` in its fsdp_config (configs/accelerate/fsdp2.yaml)")
        checkpointing = _flag("FSDP_ACTIVATION_CHECKPOINTING")
        if processes == 1:
            return Sharding(activation_checkpointing=checkpointing)
        return Sharding(fsdp=True, cpu_offload=_flag("FSDP_OFFLOAD_PARAMS"),
                        reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
                        activation_checkpointing=checkpointing)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def block_classes(model: torch.nn.Module) -> set[str]:
    """The transformer block classes of every Hugging Face model inside ``model`` (a policy and
    its value model, a PEFT wrapper): the units FSDP gathers one at a time."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def shard(model: torch.nn.Module, sharding: Sharding) -> torch.nn.Module:
    """``fully_shard`` each transformer block, then the root (embeddings, tied LM head, norms,
    heads), in place. Weights stay fp32: the stages' autocast runs the bf16 compute."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    blocks = block_classes(model)
    if not blocks:
        raise RlhfkitError(f"FSDP: {type(model).__name__} names no transformer block classes (`_no_split_modules`) to shard by")
    # On a CPU the shards already live in host memory (and the offload policy needs an accelerator).
    offload = sharding.cpu_offload and torch.accelerator.is_available()
    options = dict(reshard_after_forward=sharding.reshard_after_forward,
                   offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, **options)
    fully_shard(model, **options)
    for name in getattr(model, "forward_methods", ()):  # run forwards of the model beside forward itself
        register_fsdp_forward_method(model, name)
    # FSDP takes the first module to run a forward as the root; here that can be a submodule (PPO
    # generates with the policy inside the policy-and-value root), so the root is fixed now.
    model._get_fsdp_state()._lazy_init()
    return model


def skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory), to be filled
    with the full weights when the trained model is saved (``plain_copy``)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _sharded_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def whole_weights(model: torch.nn.Module, reshard_after_forward: bool = True):
    """Every process gathers all of ``model``'s weights and keeps them until the block ends, so
    the forwards inside communicate nothing and processes may run different numbers of them.
    Every process must enter; what is written to the weights inside is lost. Unsharded models:
    nothing to do. ``reshard_after_forward``: the blocks' setting to restore (the root keeps its
    weights after a forward, as fully_shard sets it)."""
    modules = _sharded_modules(model)
    if not modules:
        yield model
        return
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in modules:
            m.set_reshard_after_forward(reshard_after_forward and m is not model, recurse=False)
            m.reshard()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(the trainable weights, the optimizer state keyed by parameter name), whole and on the
    CPU: on the main process; the others get empty dicts. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_options(ignore_frozen_params=True))
    return weights, get_optimizer_state_dict(model, optimizer, options=_options())


def load_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict,
                     where: str = "the checkpoint") -> None:
    """Put whole ``state_dicts`` (read by every process) back: each process keeps its shard.
    Weights that do not fit the model's trainable ones stop the run (``where`` names the file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    # before loading: DCP fills the keys a non-strict load lacks into the dict it is given
    missing = sorted({name for name, p in model.named_parameters() if p.requires_grad} - set(weights))
    options = StateDictOptions(full_state_dict=True, strict=False)  # frozen weights are not in it
    unexpected = set_model_state_dict(model, weights, options=options).unexpected_keys
    if missing or unexpected:
        raise RlhfkitError(f"{where} does not fit this model: {len(missing)} trainable weights missing "
                           f"{missing[:3]}, {len(unexpected)} unknown {list(unexpected)[:3]} (another model or LoRA setting?)")
    set_optimizer_state_dict(model, optimizer, optim, options=options)
    for group in optimizer.param_groups:  # DCP hands tuples back as lists; keep the optimizer as built
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])


def plain_copy(model: torch.nn.Module, empty: torch.nn.Module | None) -> torch.nn.Module | None:
    """The trained model with all its weights, unsharded, on the main process (None on the
    others; every process must call it). ``empty``: its ``skeleton``, taken before sharding."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from rlhfkit import processes

    full = get_model_state_dict(model, options=_options())
    if not processes.is_main():
        return None
    tied: dict[int, list[str]] = {}  # names of one parameter (a tied LM head), which assign=True would untie
    for name, p in empty.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    empty.load_state_dict(full, assign=True)
    for first, *others in (names for names in tied.values() if len(names) > 1):
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(empty.get_submodule(owner), attr, empty.get_parameter(first))
    return empty.to(processes.device())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (every process must call it); any other as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(template: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` sharded as ``template`` is (this process's shard of it); unsharded: ``whole``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(template, DTensor):
        return whole.to(template.device, template.dtype)
    return distribute_tensor(whole.to(template.dtype), template.device_mesh, template.placements)


def no_sync(acc, model: torch.nn.Module, last: bool):
    """Gradients are reduced across processes only on the last micro-batch of an accumulation."""
    if last:
        return contextlib.nullcontext()
    if is_sharded(model):
        return _fsdp_no_sync(model)
    return acc.no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
