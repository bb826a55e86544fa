"""Reading one tensor's blob file of the native format, checked against its checksum, and
falling back to the blob's second copy (``copies/<sha256>.safetensors``, see
:mod:`torchkeep.store.copies`) when the first is missing, damaged or unreadable.

Reads run in pieces that stay in the CPU cache and are checksummed while hot; xxh3 and file
reads release the GIL, so :func:`~torchkeep.formats.native.load_tensors` overlaps them on threads.
"""
from __future__ import annotations

import logging
import mmap
import os
from typing import Any, Mapping

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.store import typedjson as serial
from torchkeep.store.backends import Storage
from torchkeep.store.checksums import Hasher, algo_of, entry_token, tensor_bytes, token_of
from torchkeep.store.layout import BLOB_DIR, COPY_DIR, _check_entry, read_st_header

log = logging.getLogger(__name__)

READ_CHUNK = 4 << 20


def copy_path(storage: Storage, blob_path: str) -> str:
    """Where the second copy of the blob at ``blob_path`` lives (a sibling folder of blobs/)."""
    d, name = blob_path.rstrip("/").rsplit("/", 1) if "/" in blob_path else (".", blob_path)
    parent = d.rsplit("/", 1)[0] if "/" in d else "."
    return storage.join(parent, COPY_DIR, name)


def unreadable(e: OSError, path: str, key: str | None = None) -> CorruptCheckpointError:
    """An OSError while reading (permission, I/O error...) as a problem to fall back on."""
    if isinstance(e, FileNotFoundError):
        return CorruptCheckpointError("file is missing", path=path, entry=key)
    return CorruptCheckpointError(f"unreadable: {e.strerror or e}", path=path, entry=key,
                                  hint="check the file's permissions and the disk")


def mismatch(want: str, got: str, path: str, key: str | None) -> CorruptCheckpointError:
    algo = algo_of(want)
    return CorruptCheckpointError(f"{algo} mismatch (stored {want.split(':', 1)[1]}, read "
                                  f"{got.split(':', 1)[1]})", path=path, entry=key,
                                  hint="the file was damaged on disk")


def _fill(f: Any, buf: memoryview, path: str, key: str, hasher: Hasher | None) -> None:
    """Fill ``buf`` from ``f``, feeding ``hasher`` while each piece is cache-hot."""
    done = 0
    while done < len(buf):
        piece = buf[done:done + READ_CHUNK]
        n = f.readinto(piece)
        if not n:
            raise CorruptCheckpointError(f"expected {len(buf)} bytes, the file ends after {done}",
                                         path=path, entry=key, hint="file truncated?")
        if hasher is not None:
            hasher.update(piece[:n])
        done += n


def _want(info: Mapping[str, Any], path: str, key: str) -> str:
    want = entry_token(info)
    if want is None:
        raise CorruptCheckpointError("the manifest entry has no checksum", path=path, entry=key)
    return want


def load_blob(storage: Storage, path: str, key: str, info: Mapping[str, Any],
              verify: bool) -> torch.Tensor:
    """Read one blob file into a new tensor, checked (no fallback)."""
    dtype = serial.dtype_from_name(info["dtype"])
    want = _want(info, path, key) if verify else None
    try:
        with storage.open_read(path) as f:
            st, start = read_st_header(f, path)
            begin, _ = _check_entry(st, "data", info, path)
            if begin:
                f.seek(start + begin)
            t = torch.empty(info["shape"], dtype=dtype)
            hasher = Hasher(algo_of(want)) if want else None
            _fill(f, tensor_bytes(t), path, key, hasher)
    except OSError as e:
        raise unreadable(e, path, key) from None
    if hasher is not None and (got := hasher.token()) != want:
        raise mismatch(want, got, path, key)  # type: ignore[arg-type]
    return t


def map_blob(storage: Storage, path: str, key: str, info: Mapping[str, Any],
             verify: bool) -> torch.Tensor:
    """A private (copy-on-write) memory map of one local blob file, checked in place."""
    dtype = serial.dtype_from_name(info["dtype"])
    want = _want(info, path, key) if verify else None
    try:
        with open(storage.local_path(path), "rb") as f:  # type: ignore[arg-type]
            st, start = read_st_header(f, path)
            begin, end = _check_entry(st, "data", info, path)
            size = os.fstat(f.fileno()).st_size
            if start + end > size:
                raise CorruptCheckpointError(
                    f"tensor ends at byte {start + end}, the file has {size}",
                    path=path, entry=key, hint="file truncated?")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise unreadable(e, path, key) from None
    if want is not None:
        view = memoryview(mm)[start + begin:start + end]
        try:
            got = token_of(view, algo_of(want), chunk=READ_CHUNK)
        finally:
            view.release()
        if got != want:
            mm.close()
            raise mismatch(want, got, path, key)
    numel = (end - begin) // dtype.itemsize
    t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=start + begin)  # keeps mm alive
    return t.reshape(info["shape"])


def read_blob(storage: Storage, path: str, key: str, info: Mapping[str, Any], verify: bool,
              mapped: bool = False) -> torch.Tensor:
    """One blob tensor, from its second copy (with a warning) when the first fails."""
    read = map_blob if mapped and storage.local_path(path) else load_blob
    try:
        return read(storage, path, key, info, verify)
    except CorruptCheckpointError as e:
        first = e
    cp = copy_path(storage, path)
    if not storage.exists(cp):
        raise first
    try:
        t = read(storage, cp, key, info, True)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{first.detail}; its second copy: {e.detail}",
                                     path=path, entry=key, hint="damaged on disk") from None
    log.warning("%s: %s; read its second copy %s instead (the next save that keeps this tensor "
                "repairs the first)", path, first.detail, cp)
    return t


def blob_problem(storage: Storage, path: str, key: str, info: Mapping[str, Any]) -> str | None:
    """None when the blob of ``key`` reads back intact; else what is wrong (and whether its
    second copy still holds the bytes)."""
    cp = copy_path(storage, path)
    try:
        load_blob(storage, path, key, info, True)
    except CorruptCheckpointError as e:
        first = e.detail
    else:
        if not storage.exists(cp):
            if info.get("copies") == 2:
                return (f"its second copy {cp} is missing (the first is intact; the next save "
                        f"that keeps this tensor rewrites the copy)")
            return None
        try:
            load_blob(storage, cp, key, info, True)
            return None
        except CorruptCheckpointError as e:
            return f"its second copy {cp}: {e.detail} (the first is intact; the next save that " \
                   f"keeps this tensor rewrites the copy)"
    if storage.exists(cp):
        try:
            load_blob(storage, cp, key, info, True)
            return f"{first}; its second copy is intact (still restorable)"
        except CorruptCheckpointError as e:
            return f"{first}; its second copy: {e.detail}"
    return first


__all__ = ["COPY_DIR", "READ_CHUNK", "copy_path", "unreadable", "mismatch", "load_blob",
           "map_blob", "read_blob", "blob_problem", "BLOB_DIR"]
