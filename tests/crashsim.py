"""A storage that records every durable-state change a writer makes, and a replay of every crash
image POSIX allows for a prefix of that record (used by test_faults.py and fault_stress.py).

POSIX model: a file's bytes are durable once it was fsynced (every write_file fsyncs the file
before renaming it into place, so a recorded ``put`` carries durable bytes); a directory entry
created, renamed or removed in folder D is durable once D itself was fsynced afterwards. Until
then the crash may or may not have kept it, in any combination: the replay tries none, all,
all-but-one for each, and a few random subsets of the pending entries.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
from typing import Any, Iterator

from torchkeep.store.backends import LocalStorage


class RecordingStorage(LocalStorage):
    """LocalStorage that also appends (op, path, data) to ``ops``. ``skip_fsync`` names folders
    whose fsync is recorded as not happening (a deliberately broken writer, for negative tests)."""

    def __init__(self, root: str = "/", skip_fsync: tuple[str, ...] = ()) -> None:
        super().__init__(root)
        self.ops: list[tuple[str, str, Any]] = []
        self.skip_fsync = {os.path.abspath(p) for p in skip_fsync}

    def mark(self, what: Any) -> None:
        self.ops.append(("mark", "", what))

    def makedirs(self, path: str) -> None:
        missing = []
        p = os.path.abspath(path)
        while not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        super().makedirs(path)
        for m in reversed(missing):
            self.ops.append(("mkdir", m, None))

    def write_file(self, path: str, chunks, *, sync_dir: bool = True) -> None:
        data = b"".join(bytes(c) for c in chunks)
        super().write_file(path, [data], sync_dir=False)
        self.ops.append(("put", os.path.abspath(path), data))
        if sync_dir:
            self.sync_dir(os.path.dirname(path))

    def remove(self, path: str) -> None:
        if os.path.exists(path):
            self.ops.append(("unlink", os.path.abspath(path), None))
        super().remove(path)

    def rmtree(self, path: str) -> None:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path, topdown=False):
                for f in files:
                    self.ops.append(("unlink", os.path.abspath(os.path.join(root, f)), None))
                for d in dirs:
                    self.ops.append(("rmdir", os.path.abspath(os.path.join(root, d)), None))
            self.ops.append(("rmdir", os.path.abspath(path), None))
        super().rmtree(path)

    def sync_dir(self, path: str) -> None:
        super().sync_dir(path)
        if os.path.abspath(path) not in self.skip_fsync:
            self.ops.append(("fsync", os.path.abspath(path), None))


def install(manager: Any, storage: RecordingStorage) -> None:
    """Make ``manager`` (before its first save) write through ``storage``."""
    manager.storage = storage
    manager.blobs.storage = storage
    manager.writer.storage = storage
    manager.writer.guard.storage = storage


def _durable_flags(ops: list, k: int) -> list[bool]:
    """For each op before ``k``: is its directory entry durable at a crash right after op k-1?"""
    last_sync: dict[str, int] = {}
    for i in range(k):
        if ops[i][0] == "fsync":
            last_sync[ops[i][1]] = i
    out = []
    for i in range(k):
        op, path, _ = ops[i]
        if op in ("fsync", "mark"):
            out.append(True)
        else:
            out.append(last_sync.get(os.path.dirname(path), -1) > i)
    return out


def images(ops: list, k: int, base: str, rng: random.Random, randoms: int = 3
           ) -> Iterator[dict[str, Any]]:
    """Crash images (path -> None for a folder, bytes for a file) after the first ``k`` ops."""
    durable = _durable_flags(ops, k)
    pending = [i for i in range(k) if not durable[i]]
    choices = [set(), set(pending)] + [set(pending) - {i} for i in pending]
    choices += [{i for i in pending if rng.random() < 0.5} for _ in range(randoms)]
    for keep in choices:
        fs: dict[str, Any] = {base: None}
        for i in range(k):
            op, path, data = ops[i]
            if not (durable[i] or i in keep) or op in ("fsync", "mark"):
                continue
            parent = os.path.dirname(path)
            if op in ("mkdir", "put") and parent not in fs:
                continue
            if op == "mkdir":
                fs.setdefault(path, None)
            elif op == "put":
                fs[path] = data
            elif op == "unlink":
                fs.pop(path, None)
            elif op == "rmdir":
                for p in [p for p in fs if p == path or p.startswith(path + "/")]:
                    del fs[p]
        yield fs


def signature(fs: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for p in sorted(fs):
        h.update(p.encode() + b"\0" + (b"D" if fs[p] is None else hashlib.sha256(fs[p]).digest()))
    return h.hexdigest()


def materialize(fs: dict[str, Any], src_root: str, dst_root: str) -> None:
    """Write the image under ``dst_root`` (paths under ``src_root`` moved there)."""
    shutil.rmtree(dst_root, ignore_errors=True)
    os.makedirs(dst_root)
    for p in sorted(fs):
        if p != src_root and not p.startswith(src_root + "/"):
            continue
        q = dst_root + p[len(src_root):]
        if fs[p] is None:
            os.makedirs(q, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(q), exist_ok=True)
            with open(q, "wb") as f:
                f.write(fs[p])
