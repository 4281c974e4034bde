"""Plumbing every training stage shares: accelerate, optimizer, schedule, data order,
checkpoints with exact resume, metrics and the progress bar. No algorithm lives here.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from accelerate import Accelerator

from rlhfkit import processes
from rlhfkit.chunks import PARTIAL_SUFFIX
from rlhfkit.config import BatchConfig, OptimConfig, RunConfig
from rlhfkit.errors import RlhfkitError, TrainingDiverged
from rlhfkit.fast.memory import copy_file_mapped
from rlhfkit.logprobs import set_precision
from rlhfkit.models import enable_gradient_checkpointing
from rlhfkit.progress import Progress
from rlhfkit.runs import (COMPLETE, MetricsLog, check_out_dir, checkpoint_to_resume, load_checkpoint, mark_complete,
                          prepare_out_dir, save_checkpoint)
from rlhfkit.train import sharding
from rlhfkit.train.sharding import Sharding



# --- processes --------------------------------------------------------------------------------


def make_accelerator(precision: str) -> Accelerator:
    """One Accelerator per stage. Under ``accelerate launch``/torchrun it sets up DDP (gloo on CPU).

    accelerate keeps its settings in a process-wide singleton and refuses a second Accelerator
    with another mixed precision, which several stages in one process (a pipeline, a notebook,
    the test suite) need. We clear the per-accelerator part and keep the process group.
    """
    from accelerate.state import AcceleratorState, GradientState

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: resolve `auto` with rlhfkit.precision.resolve first")
    processes.claim_deepspeed()  # before accelerate reads the launch's request
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    acc = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=not torch.cuda.is_available())
    Sharding.requested(acc.num_processes)  # FSDP1 or a bad ZeRO config stop here, before any data or model loads
    return acc


class StageComplete(Exception):
    """``begin_stage`` found ``run.out`` complete while resuming: the stage returns its folder."""


def stage(train: Callable[..., Path]) -> Callable[..., Path]:
    """Marks a stage's ``train(cfg, ...)``: a resumed run that is already complete returns its
    folder at once. When a run into an empty or new ``run.out`` stops on a user's mistake (bad
    data, a bad setting) before it saved any progress (a checkpoint, a finished round), the folder
    it started is removed, so the corrected command is not refused as "already holds a run". A
    diverged run keeps its metrics to read."""

    @functools.wraps(train)
    def run(cfg: Any, *args, **kwargs) -> Path:
        out = Path(cfg.run.out)
        fresh = not out.exists() or not any(out.iterdir())
        try:
            return train(cfg, *args, **kwargs)
        except StageComplete:
            return out
        except RlhfkitError as error:
            progress = any(out.rglob("checkpoints")) or any(out.rglob(COMPLETE)) or any(out.rglob(f"*{PARTIAL_SUFFIX}"))
            if fresh and not progress and not isinstance(error, TrainingDiverged):
                shutil.rmtree(out, ignore_errors=True)
            raise

    return run


def agreed_precision(model: Any) -> str:
    """``model.precision`` resolved (`auto`: measured) by the main process and sent to the
    others, so every process trains in the same precision."""
    from accelerate.utils import broadcast_object_list

    from rlhfkit.precision import resolve

    from rlhfkit.precision import busy_machine_warning, to_stderr

    # processes.state passes cpu= as make_accelerator does: without it, torchrun's CPU processes
    # each set up a single-process state that the Accelerator then keeps (2 processes trained apart).
    state = processes.state()
    warning = busy_machine_warning() if state.is_main_process else None
    if warning:
        to_stderr(f"warning: {warning}")
    if state.num_processes == 1:
        return resolve(model.precision, model.name)
    choice = [resolve(model.precision, model.name) if state.is_main_process else None]
    return broadcast_object_list(choice)[0]


def begin_stage(cfg: Any) -> tuple[Accelerator, Path]:
    """Every stage's first lines: check the config, set up processes and seeds, claim ``run.out``.
    Resuming a complete run stops here (``StageComplete``), before any data or model loads."""
    from accelerate.utils import set_seed

    cfg.check()
    cfg.model.precision = agreed_precision(cfg.model)
    set_precision(cfg.model.precision)  # every forward through rlhfkit.logprobs runs in it
    acc = make_accelerator(cfg.model.precision)
    set_seed(cfg.run.seed)
    # Every process checks the folder before any writes to it: checked after the main process has
    # created it, another process would see "already holds a run" and stop.
    check_out_dir(cfg.run)
    acc.wait_for_everyone()
    out = prepare_out_dir(cfg.run, cfg, acc.is_main_process)
    acc.wait_for_everyone()
    if cfg.run.resume and (out / COMPLETE).exists():
        acc.print(f"{out} is already complete; nothing to resume")
        raise StageComplete
    return acc, out


# --- optimizer and schedule -------------------------------------------------------------------


def build_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    copy_file_mapped(params)  # fast/memory: the first update would page-fault through the mapped checkpoint
    # fused AdamW is several times faster on CPU than the foreach default (torch >= 2.4).
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay.

    Warmup reaches the peak at step ``warmup``; cosine/linear decay reach 0 at step ``total``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim.warmup_steps, total, optim.schedule)
    )


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float) -> tuple[float, bool]:
    """Clip, step and advance the schedule; returns (grad norm, skipped).

    A non-finite gradient norm skips the update (the guard of DESIGN.md §5) but still advances
    the schedule, so a skipped step does not shift the rest of the run. (DeepSpeed's engine
    does the same itself, clipping to the norm its config was given.)
    """
    if (done := sharding.engine_step(model)) is not None:
        scheduler.step()
        return done
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:  # no gradient at all (GRPO when every advantage is 0) is a norm of 0
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
    skipped = not bool(torch.isfinite(norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(norm), skipped


@dataclass
class DivergenceGuard:
    """Notices training that has broken down, from what each optimizer update reports: the
    weights no longer finite, ``patience`` updates in a row skipped (a non-finite loss or
    gradient) or with a gradient of exactly 0 (a saturated model: at lr 1e3 SFT's loss jumped to
    4.5e6, then sat at ln(vocab) with zero gradient), or a loss ``blowup`` times its first value.
    ``check`` returns what went wrong, or None."""

    patience: int = 3
    blowup: float = 1e3
    first_loss: float | None = None
    skipped_in_a_row: int = 0
    zero_in_a_row: int = 0

    def check(self, loss: float | None, grad_norm: float, skipped: bool, had_gradient: bool,
              weights_finite: bool) -> str | None:
        if not weights_finite:
            return "the weights hold NaN or inf after this update"
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        self.zero_in_a_row = self.zero_in_a_row + 1 if had_gradient and grad_norm == 0 else 0
        if self.skipped_in_a_row >= self.patience:
            return f"{self.skipped_in_a_row} updates in a row had a non-finite loss or gradient"
        if self.zero_in_a_row >= self.patience:
            return f"the gradient was exactly 0 in {self.zero_in_a_row} updates in a row (the model has saturated)"
        if loss is not None and math.isfinite(loss):
            if self.first_loss is None:
                self.first_loss = loss
            elif abs(loss) > self.blowup * max(abs(self.first_loss), 1.0):
                return f"the loss went from {self.first_loss:.4g} to {loss:.4g}"
        return None


def sync_gradients(acc: Accelerator, model, last: bool):
    """DDP and FSDP reduce gradients only on the last micro-batch of an accumulation."""
    return sharding.no_sync(acc, model, last)


def is_due(done: int, every: int, total: int) -> bool:
    """True on every ``every``-th step and on the last one (``every`` 0 = only the last)."""
    return done == total or (every > 0 and done % every == 0)


# --- data order -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOrder:
    """Which examples each optimizer step sees: a pure function of (seed, step).

    Examples are drawn from a stream of seeded per-epoch permutations, ``global_batch`` at a
    time. Because the order depends only on the step number, resuming at step s replays exactly
    the batches an uninterrupted run would have seen (the "data position" is the step).
    """

    n: int
    seed: int

    def _epoch(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def batch(self, step: int, global_batch: int) -> list[int]:
        start = step * global_batch
        out: list[int] = []
        while len(out) < global_batch:
            epoch, offset = divmod(start + len(out), self.n)
            take = min(global_batch - len(out), self.n - offset)
            out.extend(self._epoch(epoch)[offset : offset + take])
        return out


def micro_batches(indices: list[int], batch: BatchConfig, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of one global batch.

    Micro-step m of rank r takes slice (m * world + r): with world=2, accum=A the union of what
    all ranks see in a step is the same as world=1, accum=2A — the basis of the DDP test.
    """
    size = batch.micro_batch_size
    return [
        indices[(m * world + rank) * size : (m * world + rank + 1) * size] for m in range(batch.grad_accum)
    ]


# --- one training run ---------------------------------------------------------------------------


class StepTimer(Protocol):
    def step_begin(self, step: int) -> None: ...  # step (1-based) starts: its batch is drawn
    def step_end(self, done: int) -> None: ...  # its update is done, before eval, logging, checkpoint


STEP_TIMERS: list[StepTimer] = []  # benchmarks time every stage's steps through these (bench/common.py)


@dataclass
class Due:
    """What the eval / log / checkpoint cadence asks for after a step (``TrainingRun.end_step``)."""

    eval: bool
    log: bool
    checkpoint: bool


@dataclass
class TrainingRun:
    """The state every stage's loop shares once its model exists: the prepared (DDP) model, its
    optimizer and schedule, the step to start from, the batch vocabulary, metrics and progress.

    Stages keep their own loop body (the algorithm); this object answers "which examples does
    this process see at this step" (``step_batches``), applies updates (``update``) and says what
    is due after a step (``end_step``); each stage's loop then evaluates, logs and checkpoints.
    """

    acc: Accelerator
    out: Path
    name: str  # the stage, as complete.json names it
    run: RunConfig
    optim: OptimConfig
    batch: BatchConfig
    model: torch.nn.Module  # prepared: DDP-wrapped under several processes, sharded by FSDP, or DeepSpeed's engine
    raw_model: torch.nn.Module  # the underlying model (sharded under FSDP and ZeRO-3: see whole_weights)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    start_step: int
    state: dict  # what the checkpoint held besides weights (stage extras such as the KL coefficient)
    order: DataOrder
    log: MetricsLog
    bar: Progress
    sharding: Sharding = field(default_factory=Sharding)
    empty: torch.nn.Module | None = None  # FSDP, ZeRO-3: the model's skeleton, filled to save it (sharding.plain_copy)
    guard: DivergenceGuard = field(default_factory=DivergenceGuard)
    backwards: int = 0  # since the last update
    last_save: float = field(default_factory=time.monotonic)  # when the last checkpoint (or the start) was

    @property
    def global_batch(self) -> int:
        return self.batch.global_batch(self.acc.num_processes)

    def step_batches(self, step: int) -> tuple[list[int], list[list[int]]]:
        """(the whole global batch's indices, this process's micro-batches) for ``step``, which
        starts here."""
        for timer in STEP_TIMERS:
            timer.step_begin(step + 1)
        indices = self.order.batch(step, self.global_batch)
        return indices, micro_batches(indices, self.batch, self.acc.process_index, self.acc.num_processes)

    def my_slice(self, n: int) -> slice:
        """This process's share of ``n`` items (a step's prompts or responses)."""
        return processes.share(n)

    def my_shards(self, per_process: int) -> range:
        """The shards of a step's batch this process holds, when the batch is cut into
        ``per_process`` shards per process (process order)."""
        return range(self.acc.process_index * per_process, (self.acc.process_index + 1) * per_process)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the processes (itself in one), on the CPU."""
        if self.acc.num_processes == 1:
            return x
        return self.acc.reduce(x.to(self.acc.device), reduction="sum").cpu()

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """The largest ``x`` over the processes (itself in one), on the CPU."""
        if self.acc.num_processes == 1:
            return x
        return self.acc.reduce(x.to(self.acc.device), reduction="max").cpu()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` (equal shapes), concatenated along dim 0 in process order, on the CPU."""
        if self.acc.num_processes == 1:
            return x
        return self.acc.gather(x.to(self.acc.device)).cpu()

    def whole_weights(self):
        """A block in which every process holds all of the model's weights (FSDP gathers them;
        otherwise nothing to do): evaluation on the main process alone and generation to
        different lengths run inside. Every process must enter it."""
        return sharding.whole_weights(self.model, self.sharding.reshard_after_forward)

    def evaluation(self, evaluate: Callable[[int], dict[str, float]]) -> Callable[[int], dict[str, float]]:
        """Decorates a stage's ``evaluate(step)``, which the main process runs on the whole
        weights while the others get {}. Every process calls the result."""

        @functools.wraps(evaluate)
        def on_every_process(step: int) -> dict[str, float]:
            with self.whole_weights():
                return evaluate(step) if self.acc.is_main_process else {}

        return on_every_process

    def backward(self, loss: torch.Tensor) -> None:
        """The backward of one micro-batch's loss; gradients add up until ``update``."""
        sharding.backward(self.acc, self.model, loss)
        self.backwards += 1

    def update(self, done: int, loss: float | None, loss_has_scale: bool = True) -> tuple[float, bool]:
        """One optimizer update (``optimizer_step``); returns (grad norm, skipped). Stops the run
        with ``TrainingDiverged`` when the guard sees it has diverged. ``loss``: the update's loss
        (reduced over processes) or None; a non-finite one counts as a skipped update. RL
        surrogates, whose size says nothing of divergence, pass ``loss_has_scale=False``."""
        # (DeepSpeed's engine moves gradients into its partitions at each backward)
        had_gradient = self.backwards > 0 if self.sharding.zero_stage else any(p.grad is not None for p in self.model.parameters())
        if had_gradient or not self.sharding.zero_stage:
            grad_norm, skipped = optimizer_step(self.model, self.optimizer, self.scheduler, self.optim.max_grad_norm)
        else:  # no backward on any process (GRPO when every advantage is 0): DeepSpeed's step would
            grad_norm, skipped = 0.0, False  # still move the weights (Adam's momentum, weight decay)
            self.scheduler.step()
        self.backwards = 0
        skipped = skipped or (loss is not None and not math.isfinite(loss))
        if skipped:
            self.bar.print(f"step {done}: non-finite loss or gradient norm, update skipped")
        # NaN weights make NaN gradients (a skip), or answers that no reward tells apart (no gradient)
        weights_finite = (had_gradient and not skipped) or not sharding.non_finite_weights(self.raw_model)
        problem = self.guard.check(loss if loss_has_scale else None, grad_norm, skipped, had_gradient, weights_finite)
        if problem:
            self.diverged(done, problem)
        return grad_norm, skipped

    def require_finite_weights(self, done: int, metrics: dict[str, float]) -> None:
        """Before a checkpoint and before the stage saves its model: neither may hold NaN or inf."""
        bad = sharding.non_finite_weights(self.raw_model)
        if bad:
            self.log.log(done, metrics)
            self.diverged(done, f"{len(bad)} weight tensors hold NaN or inf (first: {bad[0]})")

    def diverged(self, done: int, problem: str) -> None:
        self.bar.close()
        self.log.close()
        metrics = f" (metrics so far: {self.log.path})" if self.log.path.exists() else ""
        raise TrainingDiverged(
            f"{self.out}: training diverged at step {done}: {problem}. Nothing was saved as finished{metrics}; "
            f"lower --optim.lr (now {self.optim.lr:g}) and rerun with --run.overwrite")

    def end_step(self, done: int, metrics: dict[str, float]) -> Due:
        """Step ``done`` has updated the weights: what the cadence asks for now. The weights are
        checked for NaN/inf first when a checkpoint or the final save follows."""
        for timer in STEP_TIMERS:
            timer.step_end(done)
        if torch.cuda.is_available():
            metrics["gpu/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        # Not at the last step: the stage saves its final model and complete.json right after, and
        # a finished stage is never resumed (a PPO checkpoint is ~3 GB, ~10 s of disk writes here).
        checkpoint = (done % self.run.save_every == 0 or self.save_is_due()) and done < self.run.steps
        if checkpoint or done == self.run.steps:  # on every process (they hold the same weights)
            self.require_finite_weights(done, metrics)
        return Due(eval=is_due(done, self.run.eval_every, self.run.steps),
                   log=is_due(done, self.run.log_every, self.run.steps), checkpoint=checkpoint)

    def checkpoint(self, done: int, state: dict | None = None, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Save ``checkpoints/step-N``: weights, optimizer, schedule, RNG, and the stage's own
        ``state`` (JSON-able) and ``tensors`` (whole), which come back in ``self.state`` on
        resume. Every process must call it."""
        weights, optimizer_state = sharding.state_dicts(self.raw_model, self.optimizer)
        if self.acc.is_main_process:
            save_checkpoint(self.out, done, weights, optimizer_state, self.scheduler, state or {},
                            self.run.keep_checkpoints, tensors or {})
        self.acc.wait_for_everyone()
        self.last_save = time.monotonic()

    def save_is_due(self) -> bool:
        """``run.save_every_minutes`` have passed since the last checkpoint, by the main process's
        clock: every process must take the same decision (they all wait for the save)."""
        if self.run.save_every_minutes <= 0:
            return False
        due = [time.monotonic() - self.last_save >= 60 * self.run.save_every_minutes]
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            due = broadcast_object_list(due)
        return bool(due[0])

    def finish(self, metrics: dict[str, float], evaluate: Callable[[int], dict[str, float]],
               save: Callable[[Path, torch.nn.Module], None], **summary: Any) -> Path:
        """The stage's end: ``save(out, model)`` writes its model folder from the trained model,
        whole (main process), then complete.json, written last: a folder without it is an
        unfinished run. A run resumed from a checkpoint at its last step (only the save was lost)
        evaluates once more first."""
        if self.start_step == self.run.steps:
            metrics = evaluate(self.run.steps)
        model = sharding.plain_copy(self.raw_model, self.empty)
        if self.acc.is_main_process:
            save(self.out, model)
            mark_complete(self.out, {"stage": self.name, "steps": self.run.steps, **summary, **metrics})
        self.close()
        return self.out

    def close(self) -> None:
        self.bar.close()
        self.log.close()
        self.acc.wait_for_everyone()


def start_training(acc: Accelerator, out: Path, model: torch.nn.Module, optim: OptimConfig, run: RunConfig,
                   batch: BatchConfig, n_examples: int, name: str, schedule_steps: int = 0,
                   gradient_checkpointing: bool = False) -> TrainingRun:
    """Optimizer, schedule, exact resume, DDP wrapping, FSDP sharding or DeepSpeed's engine,
    metrics and progress bar for one stage. ``schedule_steps``: optimizer steps in the whole run when a stage takes several
    per step (PPO); default ``run.steps``. ``gradient_checkpointing``: ``model.gradient_checkpointing``."""
    model.to(acc.device)  # before the optimizer: a resumed optimizer state lands beside its weights
    split = Sharding.requested(acc.num_processes)
    if gradient_checkpointing or split.activation_checkpointing:
        enable_gradient_checkpointing(model)
    empty = None
    if split.fsdp:  # the optimizer must hold the shards, so it is built after them
        empty = sharding.skeleton(model)
        sharding.shard(model, split)
        acc.print(f"FSDP2: each of {acc.num_processes} processes holds 1/{acc.num_processes} of the weights, "
                  f"gradients and optimizer state" + (" (in host memory)" if split.cpu_offload else ""))
    optimizer = build_optimizer(model.parameters(), optim)
    scheduler = build_scheduler(optimizer, optim, schedule_steps or run.steps)  # DeepSpeed keeps these groups
    if split.zero_stage:  # its engine splits the optimizer's work (and the weights, at stage 3)
        empty = sharding.skeleton(model) if split.zero_stage == 3 else None
        model, optimizer = sharding.deepspeed_engine(model, optimizer, split, optim.max_grad_norm, acc.num_processes)
        held = {1: "optimizer state", 2: "gradients and optimizer state", 3: "weights, gradients and optimizer state"}
        acc.print(f"DeepSpeed ZeRO-{split.zero_stage}: each of {acc.num_processes} processes holds "
                  f"1/{acc.num_processes} of the {held[split.zero_stage]}")
    state = {"step": 0}
    if (ckpt := checkpoint_to_resume(out, run, acc.print)) is not None:
        state, weights, optimizer_state = load_checkpoint(ckpt, scheduler)
        sharding.load_state_dicts(sharding.inner(model), optimizer, weights, optimizer_state,
                                  where=str(ckpt / "trainable.safetensors"))
        acc.print(f"resumed from {ckpt} at step {state['step']}")
    start = state["step"]
    prepared = model if split.fsdp or split.zero_stage else acc.prepare(model)  # they reduce gradients themselves
    prepared.train()
    return TrainingRun(
        acc=acc, out=out, name=name, run=run, optim=optim, batch=batch, model=prepared, raw_model=acc.unwrap_model(sharding.inner(prepared)),
        optimizer=optimizer, scheduler=scheduler, start_step=start, state=state, order=DataOrder(n_examples, run.seed),
        sharding=split, empty=empty,
        log=MetricsLog(out, acc.is_main_process, resume_step=start),
        bar=Progress(run.steps, start, name, acc.is_main_process),
    )
