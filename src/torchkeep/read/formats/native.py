"""torchkeep's own checkpoint format: a folder per checkpoint, tensors in safetensors, everything
else in typed JSON, a manifest with a checksum per tensor, and a commit record written last.

::

    <root>/                              a CheckpointManager's folder
      blobs/<digest>.safetensors         one large tensor each, named by the xxh3-128 of the file
                                         (sha256 before; both are read):
                                         written once, shared by every checkpoint holding the bytes
      step-00000100/
        tensors.safetensors              this checkpoint's small tensors (< 64 KiB each)
        manifest.json                    the state as typed JSON (see torchkeep.store.typedjson) and, for
                                         each tensor, dtype, shape, xxh3 (crc32 before) and where
                                         its bytes are
        commit.json, commit.copy.json    written last (twice, see torchkeep.store.commitrecord); the
                                         checkpoint exists once this does. It holds the manifest's
                                         sha256, the step, time and metrics, sealed by its own xxh3.
      copies/<digest>.safetensors        second copy of each blob that more than one checkpoint
                                         refers to (read only when the first fails; see
                                         torchkeep.store.copies)

Nothing is pickled unless the state was saved with ``TrainState(trust=True)``; such values are read
with the restricted unpickler (placeholders, no imports) unless the reader is trusted.

Opening a manager's root folder (rather than one ``step-*`` folder) opens its newest committed
checkpoint; ``metadata['checkpoint']`` names the folder that was chosen. That choice does not
verify tensor bytes; ``CheckpointManager.restore`` does and falls back to older checkpoints.

This module reads and verifies folders (and is the :class:`NativeReader`); the layout lives in
:mod:`.nativelayout` and the write path in :mod:`.nativewrite`, split so that other writers (e.g.
one rank of a distributed save) can take part: :class:`NativeWriter` writes the blobs, the
small-tensor pack and the manifest of one folder; :func:`commit` (called once, after every
writer finished) makes the checkpoint exist. Both are re-exported here (``native.commit``...).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Container, Iterable, Mapping, Sequence

import torch

from torchkeep.errors import CorruptCheckpointError, FormatError, LimitExceededError
from torchkeep.limits import loads_json
from torchkeep.read.formats.base import Reader, TensorRef
from torchkeep.read.formats.nativeblobs import (READ_CHUNK, blob_problem, mismatch, read_blob,
                                                unreadable)
from torchkeep.store import typedjson as serial
from torchkeep.store.backends import Storage, storage_for
from torchkeep.store.checksums import algo_of, entry_token, file_name_digest, tensor_bytes, token_of
from torchkeep.store.commitrecord import COMMIT_COPY, commit_state, read_commit
from torchkeep.store.layout import (BLOB_DIR, BLOB_MIN_BYTES, COMMIT, FORMAT, IO_THREADS, MANIFEST,
                                    MAX_HEADER, PACK, STEP_PREFIX, VERSION, Problem, _check_entry,
                                    _nbytes, parse_step, read_st_header, st_header, step_dirname)
from torchkeep.store.writer import NativeWriter, Snapshot, WriteResult, commit, uncommit

# ----------------------------------------------------------------------------- reading

def read_json(storage: Storage, path: str, what: str) -> dict[str, Any]:
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{what} is missing", path=path) from None
    except OSError as e:
        raise unreadable(e, path) from None
    try:
        obj = loads_json(data, path=path, what=what)
    except LimitExceededError as e:  # over a bound: not ours as written, so damaged (fallback)
        raise CorruptCheckpointError(e.detail, path=path, hint=e.hint) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{what} is not valid JSON: {e}", path=path,
                                     hint="damaged or partially written") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{what} is not a torchkeep record", path=path)
    return obj


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
    except OSError as e:
        raise unreadable(e, path) from None
    want = commit_record.get("manifest_sha256")
    got = hashlib.sha256(data).hexdigest()
    if want != got:
        raise CorruptCheckpointError(f"manifest sha256 is {got[:12]}…, the commit record says "
                                     f"{str(want)[:12]}…", path=path, hint="damaged on disk?")
    try:
        return loads_json(data, path=path, what="manifest.json")
    except LimitExceededError as e:
        raise CorruptCheckpointError(e.detail, path=path, hint=e.hint) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # pragma: no cover - sha256 matched
        raise CorruptCheckpointError(f"manifest is not valid JSON: {e}", path=path) from None


def blob_folder(storage: Storage, folder: str, manifest: Mapping[str, Any]) -> str:
    rel = manifest.get("blobs", "../" + BLOB_DIR)
    parent = folder.rstrip("/").rsplit("/", 1)[0] if "/" in folder.rstrip("/") else "."
    if rel.startswith("../"):
        return storage.join(parent, rel[3:])
    return storage.join(folder, rel)


def blob_refs(manifest: Mapping[str, Any]) -> dict[str, str]:
    """digest -> checksum token (:mod:`torchkeep.checksum`) of every blob a manifest refers to."""
    return {e["blob"]: entry_token(e) for e in manifest.get("tensors", {}).values()
            if e.get("blob")}


def tensor_path(storage: Storage, folder: str, manifest: Mapping[str, Any], key: str) -> str:
    e = manifest["tensors"][key]
    if e.get("blob"):
        return storage.join(blob_folder(storage, folder, manifest), e["blob"] + ".safetensors")
    return storage.join(folder, e.get("file", PACK))


def _load_pack(storage: Storage, path: str, items: Sequence[tuple[str, Mapping[str, Any]]],
               verify: bool, errors: list[CorruptCheckpointError] | None = None
               ) -> dict[str, torch.Tensor]:
    """The tensors ``items`` of a pack file, read once. With ``errors``, a damaged tensor is
    recorded there and skipped instead of raising (to report every one)."""
    try:
        data = storage.read_bytes(path)
    except OSError as e:
        raise unreadable(e, path) from None
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
            want = entry_token(info) if verify else None
            if verify and want is None:
                raise CorruptCheckpointError("the manifest entry has no checksum", path=path,
                                             entry=key)
            if want is not None and (got := token_of(buf, algo_of(want))) != want:
                raise mismatch(want, got, path, key)
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
    """Read tensors of a checkpoint onto the CPU, each checked against its checksum.

    Blobs of keys in ``mapped`` come back as private (copy-on-write) memory maps of their local
    files, checked in place: for tensors the caller only copies from (a module's state dict),
    that saves allocating and filling fresh memory.
    """
    table = manifest.get("tensors", {})
    keys = list(table) if keys is None else list(keys)
    # -- torchkeep.keep.sharded.checkpointing: tensors in the rank-sharded DCP part are read whole there --
    from torchkeep.read.formats import nativeshards as sharded
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
        futs = {pool.submit(read_blob, storage, p, k, info, verify, k in mapped): k
                for k, p, info in blobs}
        packs = [pool.submit(_load_pack, storage, p, items, verify) for p, items in by_pack.items()]
        for f, k in futs.items():
            out[k] = f.result()
        for f in packs:
            out.update(f.result())
    return {k: out[k] for k in keys}


def verify_folder(storage: Storage, folder: str, *, deep: bool = False,
                  copy_required: bool = False) -> list[Problem]:
    """Every problem found in a committed checkpoint: its commit records, files, the checksum
    of every tensor (a blob whose second copy is intact is still reported, as restorable) and,
    with ``deep``, the digest of every blob against its name. ``copy_required``: a missing
    ``commit.copy.json`` is damage (true for all but the newest checkpoint of a folder, where
    a crash between the two commit writes leaves the same)."""
    problems: list[Problem] = []
    try:
        state = commit_state(storage, folder)
        if state.record is None:
            return [Problem(folder, "not committed (no commit.json)")]
        if state.problem:
            problems.append(Problem(folder, state.problem))
        elif state.note and copy_required:
            problems.append(Problem(folder, state.note))
        manifest = read_manifest(storage, folder, state.record)
    except CorruptCheckpointError as e:
        return problems + [Problem(e.path or folder, e.detail, e.entry)]
    table = manifest.get("tensors", {})
    # -- torchkeep.keep.sharded.checkpointing: the shard files are checked against their sha256 ----------
    from torchkeep.read.formats import nativeshards as sharded
    if sharded.section(manifest) or sharded.shard_keys(manifest):
        problems.extend(sharded.verify(storage, folder, manifest))
    table = {k: e for k, e in table.items() if not sharded.is_shard_entry(e)}
    # --------------------------------------------------------------------------------------
    blobs, by_pack = _split(storage, folder, manifest, table)
    errors: list[CorruptCheckpointError] = []

    def check_blob(item: tuple[str, str, Mapping[str, Any]]) -> None:
        k, p, info = item
        if (msg := blob_problem(storage, p, k, info)) is not None:
            errors.append(CorruptCheckpointError(msg, path=p, entry=k))

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
        problems.extend(_deep(storage, folder, manifest))
    return problems


def _deep(storage: Storage, folder: str, manifest: Mapping[str, Any]) -> list[Problem]:
    """The digest (xxh3-128, or sha256 for older blobs) of every blob the manifest refers to,
    against its name."""
    out = []
    bdir = blob_folder(storage, folder, manifest)
    for digest in sorted(blob_refs(manifest)):
        p = storage.join(bdir, digest + ".safetensors")
        try:
            with storage.open_read(p) as f:
                got = file_name_digest(f, digest)
            if got != digest:
                out.append(Problem(p, f"content digest is {got[:12]}…, the name says "
                                      f"{digest[:12]}…"))
        except OSError:
            pass  # reported above as a missing or unreadable blob
    return out


def committed_steps(storage: Storage, root: str) -> list[tuple[int, str]]:
    """(step, folder) of every folder under ``root`` with a commit record, oldest first."""
    out = []
    for name in storage.listdir(root):
        step = parse_step(name)
        if step is not None and any(storage.exists(storage.join(root, name, c))
                                    for c in (COMMIT, COMMIT_COPY)):
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
    keeps_order = True
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
            from torchkeep.read.unpickler import restricted_loads
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
        import base64

        from torchkeep.read.scanner import scan_pickle
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


__all__ = [
    # the layout (nativelayout) and the write path (nativewrite), re-exported
    "FORMAT", "VERSION", "MANIFEST", "COMMIT", "PACK", "BLOB_DIR", "STEP_PREFIX", "BLOB_MIN_BYTES",
    "IO_THREADS", "MAX_HEADER", "step_dirname", "parse_step", "st_header", "read_st_header",
    "Snapshot", "WriteResult", "NativeWriter", "commit", "uncommit",
    # reading and verification
    "READ_CHUNK", "COMMIT_COPY", "read_json", "read_commit", "commit_state",
    "read_manifest", "blob_folder", "blob_refs",
    "tensor_path", "load_tensors", "Problem", "verify_folder", "committed_steps", "is_manifest",
    "NativeReader",
]


def manifest_blob_refs(storage: Any, folder: str) -> dict[str, str] | None:
    """Blob references of a folder's manifest, read even if its commit record is damaged (so that
    garbage collection never deletes what it refers to); None if the manifest is unreadable."""
    try:
        data = storage.read_bytes(storage.join(folder, MANIFEST))
        return blob_refs(loads_json(data, path=folder, what="manifest.json"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, LimitExceededError):
        return None
