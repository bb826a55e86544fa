"""Rank helpers for ``torch.distributed``: rank, world size, barrier and object collectives that
also work without a process group (rank 0 of 1), so the same training script runs under
``torchrun`` and as a plain process; and DTensor detection without importing DTensor.
"""
from __future__ import annotations

import os
import sys
from typing import Any


def _dist() -> Any:
    import torch.distributed as dist
    return dist


def is_distributed() -> bool:
    """True inside an initialized ``torch.distributed`` process group."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return _dist().get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this machine, from torchrun's ``LOCAL_RANK`` (0 when not set)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a process without a process group)."""
    return rank() == 0


def barrier(group: Any = None) -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed():
        _dist().barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled in memory; never from a file)."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj: Any, dst: int = 0, group: Any = None) -> list[Any] | None:
    """Every rank's ``obj`` on rank ``dst`` (None on the others)."""
    if not is_distributed():
        return [obj]
    dist = _dist()
    me = dist.get_rank()
    out: list[Any] | None = [None] * dist.get_world_size(group) if me == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def _dtensor_cls() -> type | None:
    """DTensor when torch.distributed.tensor is loaded (a state cannot hold one otherwise)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)
