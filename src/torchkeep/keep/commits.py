"""The manager's commit protocol as its snapshot writers see it.

:class:`~torchkeep.keep.manager.CheckpointManager` owns the protocol (one writer per folder, a
checkpoint exists once its commit record does, rotation after each commit, fallback past damage).
*How* a snapshot's bytes are put down is the writer's job: one process through the native writer,
or every rank of a process group through torch.distributed.checkpoint
(:mod:`torchkeep.keep.sharded.checkpointing`). A writer reaches the manager only through
:class:`CommitHost`, so writers never import the manager.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from torchkeep.errors import StateError
from torchkeep.keep.retention import CheckpointInfo
from torchkeep.keep.trainstate import TrainState


class CommitHost(Protocol):
    """What a snapshot writer may use of the manager that drives it (private to the package:
    the manager's users never call these)."""

    directory: str
    root: str
    storage: Any
    writer: Any
    async_save: bool

    def _check_open(self) -> None: ...
    def wait(self) -> None: ...
    def _begin_writing(self) -> None: ...
    def _forget_step(self, step: int) -> None: ...
    def _known_blobs(self) -> dict[str, str]: ...
    def _snapshot(self, enc: Any) -> Any: ...
    def _launch(self, step: int, in_background: Callable[..., None], in_place: Callable[..., None],
               job: tuple) -> None: ...
    def _failed(self, step: int, err: BaseException) -> None: ...
    def _committed(self, step: int, info: CheckpointInfo, blobs: dict[str, str],
                   unchanged: dict[str, Any] | None = None) -> None: ...
    def _candidates(self, which: Any) -> list[CheckpointInfo]: ...
    def _read(self, folder: str, allow_pickle: bool) -> Any: ...


@dataclass
class CommitEntry:
    info: CheckpointInfo
    refs: dict[str, str] | None = None   # blob digest -> checksum token, None if unreadable


def resolve_step(state: Any, step: int | None) -> int:
    """The step a save is filed under: given, or the TrainState's own global step."""
    if step is None:
        if not isinstance(state, TrainState):
            raise StateError("save() of a plain mapping needs step=")
        step = state.step
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


def plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as plain numbers, lists and strings (tensors and numpy scalars unwrapped)."""
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        elif hasattr(v, "item") and callable(v.item) and not isinstance(v, (list, dict)):
            v = v.item()
        out[str(k)] = v
    return out
