"""Process-group helpers for multi-GPU and multi-node training with ``torchrun``.

The distributed engine is PyTorch's own (DistributedDataParallel); this module only
reads the environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
starts the process group and answers "who am I". Without ``torchrun`` everything
degrades to a single process, so the same training code runs on a laptop.

Example
-------
::

    torchrun --nproc_per_node=4 -m brainage_core.bench.predict --n-subjects 1000
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from brainage_core._utils.validation import BrainAgeInputError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) job.

    Attributes
    ----------
    rank : int
        Global rank, 0 for the main process.
    world_size : int
        Number of processes.
    device : torch.device
        The device this process computes on.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group with more than one process is active."""
        return self.world_size > 1


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device this process should compute on.

    ``"auto"`` gives the local CUDA device when one is present, else the CPU. ``"auto"``
    and ``"cuda"`` (without an index) give ``cuda:LOCAL_RANK`` under ``torchrun``, so that
    each process of a node has its own GPU; ``"cuda:N"`` is taken as it is.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        visible = torch.cuda.device_count() if torch.cuda.is_available() else None
        if visible is not None and local_rank >= visible:  # no GPU at all: init's error
            raise BrainAgeInputError(
                f"process of LOCAL_RANK {local_rank} has no GPU of its own: this node shows "
                f"{visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                f"{visible} process(es) per node (--nproc / --nproc_per_node).")
        return torch.device("cuda", local_rank)
    return torch.device(device)


#: The most DataLoader workers ``num_workers: auto`` starts per process.
MAX_AUTO_WORKERS = 8


def check_num_workers(name: str, value: Any) -> int | str:
    """Check a ``num_workers`` setting: ``"auto"`` or a non-negative integer."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise BrainAgeInputError(
            f"'{name}' must be 'auto' or a non-negative integer; {value!r} was provided."
        )
    return int(value)


def resolve_num_workers(
    setting: int | str,
    device: torch.device | str,
    *,
    cpu_count: int | None = None,
    local_world_size: int | None = None,
) -> int:
    """DataLoader worker processes for ``setting`` (an integer is taken as it is).

    ``"auto"`` gives 0 on the CPU: there the workers only take cores from the computation
    (on 2 cores they cost, they never pay). On CUDA, where the main process mostly waits
    for the GPU while the volumes are read, converted from float16 to float32 and batched,
    it gives ``min(8, cpus per local process - 1)``: the cores this process may use
    (its CPU affinity), shared with the other ``torchrun`` processes of the node
    (``LOCAL_WORLD_SIZE``), one left for the process itself.

    Parameters
    ----------
    setting : int or "auto"
        The configured value.
    device : torch.device or str
        The device the batches go to.
    cpu_count : int or None, default=None
        Usable cores of the node (None: ``os.sched_getaffinity`` or ``os.cpu_count``).
    local_world_size : int or None, default=None
        Processes of the job on this node (None: ``LOCAL_WORLD_SIZE``, else 1).

    Returns
    -------
    int
    """
    setting = check_num_workers("num_workers", setting)
    if setting != "auto":
        return int(setting)
    if torch.device(device).type != "cuda":
        return 0
    if cpu_count is None:
        cpu_count = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count() or 1)
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    per_process = int(cpu_count) // max(int(local_world_size), 1)
    return max(0, min(MAX_AUTO_WORKERS, per_process - 1))


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype for ``device``: None (full precision) on the CPU or if disabled.

    bfloat16 where the GPU computes it natively (compute capability 8.0 or newer: A100,
    H100, RTX 30xx and later), float16 (to be used with a
    :class:`torch.amp.GradScaler`) on older GPUs such as the V100 or T4.
    ``torch.cuda.is_bf16_supported()`` is not used: it answers True on GPUs that only
    emulate bfloat16, slowly.
    """
    if not enabled or device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def init_distributed(device: str = "auto") -> DistContext:
    """Start the process group if ``torchrun`` launched us and return the context.

    Uses NCCL on CUDA and gloo on the CPU. An already initialised process group (for
    example one started by a test with :func:`torch.distributed.init_process_group`) is
    reused as it is.

    Parameters
    ----------
    device : str, default="auto"
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BrainAgeInputError(
            f"'device' is {device!r}, but this machine has no CUDA GPU that torch can use; "
            "use 'auto' or 'cpu'."
        )
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), dev)
    return DistContext(0, 1, dev)


def process_context(device: torch.device | str = "cpu") -> DistContext:
    """Where this process stands, without starting anything: the active process group's
    rank and size (one process without one), computing on ``device``."""
    dev = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), dev)
    return DistContext(0, 1, dev)


def broadcast_float(value: float, ctx: DistContext) -> float:
    """Return the main process's ``value`` on every process (keeps decisions in sync)."""
    if not ctx.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device(ctx))
    dist.broadcast(t, src=0)
    return float(t.item())


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sums of ``values`` over every process (the values themselves in one process)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def shard_positions(n: int, ctx: DistContext) -> range:
    """Positions ``rank, rank + world, ...`` of ``n`` items that this process handles."""
    return range(ctx.rank, n, ctx.world_size)


def gather_shards(values: np.ndarray, n: int, ctx: DistContext) -> np.ndarray:
    """Reassemble per-process results of :func:`shard_positions` into all ``n`` items.

    Every process returns the whole array, in item order.
    """
    values = np.asarray(values)
    if not ctx.distributed:
        return values
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, values)
    out = np.empty((n, *values.shape[1:]), dtype=values.dtype)
    for rank, part in enumerate(parts):
        out[rank::ctx.world_size] = part
    return out


def all_reduce_max(values: list[float], ctx: DistContext) -> list[float]:
    """Maxima of ``values`` over every process (the values themselves in one process)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def gather_items(items: list[Any], n: int, ctx: DistContext) -> list[Any] | None:
    """Reassemble per-process lists of :func:`shard_positions` items on the main process.

    ``items`` holds this process's results in the order of its positions (any picklable
    objects; a process may have none). The main process gets all ``n`` in item order;
    the others get None.
    """
    if not ctx.distributed:
        return list(items)
    parts: list[Any] = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(list(items), parts, dst=0)
    if not ctx.is_main:
        return None
    out: list[Any] = [None] * n
    for rank, part in enumerate(parts):
        out[rank::ctx.world_size] = part
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op in a single process)."""
    if ctx.distributed:
        dist.barrier()


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
