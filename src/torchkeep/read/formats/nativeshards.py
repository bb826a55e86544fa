"""The rank-sharded part of a torchkeep checkpoint: a ``torch.distributed.checkpoint`` folder
inside a native checkpoint folder, with a checksum for each of its files in the manifest.

::

    step-00000100/
      shards/.metadata              DCP's index of every shard (written last by DCP itself)
      shards/__0_0.distcp ...       one data file per rank (its own shards of DTensors)
      tensors.safetensors, ../blobs tensors that every rank holds alike (written once, by rank 0)
      manifest.json                 a native manifest; tensors stored in ``shards`` are listed with
                                    ``"dcp": <name in the DCP folder>`` instead of a file and a crc32,
                                    and ``"distributed": {"world_size", "shards", "files"}`` holds
                                    the xxh3-128 (sha256 in older checkpoints) and size of every
                                    file of ``shards``
      commit.json                   written by rank 0 after every rank finished

This module knows bytes, not ranks: it reads such tensors whole (through the safe
:class:`~torchkeep.read.formats.dcp.DCPReader`, whatever the number of ranks that wrote them) and
checks the files against their checksums. Writing is :mod:`torchkeep.keep.sharded.checkpointing`'s job.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Any, Iterable, Mapping, Sequence

import torch

from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.read.formats.base import TensorRef
from torchkeep.store import typedjson as serial
from torchkeep.store.backends import Storage
from torchkeep.store.checksums import file_record, record_algo, record_mismatch

SHARDS = "shards"          # the DCP folder inside a checkpoint folder
KEY = "dcp"                # manifest entry field: the tensor's name inside the DCP folder
SECTION = "distributed"    # manifest (and commit record) section of a checkpoint written by ranks


def section(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``distributed`` section ({} for a single-process checkpoint)."""
    sec = manifest.get(SECTION)
    return sec if isinstance(sec, dict) else {}


def is_shard_entry(entry: Mapping[str, Any]) -> bool:
    return isinstance(entry, Mapping) and isinstance(entry.get(KEY), str)


def shard_keys(manifest: Mapping[str, Any]) -> list[str]:
    """Keys of the manifest's tensors whose bytes are in the DCP folder."""
    return [k for k, e in manifest.get("tensors", {}).items() if is_shard_entry(e)]


def _local_folder(storage: Storage, folder: str) -> str:
    local = storage.local_path(folder)
    if local is None:
        raise FormatError("rank-sharded checkpoints are read from a local or mounted folder only",
                          path=folder, hint="copy the checkpoint folder to local disk first")
    return local


def file_digest(path: str, chunk: int = 8 << 20, storage: Storage | None = None,
                algo: str = "xxh3_128") -> dict[str, Any]:
    """``{algo: digest, 'size': n}`` of a file (xxh3-128 for new records; sha256 to check older
    ones), local or, with ``storage``, in that storage (an object store)."""
    with (open(path, "rb") if storage is None else storage.open_read(path)) as f:
        return file_record(f, algo, chunk)


def location(storage: Storage, path: str) -> str:
    """Where DCP reads or writes ``path``: a local path, or a URL for fsspec (DCP's Fsspec
    writer and reader)."""
    local = storage.local_path(path)
    if local is not None:
        return local
    url_of = getattr(storage, "url_of", None)
    if url_of is None:
        raise FormatError("rank-sharded checkpoints need a local folder or an fsspec URL", path=path)
    return url_of(path)


def load(storage: Storage, folder: str, manifest: Mapping[str, Any], keys: Iterable[str]
         ) -> dict[str, torch.Tensor]:
    """Whole CPU tensors for ``keys`` (shard entries of the manifest), assembled from every rank's
    chunks; dtype and shape are checked against the manifest. Bytes are not checksummed here
    (DCP stores no per-tensor checksum): :func:`verify` checks the files."""
    keys = list(keys)
    if not keys:
        return {}
    table = manifest.get("tensors", {})
    shards = os.path.join(_local_folder(storage, folder), section(manifest).get("shards", SHARDS))
    reader = _reader(shards)
    refs = []
    for k in keys:
        e = table.get(k)
        if not is_shard_entry(e):
            raise CorruptCheckpointError("not a tensor of the sharded part", path=folder, entry=k)
        refs.append(TensorRef(shape=tuple(e["shape"]), dtype=serial.dtype_from_name(e["dtype"]),
                              reader=reader, key=e[KEY], storage=e[KEY]))
    meta = reader._meta()
    for k, r in zip(keys, refs):
        tm = meta.get(r.key)
        if tm is None:
            raise CorruptCheckpointError(f"the DCP folder has no tensor {r.key!r}", path=shards,
                                         entry=k, hint="the shards do not belong to this manifest")
        if tuple(tm.shape) != r.shape or tm.dtype != r.dtype:
            raise CorruptCheckpointError(
                f"the DCP folder holds {serial.dtype_name(tm.dtype)} {list(tm.shape)}, the manifest "
                f"says {serial.dtype_name(r.dtype)} {list(r.shape)}", path=shards, entry=k)
    return dict(zip(keys, reader.load(refs)))


_READERS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_READERS_LOCK = threading.Lock()


def _reader(shards: str) -> Any:
    """A DCPReader for ``shards``, reused while its .metadata is unchanged (callers often read
    one tensor at a time; each new reader parses .metadata again)."""
    from torchkeep.read.formats.dcp import METADATA, DCPReader

    try:
        st = os.stat(os.path.join(shards, METADATA))
        key: tuple = (shards, st.st_mtime_ns, st.st_size, st.st_ino)
    except FileNotFoundError:
        return DCPReader(shards)  # reports the missing .metadata when used
    with _READERS_LOCK:
        r = _READERS.get(key)
        if r is None:
            r = _READERS[key] = DCPReader(shards)
            while len(_READERS) > 4:
                _READERS.popitem(last=False)
        return r


def verify(storage: Storage, folder: str, manifest: Mapping[str, Any],
           files: Sequence[str] | None = None) -> list[Any]:
    """Problems (:class:`~torchkeep.store.layout.Problem`) with the DCP files of a checkpoint:
    missing, of another size, or another checksum than the manifest records. ``files`` limits the
    check to some of them (each rank checks its share on restore)."""
    from torchkeep.store.layout import Problem

    sec = section(manifest)
    listed: Mapping[str, Any] = sec.get("files") or {}
    if shard_keys(manifest) and not listed:
        return [Problem(folder, "the manifest lists sharded tensors but no shard files")]
    if not listed:
        return []
    local = storage.local_path(folder)
    problems = []
    for rel in (sorted(listed) if files is None else files):
        want = listed.get(rel)
        path = os.path.join(local, rel) if local is not None else storage.join(folder, rel)
        if not isinstance(want, Mapping) or _outside(rel):
            problems.append(Problem(folder, f"bad shard file record {rel!r}"))
            continue
        algo = record_algo(want)
        if algo is None:
            problems.append(Problem(folder, f"shard file record {rel!r} holds no checksum"))
            continue
        try:
            got = file_digest(path, storage=None if local is not None else storage, algo=algo)
        except FileNotFoundError:
            problems.append(Problem(path, "shard file is missing", None))
            continue
        bad = record_mismatch(got, want)
        if bad:
            problems.append(Problem(path, bad))
    return problems


def _outside(rel: str) -> bool:
    parts = rel.replace("\\", "/").split("/")
    return os.path.isabs(rel) or ".." in parts or not rel


def files(storage: Storage, folder: str, manifest: Mapping[str, Any]) -> list[str]:
    """Paths of the DCP files a checkpoint's manifest lists."""
    base = storage.local_path(folder) or folder
    return [os.path.join(base, rel) for rel in sorted(section(manifest).get("files") or {})]


__all__ = ["SHARDS", "KEY", "SECTION", "section", "is_shard_entry", "shard_keys", "file_digest", "location",
           "load", "verify", "files"]
