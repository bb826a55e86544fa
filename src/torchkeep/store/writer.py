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
from torchkeep.store.checksums import (ALGO, algo_of, content_name, entry_fields, tensor_bytes,
                                       token_of)
from torchkeep.store.commitrecord import commit, uncommit
from torchkeep.store.copies import BlobGuard
from torchkeep.store.layout import (BLOB_DIR, BLOB_MIN_BYTES, COPY_DIR, FORMAT, IO_THREADS,
                                    MANIFEST, PACK, VERSION, st_header)


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
    blobs: dict[str, str]      # digest -> checksum token of every blob the manifest refers to
    nbytes: int                # bytes of all tensors in the checkpoint
    written: int               # bytes actually written (new blobs, the pack, the manifest)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> manifest entry


class NativeWriter:
    """Writes one checkpoint folder of the native format: new blobs, the pack, the manifest.

    Large tensors are hashed (xxh3-128 of their safetensors file names the blob, xxh3-64 of the
    bytes checks them, both in one pass) and written only if no kept
    checkpoint holds the same bytes (``known``: digest -> checksum token). Hashing, checksums
    and writes run on a few threads so that hashing one tensor overlaps writing another. Every
    file is durable (fsynced, renamed, folders synced) when ``write`` returns; the commit is left
    to :func:`commit`. A kept blob is referenced again only through :meth:`BlobGuard.reuse`
    (evidence that both of its files are intact; a second copy once it is shared).

    ``hints`` (key -> (digest, token)) name tensors the caller believes unchanged since a kept
    checkpoint (same storage, same version counter). For those, xxh3-64 alone
    decides: equal -> the kept blob is reused without hashing; else the tensor is hashed like
    any other. A wrong belief costs nothing; only a tensor changed behind torch's version
    counter *and* colliding in xxh3-64 (2**-64) would be missed.
    """

    def __init__(self, storage: Storage, blobs: BlobStore, *, threads: int = IO_THREADS,
                 blob_min_bytes: int = BLOB_MIN_BYTES) -> None:
        self.storage = storage
        self.blobs = blobs
        self.threads = threads
        self.blob_min_bytes = blob_min_bytes
        self.guard = BlobGuard(storage, blobs)

    def write(self, folder: str, snap: Snapshot, *, known: Mapping[str, str],
              meta: Mapping[str, Any],
              extra_tensors: Mapping[str, Mapping[str, Any]] | None = None,
              hints: Mapping[str, tuple[str, str]] | None = None) -> WriteResult:
        """Write ``snap`` into ``folder`` (blobs, pack, manifest), durably; not committed.

        ``extra_tensors``: manifest entries of tensors whose bytes other writers put in the
        folder (torchkeep.keep.sharded.checkpointing: each rank's shards, see formats/sharded.py).
        """
        st = self.storage
        self._make_folders(folder)
        job = _Job(snap, known, hints or {})
        small = [(k, t) for k, t in snap.tensors.items() if t.nbytes < self.blob_min_bytes]
        large = [(k, t) for k, t in snap.tensors.items() if t.nbytes >= self.blob_min_bytes]
        # Largest first: the long jobs start early and the small ones fill the gaps.
        large.sort(key=lambda kt: -kt[1].nbytes)
        with ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="torchkeep-io") as pool:
            futures = [pool.submit(self._put, job, key, t) for key, t in large]
            pack_future = pool.submit(self._write_pack, folder, small) if small else None
            for f in futures:
                key, e, digest, tok = f.result()
                job.entries[key] = e
                job.refs[digest] = tok
            if pack_future is not None:
                toks, n = pack_future.result()
                job.add_written(n)
                for key, t in small:
                    job.entries[key] = {**job.entry(key, t, toks[key]), "file": PACK}
        data = _manifest_bytes(job, meta, extra_tensors)
        st.write_file(st.join(folder, MANIFEST), [data], sync_dir=False)
        job.add_written(len(data))
        if large:
            self.blobs.sync()
            self.guard.sync()
        st.sync_dir(folder)
        return WriteResult(folder, hashlib.sha256(data).hexdigest(), job.refs, snap.nbytes,
                           job.written, job.entries)

    def _make_folders(self, folder: str) -> None:
        st = self.storage
        st.makedirs(folder)
        st.makedirs(self.blobs.folder)
        st.makedirs(self.guard.folder)
        # The new folder's name must be durable before anything (rotation) relies on it.
        st.sync_dir(folder.rstrip("/").rsplit("/", 1)[0] if "/" in folder.rstrip("/") else ".")

    def _put(self, job: "_Job", key: str, t: torch.Tensor) -> tuple[str, dict[str, Any], str, str]:
        """One large tensor: reuse the kept blob holding its bytes, or write a new blob.
        Returns (key, manifest entry, blob digest, checksum token)."""
        mv = tensor_bytes(t)
        header = st_header([("data", t.dtype, t.shape, len(mv))])
        hint = job.hints.get(key)
        if hint is not None:
            h_digest, h_tok = hint
            tok = token_of(mv, algo_of(h_tok))
            if tok == h_tok and job.known.get(h_digest) == tok and self.blobs.has(h_digest):
                if algo_of(tok) != ALGO:
                    tok = token_of(mv)
                return self._reuse(job, key, t, h_digest, tok, h_tok, header, mv)
        digest, tok = content_name(header, mv)
        with job.lock:
            if digest in job.known and self.blobs.has(digest):
                new = None
            elif digest in job.claimed:
                new = False     # another thread of this write holds the same bytes
            else:
                job.claimed.add(digest)
                new = True
        if new is None:
            return self._reuse(job, key, t, digest, tok, job.known[digest], header, mv)
        if new:
            self.blobs.put(digest, (header, mv))
            self.guard.wrote(digest)
            job.add_written(len(header) + len(mv))
        return key, {**job.entry(key, t, tok), "blob": digest}, digest, tok

    def _reuse(self, job: "_Job", key: str, t: torch.Tensor, digest: str, tok: str, old: str,
               header: bytes, mv: memoryview) -> tuple[str, dict[str, Any], str, str]:
        """Refer to the kept blob ``digest`` (through the guard: evidence that both of its files
        are intact, a second copy written when it first becomes shared)."""
        job.add_written(self.guard.reuse(digest, old, (header, mv)))
        # shared from now on: verify expects its second copy
        return key, {**job.entry(key, t, tok), "blob": digest, "copies": 2}, digest, tok

    def _write_pack(self, folder: str, small: list[tuple[str, torch.Tensor]]
                    ) -> tuple[dict[str, str], int]:
        views = [(k, t, tensor_bytes(t)) for k, t in small]
        header = st_header([(k, t.dtype, t.shape, len(mv)) for k, t, mv in views],
                           {"format": FORMAT})
        toks = {k: token_of(mv) for k, _, mv in views}
        self.storage.write_file(self.storage.join(folder, PACK), [header, *(mv for _, _, mv in views)],
                                sync_dir=False)
        return toks, len(header) + sum(len(mv) for _, _, mv in views)


class _Job:
    """What one :meth:`NativeWriter.write` shares between its threads."""

    def __init__(self, snap: Snapshot, known: Mapping[str, str],
                 hints: Mapping[str, tuple[str, str]]) -> None:
        self.snap, self.known, self.hints = snap, known, hints
        self.lock = threading.Lock()
        self.claimed: set[str] = set()           # digests one thread of this write is writing
        self.written = 0
        self.entries: dict[str, dict[str, Any]] = {}
        self.refs: dict[str, str] = {}

    def add_written(self, n: int) -> None:
        if n:
            with self.lock:
                self.written += n

    def entry(self, key: str, t: torch.Tensor, tok: str) -> dict[str, Any]:
        """The manifest entry of ``key`` (dtype, shape, checksum, device), without its file."""
        e = {"dtype": serial.dtype_name(t.dtype), "shape": list(t.shape), **entry_fields(tok)}
        if key in self.snap.devices:
            e["device"] = self.snap.devices[key]
        return e


def _manifest_bytes(job: _Job, meta: Mapping[str, Any],
                    extra_tensors: Mapping[str, Mapping[str, Any]] | None) -> bytes:
    manifest = {
        "format": FORMAT, "version": VERSION, "kind": "training-state",
        **dict(meta),
        "blobs": "../" + BLOB_DIR, "copies": "../" + COPY_DIR,
        "tensors": {**{k: job.entries[k] for k in job.snap.tensors}, **dict(extra_tensors or {})},
        "state": job.snap.tree,
    }
    return json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()


__all__ = ["Snapshot", "WriteResult", "NativeWriter", "commit", "uncommit"]
