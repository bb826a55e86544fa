"""Atomic files and folders: write under a temporary name, fsync, rename, fsync the folder."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import IO, Iterator

TMP_MARK = ".tmp-"


def fsync_path(path: str) -> None:
    """fsync a file, or a folder (which makes a rename or unlink inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file = fsync_path


def tmp_name(path: str) -> str:
    """A sibling temporary name for ``path``: same folder, so the final rename is atomic."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f"{TMP_MARK}{base}.{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` all or nothing: temp sibling, fsync, rename, fsync the folder.

    If the body raises (or the process dies), ``path`` keeps its previous content.
    """
    path = os.fspath(path)
    tmp = tmp_name(path)
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_tree(path: str) -> None:
    """fsync every file and folder under ``path`` (the folder itself included)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Build a folder under a temporary sibling name and rename it into place when the body
    succeeds; the caller writes into the yielded path. ``path`` must not exist yet."""
    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(path)
    tmp = tmp_name(path)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_tmp(name: str) -> bool:
    """True for names left by an unfinished atomic write (safe to delete, never to read)."""
    return os.path.basename(name).startswith(TMP_MARK)
