"""A manager's folder must stay the folder it locked: if the folder, ``blobs/``, ``copies/`` or the
lock file is deleted, moved or replaced under a running writer, later saves would land in a fresh
empty folder and refer to blobs that are gone. The identity (device and inode) of each is taken
when the writer lock is acquired and checked before every save and before every commit."""
from __future__ import annotations

import os

from torchkeep.errors import StateError
from torchkeep.store.backends import Storage


def _ident(path: str) -> tuple[int, int] | None:
    try:
        s = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (s.st_dev, s.st_ino)


class FolderIdentity:
    """(device, inode) of the paths a writer depends on; :meth:`check` raises if any changed."""

    def __init__(self, root: str, paths: list[str]) -> None:
        self.root = root
        self.paths = paths
        self.ids = {p: _ident(p) for p in paths}
        missing = [p for p, i in self.ids.items() if i is None]
        if missing:
            raise StateError(f"{', '.join(missing)} vanished while the writer was starting",
                             path=root)

    @classmethod
    def take(cls, storage: Storage, root: str, paths: list[str]) -> "FolderIdentity | None":
        """The identity of local ``paths`` (None for remote storage: nothing to compare)."""
        local = [storage.local_path(p) for p in paths]
        if any(p is None for p in local):
            return None
        return cls(root, local)  # type: ignore[arg-type]

    def check(self, doing: str) -> None:
        for p, want in self.ids.items():
            got = _ident(p)
            if got != want:
                what = "vanished" if got is None else "was replaced by another one"
                raise StateError(
                    f"{p} {what} while this CheckpointManager was using it; refusing to {doing} "
                    f"into a new, empty folder (the checkpoints it held would not be there)",
                    path=self.root, hint="restore the folder, or start a new CheckpointManager "
                                         "(in a new directory) to keep saving")


__all__ = ["FolderIdentity"]
