"""Bounds on the work a hostile file can cause: pickle length and opcode count, memo size,
container sizes, nesting depth, decompressed bytes, header sizes and JSON depth.

Every limit has a default that legitimate checkpoints stay well inside and an environment
variable to raise it (read at each use, so a test or a user can change it at run time).
Exceeding one raises :class:`~torchkeep.errors.LimitExceededError`, whose one-line message names
the limit and the variable.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from torchkeep.errors import LimitExceededError

_MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """The bounds in force (see the module docstring); ``env`` names each one's variable."""

    pickle_bytes: int = 256 * _MiB      # bytes one pickle may span
    pickle_ops: int = 3_000_000         # opcodes one pickle may execute
    memo: int = 1_000_000               # memo entries in one pickle
    container: int = 5_000_000          # items in one container / on the pickle stack
    depth: int = 100                    # nesting depth of the unpickled object
    nodes: int = 10_000_000             # objects in the unpickled tree, shared ones counted per use
    decompressed: int = 2048 * _MiB     # bytes decompressed from archives by one scan or read
    ratio: int = 200                    # decompressed / compressed size of one archive member
    members: int = 100_000              # entries in one zip or tar archive
    header_bytes: int = 100_000_000     # a safetensors header or an index JSON
    json_depth: int = 64                # nesting of such a JSON document

    @staticmethod
    def env(name: str) -> str:
        return f"TORCHKEEP_MAX_{name.upper()}"


def current() -> Limits:
    """The limits with any ``TORCHKEEP_MAX_*`` environment overrides applied."""
    values = {}
    for f in fields(Limits):
        raw = os.environ.get(Limits.env(f.name))
        if raw:
            try:
                values[f.name] = int(raw.replace("_", ""))
            except ValueError:
                raise LimitExceededError(f"{Limits.env(f.name)}={raw!r} is not an integer") from None
    return Limits(**values)


def exceeded(name: str, what: str, *, path: str | None = None,
             entry: str | None = None) -> LimitExceededError:
    """The error for input over limit ``name`` (``what`` says what was found)."""
    value = getattr(current(), name)
    return LimitExceededError(
        f"{what}: over the limit {name}={value:,}", path=path, entry=entry,
        hint=f"refused as possibly hostile; if you trust the file raise it with {Limits.env(name)}=N")


def check_json(text: str | bytes, *, path: str | None = None, what: str = "JSON") -> None:
    """Refuse JSON nested deeper than ``json_depth`` before a recursive parser sees it."""
    lim = current().json_depth
    data = text if isinstance(text, str) else text.decode("utf-8", "replace")
    if data.count("[") + data.count("{") <= lim:
        return  # cannot nest deeper than the number of openers
    depth = 0
    for m in _JSON_TOKENS.finditer(data):  # strings as whole tokens, so brackets in them skip
        ch = m.group()
        if ch in "[{":
            depth += 1
            if depth > lim:
                raise exceeded("json_depth", f"{what} nests deeper than {lim} levels", path=path)
        elif ch in "]}":
            depth -= 1


def loads_json(text: str | bytes, *, path: str | None = None, what: str = "JSON") -> Any:
    """``json.loads`` of file content, with the depth refused first (``json.loads`` recurses, so
    deep nesting would otherwise end in a RecursionError)."""
    check_json(text, path=path, what=what)
    return json.loads(text)


def read_json_file(path: str, *, max_bytes: int, what: str) -> Any | None:
    """The document of a small JSON file a format is recognised by; None when the file is
    absent, larger than ``max_bytes`` or not JSON (then it is not that format). Nesting over the
    limit raises :class:`LimitExceededError`: a clear refusal, not a wrong guess."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > max_bytes:
            return None
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
        return loads_json(raw, path=path, what=what)
    except (OSError, ValueError):
        return None


_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


__all__ = ["Limits", "current", "exceeded", "check_json", "loads_json", "read_json_file"]
