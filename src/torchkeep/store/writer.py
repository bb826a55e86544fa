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
        # ``extra_tensors``: manifest entries of tensors whose bytes other writers put in the
        # folder (torchkeep.keep.sharded.checkpointing: each rank's shards, see formats/sharded.py).
        st = self.storage
        st.makedirs(folder)
        st.makedirs(self.blobs.folder)
        st.makedirs(self.guard.folder)
        # The new folder's name must be durable before anything (rotation) relies on it.
        st.sync_dir(folder.rstrip("/").rsplit("/", 1)[0] if "/" in folder.rstrip("/") else ".")
        small = [(k, t) for k, t in snap.tensors.items() if t.nbytes < self.blob_min_bytes]
        large = [(k, t) for k, t in snap.tensors.items() if t.nbytes >= self.blob_min_bytes]
        lock = threading.Lock()
        claimed: set[str] = set()
        written = [0]
        entries: dict[str, dict[str, Any]] = {}
        refs: dict[str, str] = {}

        def info(key: str, t: torch.Tensor, tok: str) -> dict[str, Any]:
            e = {"dtype": serial.dtype_name(t.dtype), "shape": list(t.shape), **entry_fields(tok)}
            if key in snap.devices:
                e["device"] = snap.devices[key]
            return e

        def reuse(key: str, t: torch.Tensor, digest: str, tok: str, old: str,
                  header: bytes, mv: memoryview) -> tuple[str, dict[str, Any], str, str]:
            n = self.guard.reuse(digest, old, (header, mv))
            if n:
                with lock:
                    written[0] += n
            e = info(key, t, tok)
            e["blob"] = digest
            e["copies"] = 2   # shared from now on: verify expects its second copy
            return key, e, digest, tok

        def put(item: tuple[str, torch.Tensor]) -> tuple[str, dict[str, Any], str, str]:
            key, t = item
            mv = tensor_bytes(t)
            header = st_header([("data", t.dtype, t.shape, len(mv))])
            tok = None
            hint = hints.get(key) if hints else None
            if hint is not None:
                h_digest, h_tok = hint
                tok = token_of(mv, algo_of(h_tok))
                if tok == h_tok and known.get(h_digest) == tok and self.blobs.has(h_digest):
                    if algo_of(tok) != ALGO:
                        tok = token_of(mv)
                    return reuse(key, t, h_digest, tok, h_tok, header, mv)
                if algo_of(tok) != ALGO:
                    tok = None
            digest, tok = content_name(header, mv)
            with lock:
                if digest in known and self.blobs.has(digest):
                    new = None
                elif digest in claimed:
                    new = False
                else:
                    claimed.add(digest)
                    new = True
            if new is None:
                return reuse(key, t, digest, tok, known[digest], header, mv)
            if new:
                self.blobs.put(digest, (header, mv))
                self.guard.wrote(digest)
                with lock:
                    written[0] += len(header) + len(mv)
            e = info(key, t, tok)
            e["blob"] = digest
            return key, e, digest, tok

        # Largest first: the long jobs start early and the small ones fill the gaps.
        large.sort(key=lambda kt: -kt[1].nbytes)
        with ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="torchkeep-io") as pool:
            futures = [pool.submit(put, item) for item in large]
            pack_future = pool.submit(self._write_pack, folder, small) if small else None
            for f in futures:
                key, e, digest, tok = f.result()
                entries[key] = e
                refs[digest] = tok
            if pack_future is not None:
                toks, n = pack_future.result()
                written[0] += n
                for key, t in small:
                    e = info(key, t, toks[key])
                    e["file"] = PACK
                    entries[key] = e
        manifest = {
            "format": FORMAT, "version": VERSION, "kind": "training-state",
            **{k: v for k, v in meta.items()},
            "blobs": "../" + BLOB_DIR, "copies": "../" + COPY_DIR,
            "tensors": {**{k: entries[k] for k in snap.tensors}, **dict(extra_tensors or {})},
            "state": snap.tree,
        }
        data = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
        st.write_file(st.join(folder, MANIFEST), [data], sync_dir=False)
        written[0] += len(data)
        if large:
            self.blobs.sync()
            self.guard.sync()
        st.sync_dir(folder)
        return WriteResult(folder, hashlib.sha256(data).hexdigest(), refs, snap.nbytes, written[0],
                           entries)

    def _write_pack(self, folder: str, small: list[tuple[str, torch.Tensor]]
                    ) -> tuple[dict[str, str], int]:
        views = [(k, t, tensor_bytes(t)) for k, t in small]
        header = st_header([(k, t.dtype, t.shape, len(mv)) for k, t, mv in views],
                           {"format": FORMAT})
        toks = {k: token_of(mv) for k, _, mv in views}
        self.storage.write_file(self.storage.join(folder, PACK), [header, *(mv for _, _, mv in views)],
                                sync_dir=False)
        return toks, len(header) + sum(len(mv) for _, _, mv in views)


__all__ = ["Snapshot", "WriteResult", "NativeWriter", "commit", "uncommit"]
