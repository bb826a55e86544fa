"""Which checkpoints a manager keeps (pure policy over :class:`CheckpointInfo` records), and the
cheap test that tells a save which tensors are unchanged since the previous one."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CheckpointInfo:
    """One checkpoint of a manager's folder, as its commit record describes it."""

    step: int
    path: str
    time: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0          # bytes of all tensors in the checkpoint
    written: int = 0         # bytes this checkpoint added to the folder (the rest was shared)
    status: str = "ok"       # 'ok' | 'uncommitted' | 'damaged'
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in self.metrics.items())
        extra = f" [{metrics}]" if metrics else ""
        problems = f": {'; '.join(self.problems)}" if self.problems else ""
        return f"step {self.step} ({self.status}) {self.path}{extra}{problems}"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


def metric_of(info: CheckpointInfo, monitor: str | None) -> float | None:
    """The monitored metric of a checkpoint as a float, or None (absent, not a number, NaN)."""
    v = info.metrics.get(monitor) if monitor else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def ranked_best(infos: list[CheckpointInfo], monitor: str | None, mode: str) -> list[CheckpointInfo]:
    """Checkpoints with a metric, best first (ties: the newer first)."""
    scored = [(m, i) for i in infos if (m := metric_of(i, monitor)) is not None]
    scored.sort(key=lambda mi: (mi[0] if mode == "min" else -mi[0], -mi[1].step))
    return [i for _, i in scored]


def steps_to_keep(infos: list[CheckpointInfo], keep_last: int | None, keep_best: int,
                  monitor: str | None, mode: str) -> set[int]:
    """The steps rotation keeps: the last ``keep_last`` (all when None), the ``keep_best`` best,
    and always the newest."""
    steps = [i.step for i in sorted(infos, key=lambda i: i.step)]
    if not steps:
        return set()
    if keep_last is None:
        return set(steps)
    keep = set(steps[-keep_last:]) if keep_last else set()
    keep.add(steps[-1])
    if keep_best:
        keep.update(i.step for i in ranked_best(infos, monitor, mode)[:keep_best])
    return keep


def tensor_signatures(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
    """(tensor, version counter) of each tensor: what tells, at the next save, that a tensor is
    the same storage and torch saw no in-place change since (inference tensors have no counter)."""
    out = {}
    for k, t in tensors.items():
        try:
            out[k] = (t, t._version)
        except RuntimeError:
            continue
    return out


def unchanged_since(prev: tuple[torch.Tensor, int, str, int], now: tuple[torch.Tensor, int]) -> bool:
    """Same storage (the old tensor is held, so its address cannot be reused), same view, same
    version counter. Only a hint: the writer still compares crc32 of the bytes."""
    a, va = prev[0], prev[1]
    b, vb = now
    return (va == vb and a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
            and a.data_ptr() == b.data_ptr())
