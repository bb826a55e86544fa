"""torchkeep's own checkpoint format: a folder per checkpoint, tensors in safetensors, everything
else in typed JSON, a manifest with a checksum per tensor, and a commit record written last.

::

    <root>/                              a CheckpointManager's folder
      blobs/<sha256>.safetensors         one large tensor each, named by the sha256 of the file:
                                         written once, shared by every checkpoint holding the bytes
      step-00000100/
        tensors.safetensors              this checkpoint's small tensors (< 64 KiB each)
        manifest.json                    the state as typed JSON (see torchkeep.serial) and, for
                                         each tensor, dtype, shape, crc32 and where its bytes are
        commit.json                      written last; the checkpoint exists once this does. It
                                         holds the manifest's sha256, the step, time and metrics.

Nothing is pickled unless the state was saved with ``allow_pickle=True``; such values are read
with the restricted unpickler (placeholders, no imports) unless the reader is trusted.

Opening a manager's root folder (rather than one ``step-*`` folder) opens its newest committed
checkpoint; ``metadata['checkpoint']`` names the folder that was chosen. That choice does not
verify tensor bytes; ``CheckpointManager.restore`` does and falls back to older checkpoints.

The write path is split so that other writers (e.g. one rank of a distributed save) can take part:
:class:`NativeWriter` writes the blobs, the small-tensor pack and the manifest of one folder;
:func:`commit` (called once, after every writer finished) makes the checkpoint exist.
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Container, Iterable, Mapping, Sequence

import torch

from .. import serial
from ..errors import CorruptCheckpointError, FormatError, StateError
from ..store import BlobStore, Storage, crc32, is_tmp, sha256_parts, storage_for, tensor_bytes
from .base import Reader, TensorRef

FORMAT = "torchkeep"
VERSION = 1
MANIFEST = "manifest.json"
COMMIT = "commit.json"
PACK = "tensors.safetensors"
BLOB_DIR = "blobs"
STEP_PREFIX = "step-"
BLOB_MIN_BYTES = 64 << 10   # tensors at least this large get their own deduplicated blob
IO_THREADS = 4              # hashing, crc32, writes and reads release the GIL

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
MAX_HEADER = 100 << 20


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint folder name (``step-00000100`` -> 100), None for other names."""
    if not name.startswith(STEP_PREFIX) or is_tmp(name):
        return None
    digits = name[len(STEP_PREFIX):]
    return int(digits) if digits.isdigit() else None


# ----------------------------------------------------------------------------- safetensors bytes

def st_header(items: Sequence[tuple[str, torch.dtype, Sequence[int], int]],
              metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors header (length prefix + JSON padded to 8 bytes) for tensors laid out in order.

    Deterministic for the same items, so a blob's name (the sha256 of header and data) depends
    on dtype, shape and bytes only.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    off = 0
    for name, dtype, shape, n in items:
        if dtype not in _ST_DTYPES:
            raise StateError(f"safetensors cannot hold dtype {dtype}", entry=name)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def _read_exact(f, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptCheckpointError(f"{what}: expected {n} bytes, the file ends after {len(data)}",
                                     path=path, hint="file truncated?")
    return data


def read_st_header(f, path: str) -> tuple[dict[str, Any], int]:
    """The parsed header of a safetensors stream and the offset where its data starts."""
    (n,) = struct.unpack("<Q", _read_exact(f, 8, path, "safetensors length prefix"))
    if n > MAX_HEADER:
        raise CorruptCheckpointError(f"safetensors header claims {n} bytes", path=path,
                                     hint="not a safetensors file, or damaged")
    try:
        header = json.loads(_read_exact(f, n, path, "safetensors header"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"safetensors header is not JSON: {e}", path=path) from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError("safetensors header is not an object", path=path)
    return header, 8 + n


def _check_entry(st: Mapping[str, Any], name: str, info: Mapping[str, Any], path: str) -> tuple[int, int]:
    """Offsets of ``name`` in a safetensors header, checked against the manifest's entry."""
    e = st.get(name)
    if not isinstance(e, dict):
        raise CorruptCheckpointError("tensor missing from its file", path=path, entry=name)
    dtype = serial.dtype_from_name(info["dtype"])
    if _ST_NAMES.get(e.get("dtype")) != dtype or list(e.get("shape", ())) != list(info["shape"]):
        raise CorruptCheckpointError(
            f"file holds {e.get('dtype')} {e.get('shape')}, the manifest says {info['dtype']} {info['shape']}",
            path=path, entry=name)
    begin, end = e["data_offsets"]
    if end - begin != _nbytes(info):
        raise CorruptCheckpointError(f"declares {end - begin} bytes, expected {_nbytes(info)}",
                                     path=path, entry=name)
    return begin, end


def _nbytes(info: Mapping[str, Any]) -> int:
    n = serial.dtype_from_name(info["dtype"]).itemsize
    for s in info["shape"]:
        n *= s
    return n


# ----------------------------------------------------------------------------- writing

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
        # folder (torchkeep.distributed: each rank's shards, see formats/sharded.py).
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


# ----------------------------------------------------------------------------- reading

def read_json(storage: Storage, path: str, what: str) -> dict[str, Any]:
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{what} is missing", path=path) from None
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{what} is not valid JSON: {e}", path=path,
                                     hint="damaged or partially written") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{what} is not a torchkeep record", path=path)
    return obj


def read_commit(storage: Storage, folder: str) -> dict[str, Any] | None:
    """The commit record of ``folder``; None when there is none (never committed, or being deleted)."""
    path = storage.join(folder, COMMIT)
    if not storage.exists(path):
        return None
    return read_json(storage, path, "commit record")


def read_manifest(storage: Storage, folder: str, commit_record: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The manifest of a committed folder, checked against the sha256 its commit record holds."""
    if commit_record is None:
        commit_record = read_commit(storage, folder)
        if commit_record is None:
            raise CorruptCheckpointError("not committed (no commit.json): the write was interrupted "
                                         "or the checkpoint is being deleted", path=folder)
    path = storage.join(folder, MANIFEST)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise CorruptCheckpointError("manifest.json is missing", path=folder) from None
    want = commit_record.get("manifest_sha256")
    got = hashlib.sha256(data).hexdigest()
    if want != got:
        raise CorruptCheckpointError(f"manifest sha256 is {got[:12]}…, the commit record says "
                                     f"{str(want)[:12]}…", path=path, hint="damaged on disk?")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # pragma: no cover - sha256 matched
        raise CorruptCheckpointError(f"manifest is not valid JSON: {e}", path=path) from None


def blob_folder(storage: Storage, folder: str, manifest: Mapping[str, Any]) -> str:
    rel = manifest.get("blobs", "../" + BLOB_DIR)
    parent = folder.rstrip("/").rsplit("/", 1)[0] if "/" in folder.rstrip("/") else "."
    if rel.startswith("../"):
        return storage.join(parent, rel[3:])
    return storage.join(folder, rel)


def blob_refs(manifest: Mapping[str, Any]) -> dict[str, int]:
    """digest -> crc32 of every blob a manifest refers to."""
    return {e["blob"]: e["crc32"] for e in manifest.get("tensors", {}).values() if e.get("blob")}


def tensor_path(storage: Storage, folder: str, manifest: Mapping[str, Any], key: str) -> str:
    e = manifest["tensors"][key]
    if e.get("blob"):
        return storage.join(blob_folder(storage, folder, manifest), e["blob"] + ".safetensors")
    return storage.join(folder, e.get("file", PACK))


READ_CHUNK = 4 << 20  # read and checksum in pieces small enough to stay in the CPU cache


def _fill(f, buf: memoryview, path: str, key: str, crc: bool) -> int:
    """Fill ``buf`` from ``f``; the crc32 of what was read (computed while it is cache-hot)."""
    done, value = 0, 0
    while done < len(buf):
        piece = buf[done:done + READ_CHUNK]
        n = f.readinto(piece)
        if not n:
            raise CorruptCheckpointError(f"expected {len(buf)} bytes, the file ends after {done}",
                                         path=path, entry=key, hint="file truncated?")
        if crc:
            value = zlib.crc32(piece[:n], value)
        done += n
    return value


def _load_blob(storage: Storage, path: str, key: str, info: Mapping[str, Any], verify: bool) -> torch.Tensor:
    dtype = serial.dtype_from_name(info["dtype"])
    try:
        f = storage.open_read(path)
    except FileNotFoundError:
        raise CorruptCheckpointError("blob file is missing", path=path, entry=key) from None
    with f:
        st, start = read_st_header(f, path)
        begin, _ = _check_entry(st, "data", info, path)
        if begin:
            f.seek(start + begin)
        t = torch.empty(info["shape"], dtype=dtype)
        got = _fill(f, tensor_bytes(t), path, key, verify)
    if verify and got != info["crc32"]:
        raise CorruptCheckpointError(f"crc32 mismatch (stored {info['crc32']}, read {got})",
                                     path=path, entry=key, hint="the file was damaged on disk")
    return t


def _map_blob(storage: Storage, path: str, key: str, info: Mapping[str, Any], verify: bool) -> torch.Tensor:
    dtype = serial.dtype_from_name(info["dtype"])
    local = storage.local_path(path)
    try:
        f = open(local, "rb")  # type: ignore[arg-type]
    except FileNotFoundError:
        raise CorruptCheckpointError("blob file is missing", path=path, entry=key) from None
    with f:
        st, start = read_st_header(f, path)
        begin, end = _check_entry(st, "data", info, path)
        size = os.fstat(f.fileno()).st_size
        if start + end > size:
            raise CorruptCheckpointError(f"tensor ends at byte {start + end}, the file has {size}",
                                         path=path, entry=key, hint="file truncated?")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if verify:
        view = memoryview(mm)[start + begin:start + end]
        try:
            got = crc32(view, chunk=READ_CHUNK)
        finally:
            view.release()
        if got != info["crc32"]:
            mm.close()
            raise CorruptCheckpointError(f"crc32 mismatch (stored {info['crc32']}, read {got})",
                                         path=path, entry=key, hint="the file was damaged on disk")
    numel = (end - begin) // dtype.itemsize
    t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=start + begin)  # keeps mm alive
    return t.reshape(info["shape"])


def _load_pack(storage: Storage, path: str, items: Sequence[tuple[str, Mapping[str, Any]]],
               verify: bool, errors: list[CorruptCheckpointError] | None = None
               ) -> dict[str, torch.Tensor]:
    """The tensors ``items`` of a pack file, read once. With ``errors``, a damaged tensor is
    recorded there and skipped instead of raising (to report every one)."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise CorruptCheckpointError("tensor file is missing", path=path) from None
    st, start = read_st_header(io.BytesIO(data), path)
    out = {}
    for key, info in items:
        try:
            begin, end = _check_entry(st, key, info, path)
            if start + end > len(data):
                raise CorruptCheckpointError(f"tensor ends at byte {start + end}, the file has {len(data)}",
                                             path=path, entry=key, hint="file truncated?")
            t = torch.empty(info["shape"], dtype=serial.dtype_from_name(info["dtype"]))
            buf = tensor_bytes(t)
            buf[:] = data[start + begin:start + end]
            if verify and (got := crc32(buf)) != info["crc32"]:
                raise CorruptCheckpointError(f"crc32 mismatch (stored {info['crc32']}, read {got})",
                                             path=path, entry=key, hint="the file was damaged on disk")
        except CorruptCheckpointError as e:
            if errors is None:
                raise
            errors.append(e)
            continue
        out[key] = t
    return out


def _split(storage: Storage, folder: str, manifest: Mapping[str, Any], keys: Iterable[str]
           ) -> tuple[list[tuple[str, str, Mapping[str, Any]]], dict[str, list[tuple[str, Mapping[str, Any]]]]]:
    """(blob tensors as (key, path, entry), pack path -> [(key, entry)]) for ``keys``."""
    table = manifest.get("tensors", {})
    by_pack: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    blobs: list[tuple[str, str, Mapping[str, Any]]] = []
    for k in keys:
        info = table.get(k)
        if info is None:
            raise CorruptCheckpointError("the state refers to a tensor the manifest does not list",
                                         path=folder, entry=k)
        p = tensor_path(storage, folder, manifest, k)
        if info.get("blob"):
            blobs.append((k, p, info))
        else:
            by_pack.setdefault(p, []).append((k, info))
    blobs.sort(key=lambda b: -_nbytes(b[2]))
    return blobs, by_pack


def load_tensors(storage: Storage, folder: str, manifest: Mapping[str, Any],
                 keys: Iterable[str] | None = None, *, verify: bool = True,
                 threads: int = IO_THREADS, mapped: Container[str] = ()) -> dict[str, torch.Tensor]:
    """Read tensors of a checkpoint onto the CPU, each checked against its crc32.

    Blobs of keys in ``mapped`` come back as private (copy-on-write) memory maps of their local
    files, checked in place: for tensors the caller only copies from (a module's state dict),
    that saves allocating and filling fresh memory.
    """
    table = manifest.get("tensors", {})
    keys = list(table) if keys is None else list(keys)
    # -- torchkeep.distributed: tensors in the rank-sharded DCP part are read whole there --
    from . import sharded
    in_shards = [k for k in keys if sharded.is_shard_entry(table.get(k))]
    if in_shards:
        got = sharded.load(storage, folder, manifest, in_shards)
        rest = load_tensors(storage, folder, manifest, [k for k in keys if k not in got],
                            verify=verify, threads=threads, mapped=mapped)
        return {k: got[k] if k in got else rest[k] for k in keys}
    # --------------------------------------------------------------------------------------
    blobs, by_pack = _split(storage, folder, manifest, keys)
    out: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(max(1, min(threads, len(blobs) + len(by_pack))),
                            thread_name_prefix="torchkeep-read") as pool:
        futs = {pool.submit(_map_blob if k in mapped and storage.local_path(p) else _load_blob,
                            storage, p, k, info, verify): k for k, p, info in blobs}
        packs = [pool.submit(_load_pack, storage, p, items, verify) for p, items in by_pack.items()]
        for f, k in futs.items():
            out[k] = f.result()
        for f in packs:
            out.update(f.result())
    return {k: out[k] for k in keys}


@dataclass
class Problem:
    """One thing wrong with a checkpoint folder."""

    path: str
    message: str
    entry: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {'entry ' + repr(self.entry) + ': ' if self.entry else ''}{self.message}"


def verify_folder(storage: Storage, folder: str, *, deep: bool = False) -> list[Problem]:
    """Every problem found in a committed checkpoint: records, files, crc32 of every tensor and,
    with ``deep``, the sha256 of every blob against its name."""
    problems: list[Problem] = []
    try:
        rec = read_commit(storage, folder)
        if rec is None:
            return [Problem(folder, "not committed (no commit.json)")]
        manifest = read_manifest(storage, folder, rec)
    except CorruptCheckpointError as e:
        return [Problem(e.path or folder, e.detail, e.entry)]
    table = manifest.get("tensors", {})
    # -- torchkeep.distributed: the shard files are checked against their sha256 ----------
    from . import sharded
    if sharded.section(manifest) or sharded.shard_keys(manifest):
        problems.extend(sharded.verify(storage, folder, manifest))
    table = {k: e for k, e in table.items() if not sharded.is_shard_entry(e)}
    # --------------------------------------------------------------------------------------
    blobs, by_pack = _split(storage, folder, manifest, table)
    errors: list[CorruptCheckpointError] = []

    def check_blob(item: tuple[str, str, Mapping[str, Any]]) -> None:
        k, p, info = item
        try:
            _load_blob(storage, p, k, info, True)
        except CorruptCheckpointError as e:
            errors.append(e if e.entry else CorruptCheckpointError(e.detail, path=e.path, entry=k))

    def check_pack(item: tuple[str, list[tuple[str, Mapping[str, Any]]]]) -> None:
        p, items = item
        try:
            _load_pack(storage, p, items, True, errors)
        except CorruptCheckpointError as e:
            errors.append(e)

    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="torchkeep-verify") as pool:
        list(pool.map(check_blob, blobs))
        list(pool.map(check_pack, by_pack.items()))
    problems.extend(Problem(e.path or folder, e.detail, e.entry) for e in errors)
    if deep:
        bdir = blob_folder(storage, folder, manifest)
        for digest in sorted(blob_refs(manifest)):
            p = storage.join(bdir, digest + ".safetensors")
            try:
                h = hashlib.sha256()
                with storage.open_read(p) as f:
                    while chunk := f.read(8 << 20):
                        h.update(chunk)
                if h.hexdigest() != digest:
                    problems.append(Problem(p, f"sha256 is {h.hexdigest()[:12]}…, the name says {digest[:12]}…"))
            except FileNotFoundError:
                pass  # reported above as a missing blob
    return problems


def committed_steps(storage: Storage, root: str) -> list[tuple[int, str]]:
    """(step, folder) of every folder under ``root`` with a commit record, oldest first."""
    out = []
    for name in storage.listdir(root):
        step = parse_step(name)
        if step is not None and storage.exists(storage.join(root, name, COMMIT)):
            out.append((step, storage.join(root, name)))
    return sorted(out)


def is_manifest(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.startswith(b'{"format":"torchkeep"')


# ----------------------------------------------------------------------------- the Reader

class NativeReader(Reader):
    """A torchkeep checkpoint folder (or a manager's folder: its newest committed checkpoint)."""

    format = "torchkeep"
    description = "torchkeep training state (manifest.json, safetensors, commit.json)"
    kind = "training-state"

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        if not os.path.isdir(path):
            return False
        if is_manifest(os.path.join(path, MANIFEST)):
            return True
        try:
            names = os.listdir(path)
        except OSError:
            return False
        return any(parse_step(n) is not None and is_manifest(os.path.join(path, n, MANIFEST))
                   for n in names)

    def __init__(self, path: str | os.PathLike, *, trust: bool = False) -> None:
        super().__init__(path, trust=trust)
        self.storage, root = storage_for(self.path)
        self.folder = root
        if not self.storage.exists(self.storage.join(root, MANIFEST)):
            steps = committed_steps(self.storage, root)
            if not steps:
                raise FormatError("no committed checkpoint in this folder", path=self.path,
                                  hint="torchkeep ls shows what is there")
            self.folder = steps[-1][1]
        self._manifest: dict[str, Any] | None = None
        self._refs: dict[str, TensorRef] = {}

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            rec = read_commit(self.storage, self.folder)
            if rec is None:
                raise CorruptCheckpointError(
                    "not committed (no commit.json): the write was interrupted or the checkpoint "
                    "is being deleted", path=self.folder, hint="torchkeep ls shows the good ones")
            self._manifest = read_manifest(self.storage, self.folder, rec)
            m = self._manifest
            self.metadata = {"checkpoint": self.folder, "step": m.get("step"),
                             "created": m.get("created"), "metrics": m.get("metrics", {}),
                             "torch": m.get("torch"), "torchkeep": m.get("torchkeep")}
            for key, info in m.get("tensors", {}).items():
                self._refs[key] = TensorRef(
                    shape=tuple(info["shape"]), dtype=serial.dtype_from_name(info["dtype"]),
                    reader=self, key=key, storage=key, location=info.get("device", "cpu"))
        return self._manifest

    def read_tree(self) -> Any:
        return self._decode(lazy=True)

    def _decode(self, lazy: bool, loaded: Mapping[str, torch.Tensor] | None = None) -> Any:
        m = self.manifest

        def tensor(key: str, tag: Mapping[str, Any]) -> Any:
            if key not in self._refs:
                raise CorruptCheckpointError("the state refers to a tensor the manifest does not list",
                                             path=self.folder, entry=key)
            return self._refs[key] if lazy else loaded[key]  # type: ignore[index]

        def pickled(value: serial.PickledValue, path: str) -> Any:
            if self.trust and not lazy:
                return value.load()
            from ..safety import restricted_loads
            return restricted_loads(value.data, path=self.folder, member=path)

        return serial.decode(m.get("state"), tensor, pickled=pickled)

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu") -> list[torch.Tensor]:
        got = load_tensors(self.storage, self.folder, self.manifest, [r.key for r in refs])
        return [got[r.key].to(device) for r in refs]

    def trusted_load(self, device: str | torch.device = "cpu") -> Any:
        loaded = {k: t.to(device) for k, t in
                  load_tensors(self.storage, self.folder, self.manifest).items()}
        return self._decode(lazy=False, loaded=loaded)

    def globals(self) -> list:
        from ..scanning import scan_pickle
        import base64
        out: list = []

        def walk(obj: Any, path: str) -> None:
            if isinstance(obj, list):
                for i, v in enumerate(obj):
                    walk(v, serial.child(path, i))
            elif isinstance(obj, dict):
                if obj.get(serial.TAG) == "pickle":
                    found, _ = scan_pickle(base64.b64decode(obj["v"]), member=path)
                    out.extend(found)
                    return
                for k, v in obj.items():
                    walk(v, serial.child(path, k))

        walk(self.manifest.get("state"), "")
        return out

    def files(self) -> list[str]:
        m = self.manifest
        out = [self.storage.join(self.folder, MANIFEST), self.storage.join(self.folder, COMMIT)]
        seen = set(out)
        for key in m.get("tensors", {}):
            p = tensor_path(self.storage, self.folder, m, key)
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out

