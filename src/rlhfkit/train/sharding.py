"""How the trained model is split across processes.

Either every process holds all of the weights (one process, or DDP), or the launch asked for
FSDP2 and each process holds 1/N of every weight, gradient and optimizer state (PyTorch's
``fully_shard``, one unit per transformer block plus the rest, as accelerate wraps a model), or
it asked for DeepSpeed ZeRO (stage 1: optimizer state split; 2: gradients too; 3: weights too),
whose engine then runs each backward and update. The training loop reaches the weights only
through this module, so stages read the same either way:

- ``whole_weights(model)``: every process holds all weights for the forwards inside, which then
  need no communication (generation to different lengths, evaluation on the main process alone);
- ``state_dicts`` / ``load_state_dicts``: full weights and optimizer state for a checkpoint that
  any number of processes, sharded or not, can resume;
- ``plain_copy``: the trained model unsharded, on the main process, for saving a model folder.

FSDP is requested with accelerate's FSDP config (``configs/accelerate/fsdp2.yaml``; what
``accelerate launch`` puts in the environment) or the same variables under torchrun, DeepSpeed
with its ZeRO configs (``configs/accelerate/zero{2,3}.yaml``). accelerate itself enables FSDP
only on GPUs and sets DeepSpeed up only on GPUs; rlhfkit applies ``fully_shard`` and starts
DeepSpeed's engine itself on any device, so a request is honoured on CPU too, never silently
trained as DDP.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field

import torch

from rlhfkit import processes
from rlhfkit.processes import DEEPSPEED
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import deepspeed_engine_of


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class Sharding:
    """What the launch asked for. ``fsdp``: shard with FSDP2; ``cpu_offload``: keep the shards
    (and their optimizer state) in host memory between uses; ``reshard_after_forward``: free
    the gathered weights after each forward (ZeRO-3) or keep them until the backward (ZeRO-2);
    ``activation_checkpointing``: the config's name for ``model.gradient_checkpointing``.
    ``zero``: DeepSpeed's ``zero_optimization`` section (empty: no DeepSpeed)."""

    fsdp: bool = False
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    zero: dict = field(default_factory=dict)

    @property
    def zero_stage(self) -> int:
        return int(self.zero.get("stage", 0))

    @staticmethod
    def requested(processes: int) -> "Sharding":
        """From the environment ``accelerate launch`` sets for its config file. FSDP1 stops with
        what to launch instead; FSDP or ZeRO on one process has nothing to split."""
        if _flag(DEEPSPEED) or _flag("ACCELERATE_USE_DEEPSPEED"):
            zero = zero_optimization()
            return Sharding(zero=zero) if processes > 1 else Sharding()
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
    if _zero_stage(model) == 3:
        engine = deepspeed_engine_of(model)
        if engine is None:
            raise RlhfkitError("whole_weights under ZeRO-3 needs DeepSpeed's engine (TrainingRun.model), not the model inside it")
        with _zero3_unhooked(engine):
            yield model
        return
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

    if _zero_stage(model):
        return _zero_state_dicts(inner(model), optimizer)
    weights = get_model_state_dict(model, options=_options(ignore_frozen_params=True))
    return weights, get_optimizer_state_dict(model, optimizer, options=_options())


def load_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict,
                     where: str = "the checkpoint") -> None:
    """Put whole ``state_dicts`` (read by every process) back: each process keeps its shard.
    Weights that do not fit the model's trainable ones stop the run (``where`` names the file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    # before loading: DCP fills the keys a non-strict load lacks into the dict it is given
    missing = sorted({name for name, p in model.named_parameters() if p.requires_grad} - set(weights))
    if _zero_stage(model):
        module = inner(model)
        unknown = sorted(set(weights) - {name for name, _ in module.named_parameters(remove_duplicate=False)})
        if missing or unknown:
            raise RlhfkitError(f"{where} does not fit this model: {len(missing)} trainable weights missing "
                               f"{missing[:3]}, {len(unknown)} unknown {unknown[:3]} (another model or LoRA setting?)")
        _zero_load_state_dicts(module, optimizer, weights, optim)
        return
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
    if _zero_stage(model) == 3:
        with _gathered(model):
            full = {n: p.detach().to("cpu", copy=True) for n, p in model.state_dict().items()} if processes.is_main() else {}
    elif is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_options())
    else:
        return model
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
    """Gradients are reduced across processes only on the last micro-batch of an accumulation.
    (DeepSpeed's engine decides this itself: its update, ``step``, is the boundary.)"""
    if last or deepspeed_engine_of(model) is not None:
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


# --- DeepSpeed ZeRO ---------------------------------------------------------------------------
#
# rlhfkit starts DeepSpeed's engine for the trained model alone (the frozen reference and reward
# model stay plain), with the optimizer and schedule the stage built, and keeps the loop's own
# order: DeepSpeed's accumulation is unmanaged, so each ``backward`` accumulates and ``step`` is
# the update. Weights stay fp32 and the stages' autocast runs the bf16 compute, as under FSDP.

def require_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise RlhfkitError("the launch asks for DeepSpeed, which is not installed: pip install 'rlhfkit[deepspeed]' "
                           "(or launch with configs/accelerate/fsdp2.yaml, which needs nothing more)") from None
    return deepspeed


def zero_optimization() -> dict:
    """The ``zero_optimization`` section of DeepSpeed's config: from the accelerate config's
    ``deepspeed_config_file`` when it names one, else from its ``zero_stage`` and offload devices.
    Batch sizes, accumulation and clipping come from rlhfkit's own settings."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path.lower() != "none":
        try:
            config = json.loads(open(path).read())
        except (OSError, json.JSONDecodeError) as error:
            raise RlhfkitError(f"DeepSpeed config {path}: {error}") from None
        for section in ("fp16", "bf16"):
            if str((config.get(section) or {}).get("enabled", False)).lower() == "true":
                raise RlhfkitError(f"{path}: `{section}.enabled`: rlhfkit keeps fp32 weights under DeepSpeed and runs "
                                   "the forwards in --model.precision (bf16 autocast); remove the section")
        zero = {k: v for k, v in (config.get("zero_optimization") or {}).items() if v != "auto"}
        where = f"{path}: zero_optimization.stage"
    else:
        zero = {"stage": os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")}
        for key, variable in (("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                              ("offload_param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):
            device = os.environ.get(variable, "none").lower()
            if device != "none":
                zero[key] = {"device": device}
        where = "the accelerate config's deepspeed_config.zero_stage"
    if str(zero.get("stage")) not in ("1", "2", "3"):
        raise RlhfkitError(f"{where} is {zero.get('stage')!r}: rlhfkit drives ZeRO stages 1, 2 and 3 (for stage 0, "
                           "plain data parallelism, launch with configs/accelerate/ddp.yaml)")
    zero["stage"] = int(zero["stage"])
    if zero["stage"] == 1 and zero.get("overlap_comm"):
        raise RlhfkitError(f"{where.rsplit('.', 1)[0]}.overlap_comm: rlhfkit's update is DeepSpeed's accumulation boundary "
                           "(unmanaged accumulation), which overlaps communication under ZeRO-2 and 3 only: "
                           "drop overlap_comm or use stage 2")
    if not torch.accelerator.is_available():  # on a CPU the partitions already live in host memory
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    return zero


def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharding: Sharding,
                     max_grad_norm: float, processes: int):
    """(DeepSpeed's engine around ``model``, its ZeRO optimizer around ``optimizer``). The
    engine clips to ``max_grad_norm`` and skips updates with a non-finite gradient norm."""
    import logging

    deepspeed = require_deepspeed()
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # its config dump and per-step notes would bury the progress bar
    config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": processes,
        "managed_gradient_accumulation": False,  # the loop's update is the boundary, however many backwards
        "gradient_clipping": max_grad_norm,
        "zero_optimization": sharding.zero,
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,  # the stage's torch AdamW
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    }
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, zero_optimizer


def inner(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DeepSpeed's engine; any other model as it is."""
    engine = deepspeed_engine_of(model)
    return engine.module if engine is not None else model


def _zero_stage(model: torch.nn.Module) -> int:
    """3: ZeRO-3 partitions the weights; 2: ZeRO-1/2 (whole weights, the optimizer's fp32 copy
    and state partitioned); 0: no DeepSpeed."""
    engine = deepspeed_engine_of(model)
    if engine is not None:
        return 3 if engine.zero_optimization_stage() == 3 else 2
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            return 3
        if hasattr(p, "_hp_mapping"):  # None on a process whose partition holds none of this weight
            return 2
    return 0


def _gathered(model: torch.nn.Module):
    """ZeRO-3: every process holds all weights inside (what is written to them is lost)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(inner(model).parameters()))


@contextlib.contextmanager
def _zero3_unhooked(engine):
    """All weights gathered, and ZeRO-3's forward hooks off until the block ends. On, they free
    and re-gather weights around each module's forward, and the root's start-of-forward hook
    checks that every process traced the same modules while its trace is incomplete: collectives
    that a process evaluating alone would wait in forever. DeepSpeed's own
    ``unwrap_model_for_generation`` (``runtime/zero/stage3.py``) removes the module hooks the
    same way, and leaves the root's hook on."""
    import deepspeed

    offload = engine.optimizer.parameter_offload
    module = offload.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        start_of_forward = module._forward_pre_hooks[offload.fwd_pre_hook.id]
        try:
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            offload.fwd_pre_hook.remove()
            yield
        finally:
            offload.fwd_pre_hook.remove()  # (a no-op when removed above)
            offload.fwd_pre_hook = module.register_forward_pre_hook(start_of_forward, prepend=True)
            offload._register_deepspeed_module(module)


def readable(model: torch.nn.Module):
    """A block in which elementwise code (an EMA of the weights) can read ``model``'s
    parameters: FSDP's shards are DTensors that such code works on; ZeRO-3's are gathered whole
    (every process must enter); others are whole already."""
    return _gathered(model) if _zero_stage(model) == 3 else contextlib.nullcontext()


def backward(acc, model: torch.nn.Module, loss: torch.Tensor) -> None:
    """The backward of a micro-batch's loss (DeepSpeed's engine runs it under DeepSpeed)."""
    engine = deepspeed_engine_of(model)
    if engine is not None:
        engine.backward(loss)
    else:
        acc.backward(loss)


def engine_step(model: torch.nn.Module) -> tuple[float, bool] | None:
    """Under DeepSpeed: its engine's update (clipped; a non-finite gradient norm skips it, as
    ``train.loop.optimizer_step`` does); returns (grad norm, skipped). Otherwise None."""
    engine = deepspeed_engine_of(model)
    if engine is None:
        return None
    engine.step()
    norm = engine.get_global_grad_norm()
    return (float(norm) if norm is not None else 0.0), not engine.was_step_applied()


def non_finite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that hold a NaN or an inf (under ZeRO-3, in any process's part:
    every process must call it then)."""
    with torch.no_grad():
        if _zero_stage(model) != 3:
            return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        mine = [name for name, p in inner(model).named_parameters() if not bool(torch.isfinite(p.ds_tensor).all())]
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        return sorted({name for names in everyone for name in names})


def _zero_state_dicts(module: torch.nn.Module, zero_optimizer) -> tuple[dict, dict]:
    """``state_dicts`` under ZeRO: the fp32 weights and the optimizer state, assembled whole
    from every process's partition (DeepSpeed's tensor-fragment API), in the format DCP writes."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = zero_optimizer.optimizer  # the stage's torch optimizer, over the flat fp32 partitions
    flat_state = next(iter(base.state.values()), {})  # empty before the first update
    per_element = [k for k, v in flat_state.items() if torch.is_tensor(v) and v.dim() > 0]
    scalars = {k: v for k, v in flat_state.items() if k not in per_element}  # AdamW's step, one for all
    main = processes.is_main()
    weights, state, names = {}, {}, []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        names.append(name)
        whole = safe_get_full_fp32_param(p)  # every process takes part in assembling each tensor
        moments = {k: safe_get_full_optimizer_state(p, k) for k in per_element}
        if main:
            weights[name] = whole.detach().cpu()
            state[name] = {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                           for k, v in {**moments, **scalars}.items()} if flat_state else {}
    if not main:
        return {}, {}
    hyper = {k: v for k, v in base.param_groups[0].items() if k != "params"}
    return weights, {"state": state, "param_groups": [{**hyper, "params": names}]}


def _zero_load_state_dicts(module: torch.nn.Module, zero_optimizer, weights: dict, optim: dict) -> None:
    """``load_state_dicts`` under ZeRO: each process writes its partition of the weights (the
    module's and the optimizer's fp32 copy) and of the optimizer state."""
    import deepspeed
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                 safe_set_local_optimizer_state)
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    stage3 = _zero_stage(module) == 3
    trained = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    for name, p in trained:
        value = weights[name].to(p.device)
        if stage3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value)
            safe_set_local_fp32_param(p, _zero3_part(p, value))
        else:
            p.data.copy_(value)
            safe_set_full_fp32_param(p, value)
    saved = next((s for s in optim["state"].values() if s), None)
    if saved is None:  # saved before any update was applied
        return
    base = zero_optimizer.optimizer
    per_element = [k for k, v in saved.items() if torch.is_tensor(v) and v.dim() > 0]
    # this process's flat fp32 partitions, which the optimizer steps (ZeRO-3 hands them to it only in its step)
    flats = zero_optimizer.fp32_partitioned_groups_flat if stage3 else zero_optimizer.single_partition_of_fp32_groups
    for flat in flats:  # the state AdamW's first update would create, filled below
        base.state[flat] = {k: torch.zeros_like(flat) for k in per_element}
        base.state[flat].update({k: v.clone().to(flat.device) if torch.is_tensor(v) else v
                                 for k, v in saved.items() if k not in per_element})
    for group in base.param_groups:
        group.update({k: v for k, v in optim["param_groups"][0].items() if k != "params"})
    if not stage3:  # ZeRO-1/2 link each weight's fragment to the state once it exists
        for i, flat in enumerate(flats):
            lazy_init_hp_params_optimizer_state(zero_optimizer.bit16_groups[i], flat, base.state)
    for name, p in trained:
        for key in per_element:
            value = optim["state"][name][key].to(p.device)
            if stage3:
                safe_set_local_optimizer_state(p, _zero3_part(p, value), key)
            else:
                safe_set_full_optimizer_state(p, value, key)


def _zero3_part(p: torch.nn.Parameter, whole: torch.Tensor) -> torch.Tensor:
    """This process's ZeRO-3 partition of ``whole`` (a value of weight ``p``): its slice of the
    flattened tensor, zero-padded at the end as ZeRO-3 pads the last partitions. (DeepSpeed's
    ``safe_set_full_*`` slices without the padding and fails on weights, like a value head's
    one-element bias, whose size the process count does not divide.)"""
    size = p.ds_tensor.numel()
    start = size * torch.distributed.get_rank(group=getattr(p, "ds_process_group", None))
    flat = whole.flatten()
    part = torch.zeros(size, dtype=whole.dtype, device=whole.device)
    if start < flat.numel():
        part[: min(size, flat.numel() - start)] = flat[start : start + size]
    return part
