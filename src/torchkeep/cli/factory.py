"""Build a model from ``package.module:Factory`` or ``path/to/file.py:Factory`` for commands that
take one (imports user code on purpose: the user named it on the command line)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
from typing import Any

import torch

from torchkeep.errors import TorchkeepError

_MODULE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_FILE_SPEC = re.compile(r"^(?P<file>.+\.py):(?P<attr>[A-Za-z_][\w.]*)$")
FORMS = "package.module:Factory or path/to/file.py:Factory"


def is_factory(spec: str) -> bool:
    """True when ``spec`` names a model factory rather than an existing checkpoint path."""
    if os.path.exists(spec):
        return False
    return bool(_MODULE_SPEC.match(spec) or _FILE_SPEC.match(spec))


def parse_kwargs(text: str | None, option: str = "--kwargs") -> dict[str, Any]:
    """The JSON object given to ``option``; an error naming the option otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise TorchkeepError(f"{option} {text!r} is not valid JSON: {e.msg} at column {e.colno}",
                             hint=f"""pass a JSON object, e.g. {option} '{{"num_classes": 10}}'""") from None
    if not isinstance(value, dict):
        raise TorchkeepError(f"{option} must be a JSON object of keyword arguments, got "
                             f"{type(value).__name__}", hint=f"""e.g. {option} '{{"num_classes": 10}}'""")
    return value


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise TorchkeepError(f"no such Python file: {path}", hint=f"give {FORMS}")
    name = "_torchkeep_factory_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TorchkeepError(f"cannot import {path}", hint=f"give {FORMS}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so the file's own sibling imports work
    spec.loader.exec_module(mod)
    return mod


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """Import ``module:attr`` or ``file.py:attr`` (attr may be dotted) and call it with
    ``kwargs``."""
    m = _FILE_SPEC.match(spec)
    if m:
        source, attr = m.group("file"), m.group("attr")
        obj: Any = _import_file(source)
    else:
        source, _, attr = spec.partition(":")
        if not source or not attr:
            raise TorchkeepError(f"{spec!r} is neither an existing path nor a model factory",
                                 hint=f"give a checkpoint path, or {FORMS}")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            obj = importlib.import_module(source)
        except ImportError as e:
            raise TorchkeepError(f"cannot import {source!r}: {e}",
                                 hint=f"give {FORMS}; run from the folder that holds the module") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TorchkeepError(f"{source!r} has no attribute {attr!r}",
                                 hint="check the name after the colon") from None
    if not callable(obj):
        raise TorchkeepError(f"{spec} is a {type(obj).__name__}, not a class or function",
                             hint="name the model class or a function that returns the model")
    try:
        model = obj(**(kwargs or {}))
    except TypeError as e:
        raise TorchkeepError(f"{spec}(**{kwargs or {}}) failed: {e}",
                             hint="pass the keyword arguments it needs with --kwargs") from None
    if not isinstance(model, torch.nn.Module):
        raise TorchkeepError(f"{spec} returned {type(model).__name__}, not an nn.Module",
                             hint="name the model class or a function that returns the model")
    return model
