"""``torch.distributed.checkpoint`` folders: a pickled ``.metadata`` plus ``*.distcp`` data files.

DCP's own reader unpickles ``.metadata`` with plain pickle and loads non-tensor items with
``weights_only=False``, so a folder from a stranger can run code. Here ``.metadata`` goes through
the restricted unpickler: DCP's metadata classes come back as placeholders whose recorded fields
are interpreted as data. Each chunk of a tensor is a small torch.save zip stored at a byte range
of a ``.distcp`` file; its pickle is read with the restricted unpickler too and its bytes with
one positioned read. Tensors are assembled whole from their chunks, whatever the number of
ranks that wrote them.
"""
from __future__ import annotations

import io
import logging
import os
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.read.formats.base import Reader, TensorRef
from torchkeep.read.unpickler import (GlobalRef, Opaque, StorageRef, StorageType,
                                      restricted_load_with_globals)

log = logging.getLogger(__name__)

METADATA = ".metadata"
SUFFIX = ".distcp"
MAX_METADATA_BYTES = 1 << 30
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_DCP = "torch.distributed.checkpoint."


# -- a torch.save zip stored at a byte range of a file ---------------------------------------

class _Slice(io.RawIOBase):
    """A read-only, seekable window [start, start+length) of an open file."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        if not n:
            return 0
        data = os.pread(self._f.fileno(), n, self._start + self._pos)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)


class BlobReader(Reader):
    """One torch.save archive written into a range of a larger file (a DCP chunk or item)."""

    format = "torch-zip-blob"
    keeps_order = True

    def __init__(self, path: str, start: int, length: int, *, what: str) -> None:
        super().__init__(path)
        self.start, self.length, self.what = start, length, what
        self._storages: dict[str, StorageRef] = {}
        self._prefix = ""
        self._spans: dict[str, tuple[int, int, int]] = {}  # key -> (offset in blob, size, compress)
        self._big_endian = False
        self.seen: list[GlobalRef] = []

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        return False

    def _fail(self, msg: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.what}: {msg}", path=self.path,
                                      hint="file truncated or damaged?")

    def read_tree(self) -> Any:
        with open(self.path, "rb") as f:
            head = os.pread(f.fileno(), 4, self.start)
            if head != b"PK\x03\x04":
                raise FormatError(f"{self.what} (bytes {self.start}-{self.start + self.length}) is "
                                  f"not a torch.save archive", path=self.path,
                                  hint="written with a serialization format torchkeep does not read, "
                                       "or damaged")
            try:
                zf = zipfile.ZipFile(_Slice(f, self.start, self.length))
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise self._fail(f"the torch.save archive is damaged ({e})") from None
            with zf:
                names = zf.namelist()
                pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
                if not pkls:
                    raise self._fail("the archive has no data.pkl")
                self._prefix = pkls[0][: -len("data.pkl")]
                if self._prefix + "byteorder" in names:
                    self._big_endian = zf.read(self._prefix + "byteorder").strip() == b"big"
                for info in zf.infolist():
                    if info.filename.startswith(self._prefix + "data/"):
                        self._spans[info.filename[len(self._prefix) + 5:]] = (
                            info.header_offset, info.file_size, info.compress_type)
                try:
                    data = zf.read(pkls[0])
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise self._fail(f"cannot read {pkls[0]} ({e})") from None
        obj, self.seen = restricted_load_with_globals(data, path=self.path, member=self.what,
                                                      persistent_load=self._persistent_load)
        return obj

    def _persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5:
            raise self._fail(f"malformed persistent id {pid!r}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        storage_type, key, location, numel = pid[1:5]
        if typename != "storage" or not isinstance(storage_type, StorageType):
            raise self._fail(f"unknown persistent id {pid!r}")
        key = str(key)
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = StorageRef(self, key, storage_type.dtype, int(numel), str(location))
        return ref

    def _storage(self, st: StorageRef, f: Any) -> torch.Tensor:
        from torchkeep.read.formats.torchzip import _byteswap, pread_into

        nbytes = st.numel * st.dtype.itemsize
        span = self._spans.get(st.key)
        if span is None:
            raise self._fail(f"storage data/{st.key} is missing from the archive")
        header_offset, size, compress = span
        if size < nbytes:
            raise self._fail(f"storage data/{st.key} holds {size} bytes but its tensor needs {nbytes}")
        if compress != zipfile.ZIP_STORED:
            with zipfile.ZipFile(_Slice(f, self.start, self.length)) as zf:
                raw = zf.read(f"{self._prefix}data/{st.key}")[:nbytes]
            buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if nbytes else \
                torch.empty(0, dtype=torch.uint8)
        else:
            head = os.pread(f.fileno(), _LOCAL_HEADER.size, self.start + header_offset)
            if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
                raise self._fail(f"bad local header for data/{st.key}")
            fields = _LOCAL_HEADER.unpack(head)
            rel = header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
            if rel + nbytes > self.length:
                raise self._fail(f"storage data/{st.key} runs past the end of its archive")
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                pread_into(f.fileno(), buf, self.start + rel, path=self.path,
                           what=f"{self.what}: storage data/{st.key}")
        if self._big_endian and st.dtype.itemsize > 1:
            buf = _byteswap(buf, st.dtype)
        return buf

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu") -> list[torch.Tensor]:
        from torchkeep.read.formats.torchzip import materialize

        bufs: dict[str, torch.Tensor] = {}
        out = []
        with open(self.path, "rb") as f:
            for r in refs:
                buf = bufs.get(r.key)
                if buf is None:
                    st = self._storages.get(r.key)
                    if st is None:
                        raise self._fail(f"unknown storage {r.key!r}")
                    buf = bufs[r.key] = self._storage(st, f)
                out.append(materialize(buf, r, path=self.path, name=self.what).to(device))
        return out


# -- interpreting DCP's metadata placeholders ------------------------------------------------

def _fields(obj: Any, what: str, path: str) -> dict[str, Any]:
    """The recorded fields of a pickled DCP dataclass (a placeholder, or a real instance)."""
    if isinstance(obj, Opaque):
        st = obj.state
        if isinstance(st, tuple) and len(st) == 2 and isinstance(st[1], dict):  # (dict, slots)
            st = {**(st[0] or {}), **st[1]}
        if isinstance(st, dict):
            return st
        if st is None and not obj.args:
            return {}
        raise FormatError(f".metadata: cannot interpret {obj.global_name} (state {type(st).__name__})",
                          path=path, hint=f"written by an unsupported version of {what}")
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    raise FormatError(f".metadata: expected {what}, found {type(obj).__name__}", path=path)


def _name(obj: Any) -> str:
    if isinstance(obj, Opaque):
        return obj.global_name
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _dtype_of(props: Any, path: str) -> torch.dtype:
    if isinstance(props, Opaque) and isinstance(props.state, tuple):
        dtype = props.state[0] if props.state else None  # TensorProperties.__getstate__
    else:
        dtype = _fields(props, "TensorProperties", path).get("dtype")
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f".metadata: tensor properties without a dtype ({dtype!r})", path=path)
    return dtype


def _ints(x: Any, what: str, path: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in x)
    except (TypeError, ValueError):
        raise CorruptCheckpointError(f".metadata: {what} {x!r} is not a list of integers", path=path) from None
    if any(v < 0 for v in out):
        raise CorruptCheckpointError(f".metadata: {what} {out} has negative values", path=path)
    return out


@dataclass
class _Where:
    """Where one stored item's bytes are: a file of the folder and a byte range in it."""

    file: str
    offset: int
    length: int


@dataclass
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    where: _Where


@dataclass
class _TensorMeta:
    fqn: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[_Chunk] = field(default_factory=list)


def _prod(xs: Sequence[int]) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


class DCPReader(Reader):
    format = "dcp"
    description = "torch.distributed.checkpoint folder"

    def __init__(self, path: str | os.PathLike, *, trust: bool = False) -> None:
        super().__init__(path, trust=trust)
        p = self.path
        self.folder = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
        self._tensors: dict[str, _TensorMeta] | None = None
        self._items: dict[str, _Where] = {}
        self._order: list[str] = []
        self._paths: dict[str, tuple] = {}
        self._seen: list[GlobalRef] = []
        self._blobs: dict[tuple[str, int], BlobReader] = {}
        self._sizes: dict[str, int] = {}

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, METADATA)):
                return True
            try:
                return any(n.endswith(SUFFIX) for n in os.listdir(path))
            except OSError:
                return False
        return os.path.basename(path) == METADATA

    # -- metadata ----------------------------------------------------------------------
    def _meta(self) -> dict[str, _TensorMeta]:
        if self._tensors is not None:
            return self._tensors
        mpath = os.path.join(self.folder, METADATA)
        if not os.path.isfile(mpath):
            hint = ("found .metadata.tmp: the save was interrupted while committing"
                    if os.path.exists(mpath + ".tmp") else
                    "DCP writes .metadata last, after every .distcp file")
            raise CorruptCheckpointError(
                "no .metadata: the save did not finish (or this is not a DCP folder)",
                path=self.folder, hint=hint)
        if os.path.getsize(mpath) > MAX_METADATA_BYTES:
            raise FormatError(".metadata is larger than 1 GiB; refusing to read it", path=mpath)
        with open(mpath, "rb") as f:
            data = f.read()
        if not data:
            raise CorruptCheckpointError(".metadata is empty", path=mpath, hint="save interrupted?")
        root, self._seen = restricted_load_with_globals(data, path=mpath, member=METADATA)
        if _name(root) != _DCP + "metadata.Metadata":
            raise FormatError(f".metadata holds {_name(root)}, not DCP Metadata", path=mpath)
        md = _fields(root, "Metadata", mpath)
        sdm = md.get("state_dict_metadata")
        storage = md.get("storage_data")
        if not isinstance(sdm, dict) or not isinstance(storage, dict):
            raise FormatError(".metadata lacks state_dict_metadata or storage_data", path=mpath,
                              hint="a DCP checkpoint written with a custom storage layer?")
        planner = md.get("planner_data")
        self.metadata = {"version": md.get("version"), "items": len(sdm)}
        # storage_data: MetadataIndex(fqn, offset, index) -> _StorageInfo(file, offset, length)
        where: dict[tuple[str, tuple[int, ...] | None], _Where] = {}
        for idx, info in storage.items():
            f_idx = _fields(idx, "MetadataIndex", mpath)
            f_info = _fields(info, "_StorageInfo", mpath)
            fqn = f_idx.get("fqn")
            off = f_idx.get("offset")
            key = (fqn, _ints(off, "chunk offset", mpath) if off is not None else None)
            where[key] = self._where(fqn, f_info, mpath)
        tensors: dict[str, _TensorMeta] = {}
        for fqn, item in sdm.items():
            fqn = str(fqn)
            self._order.append(fqn)
            kind = _name(item)
            if kind.endswith("BytesStorageMetadata"):
                w = where.get((fqn, None))
                if w is None:
                    raise CorruptCheckpointError(f".metadata lists item {fqn!r} but not where it is stored",
                                                 path=mpath)
                self._items[fqn] = w
                continue
            if not kind.endswith("TensorStorageMetadata"):
                raise FormatError(f".metadata: item {fqn!r} is a {kind}, which torchkeep does not read",
                                  path=mpath)
            f = _fields(item, "TensorStorageMetadata", mpath)
            tm = _TensorMeta(fqn, _ints(f.get("size"), f"size of {fqn!r}", mpath),
                             _dtype_of(f.get("properties"), mpath))
            for ch in f.get("chunks") or []:
                fc = _fields(ch, "ChunkStorageMetadata", mpath)
                offs = _ints(fc.get("offsets"), f"chunk offsets of {fqn!r}", mpath)
                sizes = _ints(fc.get("sizes"), f"chunk sizes of {fqn!r}", mpath)
                w = where.get((fqn, offs))
                if w is None:
                    raise CorruptCheckpointError(
                        f".metadata lists a chunk of {fqn!r} at {list(offs)} but not where it is stored",
                        path=mpath)
                tm.chunks.append(_Chunk(offs, sizes, w))
            self._check_chunks(tm, mpath)
            tensors[fqn] = tm
        if isinstance(planner, dict):
            self._paths = {str(k): tuple(v) for k, v in planner.items()
                           if isinstance(v, (tuple, list)) and v}
        self._tensors = tensors
        return tensors

    def _where(self, fqn: Any, info: dict[str, Any], mpath: str) -> _Where:
        rel, off, length = info.get("relative_path"), info.get("offset"), info.get("length")
        if info.get("transform_descriptors"):
            raise FormatError(f"item {fqn!r} was written with storage transforms "
                              f"{list(info['transform_descriptors'])}, which torchkeep does not read",
                              path=mpath)
        if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise CorruptCheckpointError(f".metadata: item {fqn!r} is stored in {rel!r}, which is not a "
                                         f"file inside the folder", path=mpath)
        if not isinstance(off, int) or not isinstance(length, int) or off < 0 or length < 0:
            raise CorruptCheckpointError(f".metadata: item {fqn!r} has byte range {off!r}+{length!r}",
                                         path=mpath)
        file = os.path.join(self.folder, rel)
        size = self._sizes.get(file)
        if size is None:
            if not os.path.isfile(file):
                raise CorruptCheckpointError(
                    f"data file {rel!r} named by .metadata (item {fqn!r}) is missing",
                    path=self.folder, hint="copy the whole folder; every .distcp file is needed")
            size = self._sizes[file] = os.path.getsize(file)
        if off + length > size:
            raise CorruptCheckpointError(
                f"item {fqn!r} declares {length} bytes at offset {off} of {rel} but the file ends after "
                f"{size}", path=self.folder, hint="file truncated?")
        return _Where(file, off, length)

    @staticmethod
    def _check_chunks(tm: _TensorMeta, mpath: str) -> None:
        """The chunks tile the tensor exactly: inside it, not overlapping, covering every element
        (so the whole tensor is never allocated from a size the chunks do not back)."""
        nd = len(tm.shape)
        total = 0
        for c in tm.chunks:
            if len(c.offsets) != nd or len(c.sizes) != nd:
                raise CorruptCheckpointError(f".metadata: a chunk of {tm.fqn!r} has {len(c.offsets)} "
                                             f"dimensions, the tensor {nd}", path=mpath)
            if any(o + s > d for o, s, d in zip(c.offsets, c.sizes, tm.shape)):
                raise CorruptCheckpointError(
                    f".metadata: chunk at {list(c.offsets)} of size {list(c.sizes)} lies outside "
                    f"{tm.fqn!r} of shape {list(tm.shape)}", path=mpath)
            total += _prod(c.sizes)
        if len(tm.chunks) <= 2048:
            for i, a in enumerate(tm.chunks):
                for b in tm.chunks[i + 1:]:
                    if _prod(a.sizes) and _prod(b.sizes) and all(
                            ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in
                            zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                        raise CorruptCheckpointError(f".metadata: two chunks of {tm.fqn!r} overlap "
                                                     f"({list(a.offsets)} and {list(b.offsets)})",
                                                     path=mpath)
        if total != _prod(tm.shape):
            raise CorruptCheckpointError(
                f"the chunks of {tm.fqn!r} cover {total} of its {_prod(tm.shape)} elements",
                path=mpath, hint="a rank's data is missing from .metadata")

    def _blob(self, w: _Where, what: str) -> BlobReader:
        key = (w.file, w.offset)
        b = self._blobs.get(key)
        if b is None:
            b = self._blobs[key] = BlobReader(w.file, w.offset, w.length, what=what)
        return b

    # -- Reader ------------------------------------------------------------------------
    def read_tree(self) -> Any:
        tensors = self._meta()
        flat: list[tuple[tuple, Any]] = []
        for fqn in self._order:
            if fqn in tensors:
                tm = tensors[fqn]
                value: Any = TensorRef(shape=tm.shape, dtype=tm.dtype, reader=self, key=fqn, storage=fqn)
            else:
                value = self._blob(self._items[fqn], f"item {fqn!r}").read_tree()
            flat.append((self._paths.get(fqn, (fqn,)), value))
        return _nest(flat)

    def _chunk_tensor(self, tm: _TensorMeta, c: _Chunk) -> torch.Tensor:
        blob = self._blob(c.where, f"chunk {list(c.offsets)} of {tm.fqn!r}")
        ref = blob.read_tree()
        if not isinstance(ref, TensorRef):
            raise CorruptCheckpointError(f"{blob.what} holds {type(ref).__name__}, not a tensor",
                                         path=c.where.file)
        if tuple(ref.shape) != c.sizes or ref.dtype != tm.dtype:
            raise CorruptCheckpointError(
                f"{blob.what} is {str(ref.dtype).replace('torch.', '')} {list(ref.shape)}, the metadata "
                f"says {str(tm.dtype).replace('torch.', '')} {list(c.sizes)}", path=c.where.file)
        return blob.load([ref])[0]

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu", *,
             mmap: bool = False) -> list[torch.Tensor]:
        """Whole tensors assembled from their chunks (always read into fresh memory: chunks are
        small zip archives, not mappable views; ``mmap`` is accepted and has no effect)."""
        tensors = self._meta()
        done: dict[str, torch.Tensor] = {}
        out = []
        for r in refs:
            t = done.get(r.key)
            if t is None:
                tm = tensors.get(r.key)
                if tm is None:
                    raise FormatError(f"no tensor named {r.key!r}", path=self.folder)
                if len(tm.chunks) == 1 and tm.chunks[0].sizes == tm.shape:
                    t = self._chunk_tensor(tm, tm.chunks[0])
                else:
                    t = torch.empty(tm.shape, dtype=tm.dtype)
                    for c in tm.chunks:
                        if not _prod(c.sizes):
                            continue
                        part = self._chunk_tensor(tm, c)
                        view = t
                        for dim, (o, s) in enumerate(zip(c.offsets, c.sizes)):
                            view = view.narrow(dim, o, s)
                        view.copy_(part)
                t = done[r.key] = t.to(device)
            out.append(t)
        return out

    def globals(self) -> list:
        self.read_tree()
        out = list(self._seen)
        for b in self._blobs.values():
            out.extend(b.seen)
        return out

    def trusted_load(self, device: str | torch.device = "cpu") -> Any:
        import warnings

        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            obj = _load_state_dict_from_keys(checkpoint_id=self.folder)
        if torch.device(device).type != "cpu":
            from torchkeep.read.tree import map_leaves
            obj = map_leaves(obj, lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
        return obj

    def files(self) -> list[str]:
        mpath = os.path.join(self.folder, METADATA)
        if not os.path.isfile(mpath):
            return sorted(os.path.join(self.folder, n) for n in os.listdir(self.folder) if n.endswith(SUFFIX))
        self._meta()
        data = {w.file for tm in self._tensors.values() for c in tm.chunks for w in [c.where]}
        data |= {w.file for w in self._items.values()}
        return [mpath] + sorted(data)


def _nest(flat: list[tuple[tuple, Any]]) -> Any:
    """Rebuild the nested state from (key path, value) pairs; int keys 0..n-1 become lists."""
    root: dict[Any, Any] = {}
    for path, value in flat:
        node = root
        for k in path[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = node[k] = {}
            node = nxt
        node[path[-1]] = value

    def fix(obj: Any) -> Any:
        if not isinstance(obj, dict):
            return obj
        obj = {k: fix(v) for k, v in obj.items()}
        if obj and all(isinstance(k, int) and not isinstance(k, bool) for k in obj) \
                and sorted(obj) == list(range(len(obj))):
            return [obj[i] for i in range(len(obj))]
        return obj

    return fix(root)


__all__ = ["DCPReader", "BlobReader"]
