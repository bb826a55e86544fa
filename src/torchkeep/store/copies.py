"""Why one damaged file never costs more than one kept checkpoint, deduplication kept.

A blob written by one checkpoint and referenced by the next is *shared*: from that moment, one
bad sector in it would take every checkpoint that refers to it. So, like ZFS ``copies=2`` for
shared data only, the save that first shares a blob writes a second copy of it into
``copies/<sha256>.safetensors`` (once; from the live tensor, whose checksum matched). Readers
use the copy only when the first file is missing, damaged or unreadable.

And a blob is never referenced again without evidence that its files are intact: the first time
a process reuses a blob, and whenever the file's size/mtime/inode differ from what this process
last saw, both files are read back and checked against the checksum. A damaged or missing file
is rewritten from the live tensor (which the new checkpoint holds anyway), with a warning.

Cost: a blob referenced by one checkpoint only (everything that changes between saves) has no
copy; each frozen tensor is written twice in a run instead of once, and read back once per
process. See benchmarks/README.md for the figures.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Iterable

from torchkeep.store.backends import Storage
from torchkeep.store.blobs import BlobStore
from torchkeep.store.checksums import Hasher, algo_of
from torchkeep.store.files import is_tmp
from torchkeep.store.layout import COPY_DIR

log = logging.getLogger(__name__)

READ_CHUNK = 4 << 20


def _stat(storage: Storage, path: str) -> tuple | None:
    """What tells this process that a file is still the one it checked (None if missing)."""
    local = storage.local_path(path)
    try:
        if local is not None:
            s = os.stat(local)
            return (s.st_size, s.st_mtime_ns, s.st_ino, s.st_dev)
        return (storage.size(path),)
    except (FileNotFoundError, NotADirectoryError):
        return None


def file_problem(storage: Storage, path: str, header: bytes, nbytes: int, token: str) -> str | None:
    """None when ``path`` holds ``header`` then ``nbytes`` bytes whose checksum is ``token``."""
    h = Hasher(algo_of(token))
    try:
        with storage.open_read(path) as f:
            if f.read(len(header)) != header:
                return "its header differs from the tensor's"
            done = 0
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
                done += len(chunk)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if done != nbytes:
        return f"holds {done} data bytes, expected {nbytes}"
    if h.token() != token:
        return f"checksum {h.token()} differs from the recorded {token}"
    return None


class BlobGuard:
    """Evidence of intact blob files, second copies of shared blobs, and their repair."""

    def __init__(self, storage: Storage, blobs: BlobStore,
                 copies_folder: str | None = None) -> None:
        self.storage = storage
        self.blobs = blobs
        if copies_folder is None:
            parent = blobs.folder.rstrip("/").rsplit("/", 1)[0] if "/" in blobs.folder else "."
            copies_folder = storage.join(parent, COPY_DIR)
        self.folder = copies_folder
        self._seen: dict[str, tuple] = {}     # path -> stat when this process last knew it good
        self._lock = threading.Lock()
        self._busy: dict[str, threading.Lock] = {}
        self._dirty = False
        self.repaired: list[str] = []         # what the latest saves repaired (for tests, logs)

    def copy_path(self, digest: str) -> str:
        return self.storage.join(self.folder, digest + ".safetensors")

    def wrote(self, digest: str) -> None:
        """The writer just wrote (and fsynced) the blob: that is evidence enough."""
        p = self.blobs.path(digest)
        if (s := _stat(self.storage, p)) is not None:
            with self._lock:
                self._seen[p] = s

    def _digest_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._busy.setdefault(digest, threading.Lock())

    def reuse(self, digest: str, token: str, chunks: tuple[bytes, memoryview]) -> int:
        """Before a new checkpoint refers to the kept blob ``digest`` (whose tensor bytes
        ``chunks`` = (header, data) match ``token``): make sure both copies are intact, repair
        or write what is not. Returns the bytes written."""
        with self._digest_lock(digest):
            header, data = chunks
            written = 0
            for path, is_copy in ((self.blobs.path(digest), False), (self.copy_path(digest), True)):
                s = _stat(self.storage, path)
                with self._lock:
                    known = s is not None and self._seen.get(path) == s
                if known:
                    continue
                problem = "missing" if s is None else file_problem(self.storage, path, header,
                                                                   len(data), token)
                if problem is None:
                    with self._lock:
                        self._seen[path] = s  # type: ignore[assignment]
                    continue
                if not (is_copy and problem == "missing"):
                    log.warning("blob %s: %s; rewritten from the live tensor", path, problem)
                    self.repaired.append(path)
                if is_copy:
                    self.storage.makedirs(self.folder)
                    self.storage.write_file(path, (header, data), sync_dir=False)
                    self._dirty = True
                else:
                    self.blobs.put(digest, (header, data))
                written += len(header) + len(data)
                if (s := _stat(self.storage, path)) is not None:
                    with self._lock:
                        self._seen[path] = s
            return written

    def sync(self) -> None:
        """Make the copies written since the last call durable (fsync of copies/)."""
        if self._dirty:
            self.storage.sync_dir(self.folder)
            self._dirty = False

    def names(self) -> set[str]:
        return {n[:-len(".safetensors")] for n in self.storage.listdir(self.folder)
                if n.endswith(".safetensors") and not is_tmp(n)}

    def delete(self, digests: Iterable[str]) -> None:
        """Remove the copies of blobs no kept checkpoint refers to any more."""
        for d in digests:
            p = self.copy_path(d)
            self.storage.remove(p)
            with self._lock:
                self._seen.pop(p, None)
                self._seen.pop(self.blobs.path(d), None)

    def leftovers(self) -> list[str]:
        return [self.storage.join(self.folder, n) for n in self.storage.listdir(self.folder)
                if is_tmp(n)]


__all__ = ["BlobGuard", "file_problem"]
