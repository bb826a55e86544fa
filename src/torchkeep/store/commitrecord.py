"""Commit records of the native format: the file whose existence makes a checkpoint exist.

A record is sealed: its last field, ``record_xxh3``, is the xxh3 of the record's bytes before it,
so a flipped bit in metrics or fingerprints is caught. Each record is written twice, ``commit.json``
then ``commit.copy.json`` (each one atomically, folder fsynced between), and removed in the
reverse order (copy first), so that after any crash the copy exists only beside its original:

* both good: committed;
* ``commit.json`` alone: committed. A crash between the two writes (or removals) leaves this
  too, so it is only a *note* for the newest checkpoint; on an older one (the next commit closed
  that window) it is damage. The writer's next start rewrites the copy either way;
* ``commit.json`` damaged or missing while the copy is good: committed, *damaged* (one file lost
  on disk; the copy still makes the checkpoint restorable, with a warning);
* neither: never committed, or being deleted.

Records written before sealing (no ``record_xxh3``, no copy) are still read.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import xxhash

from torchkeep.errors import CorruptCheckpointError, LimitExceededError
from torchkeep.limits import loads_json
from torchkeep.store.backends import Storage
from torchkeep.store.layout import COMMIT, FORMAT, VERSION

log = logging.getLogger(__name__)

COMMIT_COPY = "commit.copy.json"
SEAL = "record_xxh3"
_SEAL_MARK = b',"' + SEAL.encode() + b'":"'
REMOVING = "removing"      # the copy's field while rotation deletes the checkpoint
COPY_MISSING = (f"{COMMIT_COPY} is missing (deleted, or a crash came between the two commit "
                f"writes); {COMMIT} is good")


def seal(record: Mapping[str, Any]) -> bytes:
    """The bytes of a sealed commit record."""
    body = json.dumps({"format": FORMAT, "version": VERSION, **record}, separators=(",", ":"),
                      allow_nan=False).encode()
    return body[:-1] + _SEAL_MARK + f"{xxhash.xxh3_64_intdigest(body):016x}".encode() + b'"}'


def unseal(data: bytes, path: str) -> tuple[dict[str, Any], bool]:
    """(record, sealed) of a commit record's bytes; raises CorruptCheckpointError when the bytes
    are not a record or do not match their seal."""
    try:
        obj = loads_json(data, path=path, what="the commit record")
    except (UnicodeDecodeError, json.JSONDecodeError, LimitExceededError) as e:
        raise CorruptCheckpointError(f"commit record is not valid JSON: {e}", path=path,
                                     hint="damaged or partially written") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CorruptCheckpointError("commit record is not a torchkeep record", path=path)
    want = obj.pop(SEAL, None)
    if want is None:
        return obj, False
    i = data.rfind(_SEAL_MARK)
    got = f"{xxhash.xxh3_64_intdigest(data[:i] + b'}'):016x}" if i > 0 else "?"
    if got != want:
        raise CorruptCheckpointError(f"commit record checksum is {got}, the record says {want}",
                                     path=path, hint="damaged on disk")
    return obj, True


@dataclass
class CommitState:
    """What a folder's two commit records say."""

    record: dict[str, Any] | None     # the record to use (None: not committed)
    problem: str | None = None        # the checkpoint was committed, but a record is damaged/lost
    note: str | None = None           # harmless: the copy is missing (interrupted write/removal)


def _read_one(storage: Storage, path: str) -> tuple[dict[str, Any] | None, bool, str | None]:
    """(record, sealed, problem) of one record file; (None, False, None) when it does not exist."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return None, False, None
    except OSError as e:
        return None, False, f"unreadable: {e.strerror or e}"
    try:
        rec, sealed = unseal(data, path)
    except CorruptCheckpointError as e:
        return None, False, e.detail
    return rec, sealed, None


def commit_state(storage: Storage, folder: str) -> CommitState:
    """Read both commit records of ``folder`` and say which one counts and what is wrong."""
    p1, p2 = storage.join(folder, COMMIT), storage.join(folder, COMMIT_COPY)
    r1, s1, e1 = _read_one(storage, p1)
    r2, s2, e2 = _read_one(storage, p2)
    if r2 is not None and s2 and r2.get(REMOVING):
        return CommitState(None)   # being deleted by rotation (see uncommit)
    exists2 = r2 is not None or e2 is not None
    if r1 is not None and (s1 or not exists2):
        if e2 is not None:
            return CommitState(r1, problem=f"{COMMIT_COPY}: {e2} ({COMMIT} is good)")
        if r2 is None and s1:
            return CommitState(r1, note=COPY_MISSING)
        if r2 is not None and (not s2 or r2 != r1):
            return CommitState(r1, problem=f"{COMMIT_COPY} differs from {COMMIT} (damaged; "
                                           f"{COMMIT} is good)")
        return CommitState(r1)
    if r1 is not None:  # unsealed although a copy exists: a flipped byte hit the seal's name
        e1 = "commit record has lost its checksum field"
    if r2 is not None and s2:
        what = f"{COMMIT}: {e1}" if e1 else f"{COMMIT} is missing"
        return CommitState(r2, problem=f"{what}; restorable from {COMMIT_COPY}")
    if e1 is None and not exists2:
        return CommitState(None)
    if e1 is None and e2 is not None:  # only a broken copy: the original was removed first
        return CommitState(None, note=f"{COMMIT_COPY} left behind ({e2})")
    raise CorruptCheckpointError(f"{e1 or 'commit record missing'}; its copy: "
                                 f"{e2 or 'missing'}", path=p1, hint="damaged on disk")


def read_commit(storage: Storage, folder: str) -> dict[str, Any] | None:
    """The commit record of ``folder`` (from its copy, with a warning, when the original is
    damaged); None when it was never committed or is being deleted."""
    state = commit_state(storage, folder)
    if state.problem:
        log.warning("%s: %s", folder, state.problem)
    return state.record


def commit(storage: Storage, folder: str, record: Mapping[str, Any]) -> None:
    """Write the commit record of ``folder`` (then its copy), last: from now on the checkpoint
    exists. Each write is durable (fsync, rename, fsync of the folder) before the next."""
    data = seal(record)
    storage.write_file(storage.join(folder, COMMIT), [data], sync_dir=True)
    storage.write_file(storage.join(folder, COMMIT_COPY), [data], sync_dir=True)


def uncommit(storage: Storage, folder: str) -> None:
    """Uncommit ``folder`` before it is deleted, so a crash while deleting leaves no half
    checkpoint that looks whole: the copy is replaced by a sealed *removing* mark, then
    ``commit.json`` and the mark are removed, each step durable before the next. Every state
    in between reads as "not committed", never as a damaged record."""
    p1, p2 = storage.join(folder, COMMIT), storage.join(folder, COMMIT_COPY)
    if not (storage.exists(p1) or storage.exists(p2)):
        log.debug("%s: no commit record to remove", folder)
        return
    storage.write_file(p2, [seal({REMOVING: True})], sync_dir=True)
    for path in (p1, p2):
        storage.remove(path)
        storage.sync_dir(folder)


def repair(storage: Storage, folder: str, state: CommitState) -> None:
    """Rewrite both records of a committed folder from the good one (writer start-up only)."""
    assert state.record is not None
    rec = {k: v for k, v in state.record.items() if k not in ("format", "version")}
    data = seal(rec)
    for name in (COMMIT, COMMIT_COPY):
        storage.write_file(storage.join(folder, name), [data], sync_dir=True)
    log.warning("%s: %s; rewrote both commit records", folder, state.problem or state.note)


def has_record(storage: Storage, folder: str) -> bool:
    """True when either commit record file exists (without reading it)."""
    return any(storage.exists(storage.join(folder, n)) for n in (COMMIT, COMMIT_COPY))


__all__ = ["COMMIT_COPY", "SEAL", "seal", "unseal", "CommitState", "commit_state", "read_commit",
           "commit", "uncommit", "repair", "has_record", "COPY_MISSING"]
