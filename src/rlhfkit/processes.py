"""The processes a command runs on: one, or several started by ``torchrun`` / ``accelerate
launch``. Sampling commands (labels, best-of-N, evaluation) split their prompts across them and
gather the answers; the main process writes the files.
"""

from __future__ import annotations

import contextlib
import os


_alone = False  # the main process, going on alone after the others left (continue_alone)


def distributed() -> bool:
    """Launched as one of several processes (torchrun / accelerate launch set WORLD_SIZE), which
    are all still here."""
    return not _alone and int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout():
    """How long a process waits at a collective for the others (``RLHFKIT_PROCESS_TIMEOUT_MINUTES``,
    default 60). The main process evaluates alone during training while the others wait at
    their next collective; NCCL's own default, 10 minutes, would end a run whose evaluation
    takes longer."""
    from datetime import timedelta

    from rlhfkit.errors import RlhfkitError

    value = os.environ.get("RLHFKIT_PROCESS_TIMEOUT_MINUTES", "60")
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise RlhfkitError(f"RLHFKIT_PROCESS_TIMEOUT_MINUTES={value!r}: give the minutes a process waits for the "
                           "others, a number above 0 (default 60)")
    return timedelta(minutes=minutes)


DEEPSPEED = "RLHFKIT_USE_DEEPSPEED"  # a launch's DeepSpeed request, once claim_deepspeed has taken it


def claim_deepspeed() -> None:
    """Take a DeepSpeed request (``accelerate launch`` with a DeepSpeed config) away from
    accelerate before it reads it: accelerate would start DeepSpeed itself on a GPU (and drop
    the request on a CPU), while rlhfkit starts DeepSpeed's engine for the trained model itself
    (train/sharding.py), on any device."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        os.environ[DEEPSPEED] = "true"
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"


def state():
    import torch
    from accelerate import PartialState

    claim_deepspeed()
    # cpu= as the training stages pass it (train/loop.py), so the process group is the same one;
    # the first call sets the group up, with this timeout.
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timeout())


def rank_and_size() -> tuple[int, int]:
    if not distributed():
        return 0, 1
    current = state()
    return current.process_index, current.num_processes


def is_main() -> bool:
    return rank_and_size()[0] == 0


def device():
    """Where this process computes: its own GPU under several processes, else the GPU or the CPU."""
    import torch

    if distributed():
        return state().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def share(n: int) -> slice:
    """This process's contiguous share of ``n`` items (the first processes take one more when
    ``n`` does not divide evenly)."""
    rank, size = rank_and_size()
    return slice(n * rank // size, n * (rank + 1) // size)


def gather(items: list) -> list:
    """Every process's ``items`` (any lengths), concatenated in process order; itself in one."""
    if not distributed():
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def wait_for_everyone() -> None:
    if distributed():
        state().wait_for_everyone()


@contextlib.contextmanager
def main_first():
    """The main process runs the block first (it may repair or remove files); the others after."""
    if not distributed():
        yield
        return
    with state().main_process_first():
        yield


def broadcast(value):
    """The main process's ``value``, on every process (any picklable object)."""
    if not distributed():
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value if is_main() else None])[0]


def continue_alone() -> bool:
    """Where the others' part of a command ends: every process but the main one leaves the
    process group and gets False; the main one gets True and goes on as one process. For the
    work that follows training (the pipeline's evaluation and report), which would only keep
    the others waiting."""
    global _alone
    if not distributed():
        return True
    main = is_main()
    wait_for_everyone()
    close()
    _alone = main
    return main


def close() -> None:
    """Leave the process group cleanly at the end of a command (a process that exits while gloo's
    threads still run can abort: "terminate called without an active exception")."""
    import torch.distributed as dist

    if distributed() and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
