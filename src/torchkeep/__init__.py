"""torchkeep: keep PyTorch model and training state.

Open any checkpoint without running code from it, carry weights into a changed model with a
full report, and resume training runs exactly after a crash.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names and the module that defines each. Imported on first use so that
# `import torchkeep` stays cheap and the layers stay independent.
_EXPORTS: dict[str, str] = {
    # errors
    "TorchkeepError": "errors",
    "FormatError": "errors",
    "CorruptCheckpointError": "errors",
    "UnsafeCheckpointError": "errors",
    "TransferError": "errors",
    "StateError": "errors",
    "SurgeryError": "errors",
    # reading
    "open": "checkpoint",
    "Checkpoint": "checkpoint",
    "Entry": "checkpoint",
    "Summary": "checkpoint",
    "TensorRef": "formats.base",
    "Opaque": "safety",
    "scan": "scanning",
    "ScanReport": "scanning",
    "GlobalRef": "safety",
    "diff": "diffing",
    "DiffReport": "diffing",
    "write_report": "htmlreport",
    "convert": "convert",
    "consolidate": "distributed",
    "ConvertResult": "convert",
    # transfer and model shaping
    "transfer": "transfer",
    "TransferReport": "transfer",
    "freeze": "modeling",
    "unfreeze": "modeling",
    "trainable": "modeling",
    "param_groups": "modeling",
    "summary": "modeling",
    "ModelSummary": "modeling",
    "remove": "modeling",
    "replace": "modeling",
    "truncate": "modeling",
    # training state
    "TrainState": "state",
    "CheckpointManager": "manager",
    "Migration": "migrate",
    "MigrationReport": "migrate",
    "OptimizerReport": "migrate",
    "Finding": "doctor",
    "CheckpointInfo": "manager",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchkeep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"torchkeep.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """Keeps ``torchkeep.transfer`` / ``torchkeep.convert`` the functions: importing the
    submodule of the same name would otherwise make the import system overwrite them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}"
                and _EXPORTS.get(name) == name):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import Checkpoint, Entry, Summary, open
    from .errors import (CorruptCheckpointError, FormatError, StateError, SurgeryError,
                         TorchkeepError, TransferError, UnsafeCheckpointError)
    from .formats.base import TensorRef
    from .manager import CheckpointInfo, CheckpointManager
    from .safety import GlobalRef, Opaque
    from .scanning import ScanReport, scan
    from .state import TrainState
    from .transfer import TransferReport, transfer
