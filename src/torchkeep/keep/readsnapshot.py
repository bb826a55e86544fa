"""Reading a manager's folder while a writer saves and rotates in it.

A reader lists committed checkpoints, then reads one; meanwhile rotation may uncommit and delete
it (and its blobs). Such a checkpoint was not damaged, it is gone: readers look again at the
folder (a newer checkpoint has been committed by then) instead of reporting damage. Damage is
only what is still committed and still fails. Every checkpoint skipped is named in a warning
with the reason (damaged, missing, unreadable, not committed).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from torchkeep.errors import CorruptCheckpointError, StateError
from torchkeep.keep.retention import CheckpointInfo
from torchkeep.store.commitrecord import commit_state, has_record

log = logging.getLogger(__name__)

ROUNDS = 8   # look again at most this often when checkpoints vanish under the reader


def still_committed(storage: Any, info: CheckpointInfo) -> bool:
    """True when ``info``'s checkpoint is still the committed one it was when listed (a damaged
    record still counts: damage is not removal)."""
    try:
        rec = commit_state(storage, info.path).record
    except CorruptCheckpointError:
        return has_record(storage, info.path)
    return rec is not None and (info.time is None or rec.get("created") == info.time)


def mark_lost_records(storage: Any, infos: list[CheckpointInfo]) -> None:
    """Folders without commit records that the newest good commit record lists as kept were
    committed: both their records were lost. Mark them damaged (in place), not uncommitted."""
    good = [i for i in infos if i.status == "ok"]
    if not good:
        return
    newest = max(good, key=lambda i: i.step)
    try:
        kept = set((commit_state(storage, newest.path).record or {}).get("kept") or ())
    except CorruptCheckpointError:
        return
    for i in infos:
        if i.status == "uncommitted" and i.step in kept and i.step < newest.step:
            i.status = "damaged"
            i.problems = [f"both commit records are missing, but {newest.name}'s record lists "
                          f"it as kept: they were deleted (its files may still be read by hand)"]


def _warn_skipped(infos: list[CheckpointInfo], newest_ok: int | None) -> None:
    for i in infos:
        if i.status == "damaged":
            log.warning("skipping checkpoint %s: its commit record is damaged (%s)", i.path,
                        "; ".join(i.problems) or "unreadable")
        elif i.status == "uncommitted" and (newest_ok is None or i.step > newest_ok):
            log.warning("skipping %s: not committed (a save in progress or interrupted, or its "
                        "commit records were deleted)", i.path)


def load_newest_good(manager: Any, which: Any, read: Callable[[CheckpointInfo], Any]
                     ) -> tuple[CheckpointInfo, Any] | None:
    """(info, what ``read`` returned) for the first good candidate of ``which`` ('latest',
    'best': falling back to the next good one; a step: that one or an error); None when the
    folder holds no committed checkpoint."""
    every = manager.list(include_uncommitted=True)
    ok = [i.step for i in every if i.status == "ok"]
    _warn_skipped(every, max(ok) if ok else None)
    tried: set[tuple[int, Any]] = set()
    errors: list[tuple[CheckpointInfo, CorruptCheckpointError]] = []
    for _ in range(ROUNDS):
        fresh = [c for c in manager._candidates(which) if (c.step, c.time) not in tried]
        relist = False
        for info in fresh:
            tried.add((info.step, info.time))
            try:
                got = read(info)
            except CorruptCheckpointError as e:
                if not still_committed(manager.storage, info):
                    log.info("%s was removed by rotation while it was read; looking again",
                             info.path)
                    if isinstance(which, int):
                        raise StateError(f"checkpoint of step {which} was removed while it was "
                                         f"read", path=info.path) from None
                    relist = True
                    break
                if isinstance(which, int):
                    raise
                errors.append((info, e))
                log.warning("skipping checkpoint %s: %s; trying an older one", info.path, e)
                continue
            if errors:
                log.warning("resuming from %s instead of the damaged newer checkpoint(s) %s",
                            info.path, ", ".join(i.name for i, _ in errors))
            return info, got
        if not relist:
            break
    if not errors:
        return None
    raise CorruptCheckpointError(f"all {len(errors)} checkpoints are damaged; the newest: "
                                 f"{errors[0][1]}", path=manager.root,
                                 hint="torchkeep verify shows the details")


__all__ = ["ROUNDS", "still_committed", "load_newest_good"]
