"""What a CheckpointManager does before its first save into a folder: create it durably, take
the folder's writer lock, collect what a crashed writer left (temporary files, uncommitted
folders, stray copies), and note the identity of the folders it will write into."""
from __future__ import annotations

import logging
from typing import Any, Callable

from torchkeep.errors import StateError
from torchkeep.keep.folderid import FolderIdentity
from torchkeep.keep.retention import CheckpointInfo
from torchkeep.read.formats import native
from torchkeep.store.backends import LockedError, Storage
from torchkeep.store.blobs import BlobStore
from torchkeep.errors import CorruptCheckpointError
from torchkeep.store.commitrecord import COPY_MISSING, commit_state, has_record, repair
from torchkeep.store.copies import BlobGuard
from torchkeep.store.files import is_tmp

log = logging.getLogger(__name__)

LOCK = ".lock"


def take_lock(st: Storage, root: str) -> Any:
    """Create ``root`` (its name made durable) and hold its writer lock; the open context."""
    fresh = not st.isdir(root)
    st.makedirs(root)
    if fresh and "/" in root.rstrip("/"):
        st.sync_dir(root.rstrip("/").rsplit("/", 1)[0] or "/")
    cm = st.lock(st.join(root, LOCK))
    try:
        cm.__enter__()
    except LockedError as e:
        raise StateError(f"another writer holds this folder (pid {e.holder})", entry=None,
                         hint="one CheckpointManager per folder saves at a time; close() the other "
                              "one or use another directory") from None
    return cm


def collect(st: Storage, root: str, blobs: BlobStore, guard: BlobGuard,
            info_of: Callable[[int, str], CheckpointInfo]
            ) -> tuple[dict[int, tuple[CheckpointInfo, dict[str, str] | None]],
                       FolderIdentity | None]:
    """Remove leftovers of crashed writers; (step -> (info, blob refs)) of the committed
    checkpoints, and the identity of root, blobs/, copies/ and the lock file."""
    entries: dict[int, tuple[CheckpointInfo, dict[str, str] | None]] = {}
    for name in st.listdir(root):
        path = st.join(root, name)
        if is_tmp(name):
            st.rmtree(path) if st.isdir(path) else st.remove(path)
            continue
        step = native.parse_step(name)
        if step is None:
            continue
        if not has_record(st, path) or _being_removed(st, path):
            log.info("removing %s: never committed (a save was interrupted)", path)
            st.rmtree(path)
            continue
        _repair_records(st, path)
        entries[step] = (info_of(step, path), native.manifest_blob_refs(st, path))
    for name in blobs.leftovers():
        st.remove(st.join(blobs.folder, name))
    for path in guard.leftovers():
        st.remove(path)
    blobs.forget()
    for d in (blobs.folder, guard.folder):
        st.makedirs(d)
    st.sync_dir(root)
    identity = FolderIdentity.take(st, root,
                                   [root, blobs.folder, guard.folder, st.join(root, LOCK)])
    return entries, identity


def _being_removed(st: Storage, folder: str) -> bool:
    try:
        return commit_state(st, folder).record is None
    except CorruptCheckpointError:
        return False   # both records damaged: kept, and reported as damaged


def _repair_records(st: Storage, folder: str) -> None:
    """A committed folder with one good commit record gets the other one back."""
    try:
        state = commit_state(st, folder)
    except CorruptCheckpointError:
        return  # both damaged: reported as damaged, nothing to repair from
    if state.record is not None and (state.problem or state.note == COPY_MISSING):
        try:
            repair(st, folder, state)
        except OSError as e:
            log.warning("%s: could not rewrite its commit records (%s)", folder, e)


__all__ = ["LOCK", "take_lock", "collect"]
