"""Training on several processes and nodes under ``torchrun``: DistributedDataParallel with one writer.

``torchrun`` starts one process per device and tells each its place through the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``). Outside it, or with one process,
every function here answers as for a single process and does nothing else, so the training loops
read the same either way. The process group starts on first use (NCCL when this process computes on
a GPU, gloo on the CPU) and ends when the process exits.

Rank 0 is the *writer*: it alone writes checkpoints and labels, registers models and prints
summaries; the others wait for it (:func:`writer_first`) where they need what it makes.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigurationError
from .device import choose_device

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

#: How long a process waits at a collective before it gives up. Rank 0 may compute pty-chi labels for
#: hours while the others wait at a barrier; a failure in any process ends them all through torchrun,
#: so a long timeout only delays noticing a genuine hang.
GROUP_TIMEOUT_S = 12 * 3600

#: What torchrun tells each process about the job (what :func:`_alone` hides).
_LAUNCHER_VARIABLES = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
)


def world_size() -> int:
    """Processes in the job (1 outside ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's place in the job, 0 to ``world_size() - 1`` (0 outside ``torchrun``)."""
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def local_rank() -> int:
    """This process's place on its node: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0


def is_writer() -> bool:
    """True in the one process that writes checkpoints, labels and summaries (rank 0)."""
    return rank() == 0


def start(device: str = "auto") -> torch.device:
    """This process's torch device; under ``torchrun`` also join the process group (once).

    Under ``torchrun`` a CUDA device (``"auto"`` on a GPU machine, ``"cuda"``, ``"cuda:n"``) becomes
    the GPU of the local rank, so each process owns one; CPU processes share the node's cores, a
    ``1/LOCAL_WORLD_SIZE`` share each (torchrun itself would leave every process one thread).
    Raises :class:`~bluesky_ptychonn.errors.ConfigurationError` when a later call asks for another
    kind of device than the one the group was started for.
    """
    import torch
    import torch.distributed as dist

    dev = choose_device(device)
    if world_size() == 1:
        return dev
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise ConfigurationError(
                f"device {device!r} needs the {backend} backend, but this process group runs {dist.get_backend()}"
            )
        return dev
    dist.init_process_group(
        backend,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        device_id=dev if dev.type == "cuda" else None,
    )
    atexit.register(_finish)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads())
    return dev


def cpu_threads() -> int:
    """This process's share of the node's cores under ``torchrun`` (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _active() -> bool:
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def _finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def describe() -> dict[str, Any]:
    """The job's shape for a checkpoint's provenance: ``world_size`` and ``backend`` (None alone)."""
    import torch.distributed as dist

    return {"world_size": world_size(), "backend": dist.get_backend() if _active() else None}


def barrier() -> None:
    """Wait until every process gets here."""
    import torch.distributed as dist

    if _active():
        dist.barrier()


def writer_first(make: Callable[[], T], device: str = "auto") -> T:
    """``make()`` on the writer alone, then on the others; the process group starts in between.

    For work that stores what it makes (iterative labels written to Tiled): the writer computes and
    stores, the others then read the stored result. The writer runs ``make`` as a lone process, with
    no group and torchrun's variables hidden, because pty-chi joins any group it finds or that the
    environment describes and would wait at its own collectives for processes that never come; the
    others wait in :func:`start` (which returns once every process has joined).

    Raises :class:`~bluesky_ptychonn.errors.ConfigurationError` when the group has started already.
    """
    if world_size() == 1:
        return make()
    if _active():
        raise ConfigurationError(
            "work for the writer alone (iterative labels) must come before the process group starts; make the "
            "labels first with `bluesky-ptychonn iterative`, or train once per torchrun process"
        )
    if is_writer():
        with _alone():
            result = make()
        start(device)
        return result
    start(device)
    return make()


@contextmanager
def _alone() -> Iterator[None]:
    """torchrun's environment hidden for the block (pty-chi and torch read it), restored after."""
    hidden = {k: os.environ.pop(k) for k in _LAUNCHER_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(hidden)


def agree(values: Sequence[float], dev: torch.device) -> list[float]:
    """The writer's ``values`` on every process: for decisions (stop, keep these weights) all must share."""
    import torch
    import torch.distributed as dist

    if not _active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=dev)
    dist.broadcast(t, src=0)
    return t.tolist()


def total(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over every process (in place; returned for chaining)."""
    import torch.distributed as dist

    if _active():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sync_buffers(model: torch.nn.Module) -> None:
    """Copy the writer's buffers (BatchNorm running statistics) to every process.

    DistributedDataParallel averages gradients but each process updates its running statistics from its
    own slice of the batch; after this, every process evaluates, and saves, the same model.
    """
    import torch.distributed as dist

    if _active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def wrap(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel under ``torchrun`` (gradients averaged), else ``model`` itself.

    On GPUs BatchNorm becomes SyncBatchNorm (batch statistics over the global batch, as in one process).
    torch has no SyncBatchNorm on the CPU: there each process normalises with its own slice's
    statistics, so a BatchNorm network trained with gloo differs from one process by more than rounding.
    """
    import torch

    if not _active():
        return model
    if dev.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [dev.index] if dev.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
