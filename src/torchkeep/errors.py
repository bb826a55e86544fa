"""The exception hierarchy: one root, subclasses a caller can catch by meaning.

Messages name the file, the entry, what was expected and what was found, and what to do.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence


class TorchkeepError(Exception):
    """Root of every error torchkeep raises on purpose."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 entry: str | None = None, hint: str | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.entry = entry
        self.hint = hint
        self.detail = message
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        if self.entry:
            parts.append(f"entry '{self.entry}': ")
        parts.append(self.detail)
        if self.hint:
            parts.append(f" ({self.hint})")
        return "".join(parts)


class FormatError(TorchkeepError):
    """Not a checkpoint torchkeep can read, or malformed."""


class LimitExceededError(FormatError):
    """The input is larger or deeper than a safety limit allows (see ``torchkeep.limits``)."""


class CorruptCheckpointError(TorchkeepError):
    """Truncated file, checksum mismatch, missing shard or commit record."""


class UnsafeCheckpointError(TorchkeepError):
    """Loading the asked-for objects would need code execution (imports of non-allowlisted globals)."""

    def __init__(self, message: str, *, globals: Sequence[str] = (), path=None, entry=None,
                 hint: str | None = None) -> None:
        self.globals = list(globals)
        if hint is None:
            hint = "pass trust=True (CLI: --trust) only if you trust where this file came from"
        super().__init__(message, path=path, entry=entry, hint=hint)


class TransferError(TorchkeepError):
    """A transfer plan that cannot be applied (strict mode, bad rules, bad source)."""


class StateError(TorchkeepError):
    """Some part of a training state cannot be captured or restored."""


class SaveError(StateError):
    """A checkpoint save that failed: names the step, the file and the cause (``__cause__``)."""

    def __init__(self, message: str, *, step: int, path: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)  # the message names the file already
        self.path = path
        self.step = step


class SurgeryError(TorchkeepError):
    """A module path that does not exist, or an edit that cannot be made."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to ``name``, for 'did you mean' hints."""
    import difflib

    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.4)
