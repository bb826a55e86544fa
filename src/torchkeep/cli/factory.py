"""Build a model from ``package.module:Factory`` for commands that take one (imports user code
on purpose: the user named it on the command line)."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch

from torchkeep.errors import TorchkeepError


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """Import ``module:attr`` (attr may be dotted) and call it with ``kwargs``."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise TorchkeepError(f"{spec!r} is not of the form package.module:Factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise TorchkeepError(f"cannot import {mod_name!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TorchkeepError(f"{mod_name!r} has no attribute {attr!r}") from None
    model = obj(**(kwargs or {}))
    if not isinstance(model, torch.nn.Module):
        raise TorchkeepError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model
