"""torchkeep: keep PyTorch model and training state.

Open any checkpoint without running code from it, carry weights into a changed model with a
full report, and resume training runs exactly after a crash.

The top level holds the verbs a user calls, ``TrainState``, ``CheckpointManager`` and the
exceptions. Result types live in the subpackage of their job (``torchkeep.read``,
``torchkeep.keep``, ``torchkeep.carry``, ``torchkeep.look``) and are importable from there.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torchkeep.version import __version__

# Public name -> the module that defines it. Imported on first use, so that `import torchkeep`
# stays cheap (no torch.distributed, no frameworks) and the layers stay independent.
_EXPORTS: dict[str, str] = {
    # errors
    "TorchkeepError": "errors",
    "FormatError": "errors",
    "CorruptCheckpointError": "errors",
    "UnsafeCheckpointError": "errors",
    "TransferError": "errors",
    "StateError": "errors",
    "SurgeryError": "errors",
    # look: read any checkpoint safely, compare, convert, report
    "open": "read.checkpoint",
    "Checkpoint": "read.checkpoint",
    "scan": "read.scanner",
    "diff": "look.diffing",
    "convert": "look.conversion",
    "consolidate": "look.consolidate",
    "write_report": "look.report.writer",
    # carry and shape
    "transfer": "carry.planner",
    "freeze": "shape",
    "unfreeze": "shape",
    "trainable": "shape",
    "param_groups": "shape",
    "summary": "shape",
    "remove": "shape",
    "replace": "shape",
    "truncate": "shape",
    # keep
    "TrainState": "keep.trainstate",
    "CheckpointManager": "keep.manager",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchkeep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"torchkeep.{module}"), name)
    _bind_collectives_early()   # torch may have been loaded just now
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


def _bind_collectives_early() -> None:
    """Import ``torch.distributed.nn`` now, while no process group exists (cheap: torch is loaded).

    Its functions take ``group=group.WORLD`` as a default argument, evaluated when the module is
    first imported. torchkeep imports DCP (which imports it) lazily, usually after
    ``init_process_group()``: the default group then lives on in those defaults past
    ``destroy_process_group()`` and is destroyed at interpreter exit, where gloo aborts the
    process about once in ten runs ("terminate called without an active exception").
    """
    import sys

    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is None or "torch.distributed.nn" in sys.modules:
        return
    try:
        if dist.is_available() and not dist.is_initialized():
            importlib.import_module("torch.distributed.nn")
    except Exception as e:  # noqa: BLE001 - an optional safeguard, never a reason to fail the import
        import logging
        logging.getLogger(__name__).warning(
            "could not import torch.distributed.nn before any process group exists (%s): a "
            "process group may outlive destroy_process_group() and abort the process at exit", e)


_bind_collectives_early()


if TYPE_CHECKING:  # pragma: no cover
    from torchkeep.carry.planner import transfer
    from torchkeep.errors import (CorruptCheckpointError, FormatError, StateError, SurgeryError,
                                  TorchkeepError, TransferError, UnsafeCheckpointError)
    from torchkeep.keep.manager import CheckpointManager
    from torchkeep.keep.trainstate import TrainState
    from torchkeep.look.consolidate import consolidate
    from torchkeep.look.conversion import convert
    from torchkeep.look.diffing import diff
    from torchkeep.look.report.writer import write_report
    from torchkeep.read.checkpoint import Checkpoint, open
    from torchkeep.read.scanner import scan
    from torchkeep.shape import (freeze, param_groups, remove, replace, summary, trainable,
                                 truncate, unfreeze)
