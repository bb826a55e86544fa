"""Storage back ends: the local file system (atomic writes, fsync, a writer lock) and fsspec
URLs, behind one small interface. No policy here."""
from __future__ import annotations

import abc
import contextlib
import errno
import os
import shutil
import threading
import uuid
from typing import IO, Iterable, Iterator

from torchkeep.store.files import TMP_MARK, fsync_dir, tmp_name

# ---------------------------------------------------------------------------------------------
# Storage: where checkpoint files live. A small interface so that the checkpoint layout and the
# manager do not care whether it is a local folder (fsync, rename, flock) or an fsspec URL.

class Storage(abc.ABC):
    """A folder tree addressed by '/'-joined paths relative to nothing (absolute in the backend)."""

    root: str

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") for p in parts if p != "")

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def isdir(self, path: str) -> bool: ...

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names (not paths) in ``path``; empty when it does not exist."""

    @abc.abstractmethod
    def makedirs(self, path: str) -> None: ...

    @abc.abstractmethod
    def open_read(self, path: str) -> IO[bytes]: ...

    def read_bytes(self, path: str) -> bytes:
        with self.open_read(path) as f:
            return f.read()

    @abc.abstractmethod
    def size(self, path: str) -> int: ...

    @abc.abstractmethod
    def write_file(self, path: str, chunks: "Iterable[bytes | memoryview]", *, sync_dir: bool = True) -> None:
        """Write ``path`` all or nothing (temporary sibling, flushed to stable storage, renamed).
        With ``sync_dir=False`` the caller makes the rename durable later with :meth:`sync_dir`."""

    @abc.abstractmethod
    def remove(self, path: str) -> None:
        """Delete a file; a missing file is not an error."""

    @abc.abstractmethod
    def rmtree(self, path: str) -> None:
        """Delete a folder and everything in it; a missing folder is not an error."""

    def sync_dir(self, path: str) -> None:
        """Make renames and creations inside ``path`` durable (a no-op where that is implicit)."""

    def local_path(self, path: str) -> str | None:
        """The OS path of ``path`` when it is on the local filesystem (enables fast reads)."""
        return None

    def lock(self, path: str) -> "contextlib.AbstractContextManager[None]":
        """Exclusive writer lock held while the context is open (advisory; may be a no-op)."""
        return contextlib.nullcontext()


class LocalStorage(Storage):
    """The local filesystem: temporary sibling, fsync, rename, fsync of the folder."""

    def __init__(self, root: str | os.PathLike = "/") -> None:
        self.root = os.path.abspath(os.fspath(root))

    def join(self, *parts: str) -> str:
        return os.path.join(*[p for p in parts if p != ""])

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open_read(self, path: str) -> IO[bytes]:
        return open(path, "rb")

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def write_file(self, path: str, chunks, *, sync_dir: bool = True) -> None:
        tmp = tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                for c in chunks:
                    f.write(c)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if sync_dir:
            fsync_dir(os.path.dirname(path))

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def sync_dir(self, path: str) -> None:
        fsync_dir(path)

    def local_path(self, path: str) -> str | None:
        return path

    @contextlib.contextmanager
    def lock(self, path: str) -> Iterator[None]:
        """A POSIX record lock on ``path`` (released when the process dies, and — unlike flock —
        not inherited by forked children such as DataLoader workers, which may outlive a killed
        trainer), plus a registry so that two writers in one process exclude each other too."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX: no advisory locks
            yield
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        key = os.path.realpath(path)
        with _HELD_GUARD:
            if key in _HELD:
                raise LockedError(path, f"{os.getpid()}, this process")
            _HELD.add(key)
        fd = -1
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                other = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
                raise LockedError(path, other) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            if fd >= 0:
                os.close(fd)  # closing the descriptor releases the lock
            with _HELD_GUARD:
                _HELD.discard(key)


_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()


class LockedError(OSError):
    """Another writer (process or manager) holds the folder's lock."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(f"{path}: held by another writer (pid {holder})")
        self.path = path
        self.holder = holder


OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})


class FsspecStorage(Storage):
    """Any fsspec filesystem (``memory://``, ``s3://``, ...).

    On an object store (S3, GCS, Azure) every upload is written straight to its final name: a
    PUT (or a multipart upload, on completion) makes the whole object appear at once and durably,
    so there is no temporary name, rename or fsync to do (and a "rename" would be a copy).
    Elsewhere: a temporary name, then a move. There is no lock: one writer per folder is the
    caller's promise.
    """

    def __init__(self, url: str) -> None:
        try:
            from fsspec.core import url_to_fs
        except ImportError as e:  # pragma: no cover - exercised only without fsspec
            raise ImportError(f"{url}: URLs need fsspec (pip install fsspec)") from e
        self.fs, root = url_to_fs(url)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.root = root.rstrip("/") or "/"
        self.url = url
        self.object_store = self.protocol in OBJECT_STORES

    def url_of(self, path: str) -> str:
        """``path`` of this filesystem as a URL (``bucket/run/x`` -> ``s3://bucket/run/x``)."""
        return self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path)

    def listdir(self, path: str) -> list[str]:
        try:
            names = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names if n.rstrip("/") != path.rstrip("/")})

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def open_read(self, path: str) -> IO[bytes]:
        return self.fs.open(path, "rb")

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def write_file(self, path: str, chunks, *, sync_dir: bool = True) -> None:
        if self.object_store:   # the object appears whole when the upload completes, or not at all
            f = self.fs.open(path, "wb")
            try:
                for c in chunks:
                    f.write(bytes(c) if isinstance(c, memoryview) else c)
            except BaseException:
                # not close(): that would complete the upload with what was written so far
                with contextlib.suppress(Exception):
                    f.discard()
                    f.closed = True   # discarded: nothing left for close() (or __del__) to upload
                raise
            f.close()
            return
        d, base = path.rsplit("/", 1) if "/" in path else ("", path)
        tmp = f"{d}/{TMP_MARK}{base}.{uuid.uuid4().hex[:8]}" if d else f"{TMP_MARK}{base}"
        try:
            with self.fs.open(tmp, "wb") as f:
                for c in chunks:
                    f.write(bytes(c) if isinstance(c, memoryview) else c)
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp)
            raise

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path)

    def rmtree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


def storage_for(location: str | os.PathLike) -> tuple[Storage, str]:
    """The storage for ``location`` (a folder or a URL) and the root path inside it."""
    loc = os.fspath(location)
    if "://" in loc and not loc.startswith("file://"):
        s: Storage = FsspecStorage(loc)
        return s, s.root
    if loc.startswith("file://"):
        loc = loc[len("file://"):]
    s = LocalStorage(loc)
    return s, s.root


# ---------------------------------------------------------------------------------------------
# Content-addressed blobs: a file named by the sha256 of its bytes is written once and shared by
# every checkpoint that holds the same bytes. Which blobs are alive is the caller's business
# (the manager counts references over committed manifests).


