"""Writing the native format: :class:`NativeWriter` writes one folder's blobs, small-tensor pack
and manifest (durably, not yet committed); :func:`commit` then makes the checkpoint exist and
:func:`uncommit` unmakes it first when a checkpoint is deleted. Split from the reader so that
other writers (one rank of a distributed save) can take part in a folder.
"""
from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from torchkeep.store import typedjson as serial
from torchkeep.store.backends import Storage
from torchkeep.store.blobs import BlobStore
from torchkeep.store.checksums import crc32, sha256_parts, tensor_bytes
from torchkeep.store.layout import (BLOB_DIR, BLOB_MIN_BYTES, COMMIT, FORMAT, IO_THREADS, MANIFEST,
                                    PACK, VERSION, st_header)


@dataclass
class Snapshot:
    """One checkpoint's content, frozen: the typed-JSON tree and the tensors it refers to.

    The tensors are contiguous CPU tensors that nobody changes until the write is done (copies
    for an asynchronous save; the live tensors for a synchronous one).
    """

    tree: Any
    tensors: dict[str, torch.Tensor]
    devices: dict[str, str] = field(default_factory=dict)   # key -> device it was captured on
    nbytes: int = 0

    def __post_init__(self) -> None:
        if not self.nbytes:
            self.nbytes = sum(t.nbytes for t in self.tensors.values())


@dataclass
class WriteResult:
    """What :meth:`NativeWriter.write` left in a folder (not committed yet)."""

    folder: str
    manifest_sha256: str
    blobs: dict[str, int]      # digest -> crc32 of every blob the manifest refers to
    nbytes: int                # bytes of all tensors in the checkpoint
    written: int               # bytes actually written (new blobs, the pack, the manifest)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> manifest entry


class NativeWriter:
    """Writes one checkpoint folder of the native format: new blobs, the pack, the manifest.

    Large tensors are hashed (sha256 of their safetensors file) and written only if no kept
    checkpoint holds the same bytes (``known``: digest -> crc32). Hashing, crc32 and writes run
    on a few threads so that hashing one tensor overlaps writing another. Every file is durable
    (fsynced, renamed, folders synced) when ``write`` returns; the commit is left to :func:`commit`.

    ``hints`` (key -> (digest, crc32)) name tensors the caller believes unchanged since a kept
    checkpoint (same storage, same version counter). For those, crc32 (about 2.5x faster than
    sha256) decides: equal -> the kept blob is reused without hashing; else the tensor is
    hashed like any other. A wrong belief costs nothing; only a tensor changed behind torch's
    version counter *and* colliding in crc32 (2**-32) would be missed.
    """

    def __init__(self, storage: Storage, blobs: BlobStore, *, threads: int = IO_THREADS,
                 blob_min_bytes: int = BLOB_MIN_BYTES) -> None:
        self.storage = storage
        self.blobs = blobs
        self.threads = threads
        self.blob_min_bytes = blob_min_bytes

    def write(self, folder: str, snap: Snapshot, *, known: Mapping[str, int],
              meta: Mapping[str, Any],
              extra_tensors: Mapping[str, Mapping[str, Any]] | None = None,
              hints: Mapping[str, tuple[str, int]] | None = None) -> WriteResult:
        # ``extra_tensors``: manifest entries of tensors whose bytes other writers put in the
        # folder (torchkeep.keep.sharded.checkpointing: each rank's shards, see formats/sharded.py).
        st = self.storage
        st.makedirs(folder)
        st.makedirs(self.blobs.folder)
        small = [(k, t) for k, t in snap.tensors.items() if t.nbytes < self.blob_min_bytes]
        large = [(k, t) for k, t in snap.tensors.items() if t.nbytes >= self.blob_min_bytes]
        lock = threading.Lock()
        claimed: set[str] = set()
        written = [0]
        entries: dict[str, dict[str, Any]] = {}
        refs: dict[str, int] = {}

        def info(key: str, t: torch.Tensor, crc: int) -> dict[str, Any]:
            e = {"dtype": serial.dtype_name(t.dtype), "shape": list(t.shape), "crc32": crc}
            if key in snap.devices:
                e["device"] = snap.devices[key]
            return e

        def put(item: tuple[str, torch.Tensor]) -> tuple[str, dict[str, Any], str, int]:
            key, t = item
            mv = tensor_bytes(t)
            crc = None
            hint = hints.get(key) if hints else None
            if hint is not None:
                crc = crc32(mv)
                h_digest, h_crc = hint
                if crc == h_crc and known.get(h_digest) == crc and self.blobs.has(h_digest):
                    e = info(key, t, crc)
                    e["blob"] = h_digest
                    return key, e, h_digest, crc
            header = st_header([("data", t.dtype, t.shape, len(mv))])
            digest = sha256_parts((header, mv))
            with lock:
                if digest in known and self.blobs.has(digest):
                    crc, new = known[digest], False
                elif digest in claimed:
                    new = False
                else:
                    claimed.add(digest)
                    new = True
            if crc is None:
                crc = crc32(mv)
            if new:
                self.blobs.put(digest, (header, mv))
                with lock:
                    written[0] += len(header) + len(mv)
            e = info(key, t, crc)
            e["blob"] = digest
            return key, e, digest, crc

        # Largest first: the long jobs start early and the small ones fill the gaps.
        large.sort(key=lambda kt: -kt[1].nbytes)
        with ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="torchkeep-io") as pool:
            futures = [pool.submit(put, item) for item in large]
            pack_future = pool.submit(self._write_pack, folder, small) if small else None
            for f in futures:
                key, e, digest, crc = f.result()
                entries[key] = e
                refs[digest] = crc
            if pack_future is not None:
                crcs, n = pack_future.result()
                written[0] += n
                for key, t in small:
                    e = info(key, t, crcs[key])
                    e["file"] = PACK
                    entries[key] = e
        manifest = {
            "format": FORMAT, "version": VERSION, "kind": "training-state",
            **{k: v for k, v in meta.items()},
            "blobs": "../" + BLOB_DIR,
            "tensors": {**{k: entries[k] for k in snap.tensors}, **dict(extra_tensors or {})},
            "state": snap.tree,
        }
        data = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
        st.write_file(st.join(folder, MANIFEST), [data], sync_dir=False)
        written[0] += len(data)
        if large:
            self.blobs.sync()
        st.sync_dir(folder)
        return WriteResult(folder, hashlib.sha256(data).hexdigest(), refs, snap.nbytes, written[0],
                           entries)

    def _write_pack(self, folder: str, small: list[tuple[str, torch.Tensor]]) -> tuple[dict[str, int], int]:
        views = [(k, t, tensor_bytes(t)) for k, t in small]
        header = st_header([(k, t.dtype, t.shape, len(mv)) for k, t, mv in views],
                           {"format": FORMAT})
        crcs = {k: crc32(mv) for k, _, mv in views}
        self.storage.write_file(self.storage.join(folder, PACK), [header, *(mv for _, _, mv in views)],
                                sync_dir=False)
        return crcs, len(header) + sum(len(mv) for _, _, mv in views)


def commit(storage: Storage, folder: str, record: Mapping[str, Any]) -> None:
    """Write the commit record of ``folder``, last: from now on the checkpoint exists."""
    data = json.dumps({"format": FORMAT, "version": VERSION, **record}, separators=(",", ":"),
                      allow_nan=False).encode()
    storage.write_file(storage.join(folder, COMMIT), [data], sync_dir=True)


def uncommit(storage: Storage, folder: str) -> None:
    """Remove the commit record first (durably), so a crash while deleting leaves no half checkpoint."""
    path = storage.join(folder, COMMIT)
    if storage.exists(path):
        storage.remove(path)
        storage.sync_dir(folder)
