"""What a failed checkpoint save tells its user: one line naming the step, the file and the
cause, and what was done about it (the partial checkpoint freed at once; how many earlier
checkpoints are intact). Also the process-exit guard: a save that failed in the background and
was never reported is logged at ERROR when the interpreter exits, never dropped silently."""
from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import Any, Callable

from torchkeep.errors import SaveError, StateError, TorchkeepError
from torchkeep.store.files import TMP_MARK

log = logging.getLogger(__name__)


def _target(filename: Any) -> str | None:
    """The file a write was for (the temporary sibling's name mapped back to the target's)."""
    if not filename:
        return None
    path = os.fspath(filename)
    d, base = os.path.split(path)
    if base.startswith(TMP_MARK):
        base = base[len(TMP_MARK):].rsplit(".", 1)[0]
    return os.path.join(d, base)


def _cause(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if isinstance(err, TorchkeepError):
        return err.detail
    return f"{type(err).__name__}: {err}"


def describe(step: int, folder: str, err: BaseException, freed: bool, intact: int) -> SaveError:
    """The SaveError for ``err`` raised while saving ``step`` into ``folder``."""
    path = _target(getattr(err, "filename", None)) or folder
    done = "freed the partial checkpoint" if freed else "could not free the partial checkpoint"
    msg = (f"step {step}: {_cause(err)} while writing {path}: {done}; {intact} earlier "
           f"checkpoint{'s' if intact != 1 else ''} intact")
    out = SaveError(msg, step=step, path=path)
    out.__cause__ = err
    return out


def free_partial(free: Callable[[], None], folder: str) -> bool:
    """Run ``free`` (delete the uncommitted folder and blobs nothing refers to); False if that
    failed too (logged)."""
    try:
        free()
        return True
    except Exception:  # noqa: BLE001 - reported in the SaveError's text and here
        log.error("could not delete the partial checkpoint %s", folder, exc_info=True)
        return False


def is_folder_error(err: BaseException) -> bool:
    """The folder itself is gone or replaced: touch nothing in it."""
    return isinstance(err, StateError) and "refusing to" in err.detail


def guarded(step: int, folder: str, write: Callable[[], None], free: Callable[[], None],
            intact: Callable[[], int]) -> None:
    """Run ``write``; if it fails, ``free`` its partial checkpoint at once and raise the
    SaveError (a vanished folder and interrupts are raised as they are: touch nothing)."""
    try:
        write()
    except BaseException as e:
        if is_folder_error(e) or isinstance(e, KeyboardInterrupt):
            raise
        freed = free_partial(free, folder)
        raise describe(step, folder, e, freed, intact()) from e


_MANAGERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_REGISTERED = threading.Lock()
_registered = False


def watch(manager: Any) -> None:
    """Report ``manager``'s unreported save failure at interpreter exit (its writer thread is
    not a daemon: Python joins it before running exit handlers)."""
    global _registered
    _MANAGERS.add(manager)
    with _REGISTERED:
        if not _registered:
            atexit.register(_at_exit)
            _registered = True


def _at_exit() -> None:
    for m in list(_MANAGERS):
        try:
            m.wait()
        except BaseException as e:  # noqa: BLE001 - the whole point: say it before exiting
            log.error("torchkeep: the last checkpoint save of %s failed and was never reported: %s",
                      getattr(m, "directory", "?"), e)


__all__ = ["describe", "free_partial", "is_folder_error", "guarded", "watch"]
