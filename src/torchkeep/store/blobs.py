"""Content-addressed blobs: files named by a digest of their bytes (xxh3-128; sha256 for blobs
written before), shared by checkpoints."""
from __future__ import annotations

import threading
from typing import Iterable

from torchkeep.store.backends import Storage
from torchkeep.store.files import is_tmp

BLOB_SUFFIX = ".safetensors"


class BlobStore:
    """Files named by the sha256 of their content in one folder of a :class:`Storage`."""

    def __init__(self, storage: Storage, folder: str) -> None:
        self.storage = storage
        self.folder = folder
        self._known: set[str] | None = None
        self._lock = threading.Lock()

    def path(self, digest: str) -> str:
        return self.storage.join(self.folder, digest + BLOB_SUFFIX)

    def names(self) -> set[str]:
        """Digests of the blobs present (listed once, then tracked as blobs come and go)."""
        with self._lock:
            if self._known is None:
                self._known = {n[:-len(BLOB_SUFFIX)] for n in self.storage.listdir(self.folder)
                               if n.endswith(BLOB_SUFFIX) and not is_tmp(n)}
            return set(self._known)

    def has(self, digest: str) -> bool:
        if self._known is None:
            self.names()
        return digest in self._known  # type: ignore[operator]

    def put(self, digest: str, chunks: "Iterable[bytes | memoryview]") -> None:
        """Store ``chunks`` under ``digest`` (durable file, folder sync left to :meth:`sync`)."""
        self.storage.write_file(self.path(digest), chunks, sync_dir=False)
        with self._lock:
            if self._known is None:
                self._known = set()
            self._known.add(digest)

    def sync(self) -> None:
        self.storage.sync_dir(self.folder)

    def delete(self, digest: str) -> None:
        self.storage.remove(self.path(digest))
        with self._lock:
            if self._known is not None:
                self._known.discard(digest)

    def leftovers(self) -> list[str]:
        """Temporary files of interrupted writes (safe to delete when no writer is running)."""
        return [n for n in self.storage.listdir(self.folder) if is_tmp(n)]

    def forget(self) -> None:
        """Drop the cached listing (another process may have changed the folder)."""
        with self._lock:
            self._known = None
