"""safetensors files: an 8-byte little-endian header length, a JSON header, raw tensor bytes.

The header is parsed here rather than by the safetensors library so that a damaged or lying
file gets an error naming the tensor and what is wrong, and nothing is allocated from a size the
header merely claims. Tensors are served from a private (copy-on-write) memory map: loading is
zero-copy and the returned tensors are writable without touching the file.

torchkeep's own writers record tensors that shared storage in the source as aliases in the
header metadata (``torchkeep.aliases``); the reader gives them back sharing memory. The
``{dropped_name: kept_name}`` entries that ``safetensors.torch.save_model`` writes are honoured
the same way.
"""
from __future__ import annotations

import json
import logging
import mmap
import operator
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from torchkeep import limits as _limits
from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.read.formats.base import Reader, TensorRef
from torchkeep.read.formats.base import contiguous_stride as _contiguous_stride

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1000 * 1000
# Larger than any file can hold: a shape whose element count passes this is a lie.
MAX_ELEMENTS = 1 << 62
ALIGN = 8
ALIASES_KEY = "torchkeep.aliases"
DTYPES_KEY = "torchkeep.dtypes"

# safetensors dtype names -> torch dtypes (only those this torch has).
_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2",
    "C64": "complex64",
}
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _NAMES.items() if hasattr(torch, v)}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# Types safetensors lacks, stored as pairs of their real parts (F64 [..., 2]) and tagged in the
# metadata so torchkeep gives them back as complex; other readers see the real pairs.
_PAIRED = {torch.complex128: ("F64", torch.float64), torch.complex32: ("F16", torch.float16)}
_PAIRED_BY_NAME = {str(k).replace("torch.", ""): k for k in _PAIRED}
# Named by the safetensors spec but without a torch dtype.
_NO_TORCH = {"F6_E2M3", "F6_E3M2"}

_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(slots=True)
class TensorInfo:
    """One validated header entry: the torch view of it and its absolute byte span."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    tensors: dict[str, TensorInfo]  # header order
    metadata: dict[str, Any]
    data_start: int
    file_size: int


def _torch_shape(name: str, dtype_name: str, shape: list[int], path: str) -> tuple[int, ...]:
    """The torch shape for a header shape: F4 counts 4-bit values, torch counts their pairs."""
    if dtype_name != "F4":
        return tuple(shape)
    if not shape or shape[-1] % 2:
        raise CorruptCheckpointError(
            f"tensor {name!r} is F4 with shape {shape}: the last dimension must be an even number "
            f"of 4-bit values", path=path)
    return tuple(shape[:-1]) + (shape[-1] // 2,)


def _entry(name: str, spec: Any, data_start: int, paired: Mapping[str, torch.dtype], path: str
           ) -> TensorInfo:
    """One header entry, validated (the common case on a fast path: files hold thousands)."""
    if type(spec) is not dict:
        raise CorruptCheckpointError(f"tensor {name!r}: header entry is {type(spec).__name__}, "
                                     f"expected an object with dtype, shape and data_offsets", path=path)
    dname, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dname is None or shape is None or offs is None:
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in spec]
        raise CorruptCheckpointError(f"tensor {name!r}: header entry lacks {', '.join(missing)}",
                                     path=path)
    dtype = DTYPES.get(dname) if type(dname) is str else None
    if dtype is None:
        why = "has no torch equivalent" if dname in _NO_TORCH else "is not a safetensors dtype"
        raise FormatError(f"tensor {name!r} has dtype {dname!r}, which {why}", path=path,
                          hint="known: " + ", ".join(DTYPES))
    if type(shape) is not list:
        raise CorruptCheckpointError(f"tensor {name!r}: shape {shape!r} is not a list of integers",
                                     path=path)
    numel = 1
    for s in shape:
        if type(s) is not int:
            raise CorruptCheckpointError(f"tensor {name!r}: shape {shape!r} is not a list of integers",
                                         path=path)
        if s < 0:
            raise CorruptCheckpointError(f"tensor {name!r}: shape {shape} has a negative dimension",
                                         path=path)
        numel *= s
        if numel > MAX_ELEMENTS:
            raise CorruptCheckpointError(
                f"tensor {name!r}: shape {shape} has more elements than any file can hold "
                f"(the element count overflows)", path=path)
    if type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int or type(offs[1]) is not int:
        raise CorruptCheckpointError(f"tensor {name!r}: data_offsets {offs!r} is not a pair of integers",
                                     path=path)
    begin, end = offs
    if begin < 0 or end < begin:
        raise CorruptCheckpointError(f"tensor {name!r}: data_offsets [{begin}, {end}] are misordered "
                                     f"(begin must be >= 0 and <= end)", path=path)
    if dname == "F4":
        tshape = _torch_shape(name, dname, shape, path)
        want = numel // 2
    else:
        tshape = tuple(shape)
        want = numel * dtype.itemsize
    if end - begin != want:
        raise CorruptCheckpointError(
            f"tensor {name!r}: shape {shape} of {dname} needs {want} bytes but data_offsets "
            f"[{begin}, {end}] span {end - begin}", path=path)
    if paired and name in paired:
        real = paired[name]
        pdt, _ = _PAIRED[real]
        if dname != pdt or not tshape or tshape[-1] != 2:
            raise CorruptCheckpointError(
                f"tensor {name!r}: metadata says {dtype_label(real)}, stored as {pdt} pairs, but the "
                f"header has {dname} {shape}", path=path)
        dtype, tshape = real, tshape[:-1]
    return TensorInfo(name, dtype, tshape, data_start + begin, data_start + end)


def parse_header(path: str, f: Any = None) -> Header:
    """Read and validate the header of the safetensors file ``path`` (FormatError or
    CorruptCheckpointError naming the tensor on any inconsistency)."""
    own = f is None
    if own:
        f = open(path, "rb")
    try:
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(
                f"the file is {size} bytes, shorter than the 8-byte header length of a safetensors "
                f"file", path=path, hint="file truncated?")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES:
            raise FormatError(f"the header claims {n} bytes, which no safetensors header has "
                              f"(limit {MAX_HEADER_BYTES // 1000000} MB)", path=path,
                              hint="not a safetensors file, or its first bytes are damaged")
        if 8 + n > size:
            raise CorruptCheckpointError(
                f"the header declares {n} bytes but the file ends after {size - 8}", path=path,
                hint="file truncated?")
        raw = f.read(n)
    finally:
        if own:
            f.close()
    _limits.check_json(raw, path=path, what="the safetensors header")  # json.loads recurses
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"the header is not valid JSON ({e})", path=path,
                                     hint="file damaged?") from None
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"the header is a JSON {type(doc).__name__}, expected an object",
                                     path=path)
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"__metadata__ is a JSON {type(meta).__name__}, expected an object",
                                     path=path)
    data_start = 8 + n
    paired = _paired_from(meta, path)
    tensors = {name: _entry(name, spec, data_start, paired, path) for name, spec in doc.items()}
    spans = sorted(tensors.values(), key=_span_key)
    prev: TensorInfo | None = None
    for t in spans:
        if prev is not None and t.begin < prev.end and t.nbytes and prev.nbytes:
            raise CorruptCheckpointError(
                f"tensors {prev.name!r} (bytes {prev.begin - data_start}-{prev.end - data_start}) and "
                f"{t.name!r} (bytes {t.begin - data_start}-{t.end - data_start}) overlap", path=path,
                hint="the header is damaged")
        if prev is None or t.end > prev.end:
            prev = t
    for t in spans:
        if t.end > size:
            have = max(0, size - t.begin)
            raise CorruptCheckpointError(
                f"tensor {t.name!r} declares {t.nbytes} bytes but the file ends after {have}",
                path=path, hint="file truncated?")
    return Header(tensors, meta, data_start, size)


_span_key = operator.attrgetter("begin", "end")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"key {k!r} appears twice")
            seen.add(k)
    return out


def _paired_from(meta: Mapping[str, Any], path: str) -> dict[str, torch.dtype]:
    raw = meta.get(DTYPES_KEY)
    if raw is None:
        return {}
    try:
        if isinstance(raw, str):
            _limits.check_json(raw, path=path, what="a metadata entry")
        tags = json.loads(raw) if isinstance(raw, str) else raw
        return {str(k): _PAIRED_BY_NAME[v] for k, v in tags.items()}
    except (ValueError, AttributeError, KeyError, TypeError):
        raise CorruptCheckpointError(f"metadata {DTYPES_KEY} is malformed: {str(raw)[:80]!r}",
                                     path=path) from None


@dataclass(frozen=True)
class Alias:
    """A name whose tensor is a view of another stored tensor (``base``), in elements."""

    name: str
    base: str
    shape: tuple[int, ...] | None = None  # None: the base's shape (a plain tie)
    offset: int = 0
    stride: tuple[int, ...] | None = None  # None: contiguous

    def to_json(self) -> Any:
        if self.shape is None and self.offset == 0 and self.stride is None:
            return self.base
        doc: dict[str, Any] = {"base": self.base}
        if self.shape is not None:
            doc["shape"] = list(self.shape)
        if self.offset:
            doc["offset"] = self.offset
        if self.stride is not None:
            doc["stride"] = list(self.stride)
        return doc


def _aliases_from(header: Header, path: str) -> list[Alias]:
    tensors, meta = header.tensors, header.metadata
    out: list[Alias] = []
    raw = meta.get(ALIASES_KEY)
    if raw is not None:
        try:
            if isinstance(raw, str):
                _limits.check_json(raw, path=path, what="a metadata entry")
            doc = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(doc, dict):
                raise TypeError
            for name, spec in doc.items():
                if isinstance(spec, str):
                    spec = {"base": spec}
                base = spec["base"]
                shape = spec.get("shape")
                stride = spec.get("stride")
                out.append(Alias(str(name), str(base),
                                 tuple(int(s) for s in shape) if shape is not None else None,
                                 int(spec.get("offset", 0)),
                                 tuple(int(s) for s in stride) if stride is not None else None))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise CorruptCheckpointError(f"metadata {ALIASES_KEY} is malformed: {str(raw)[:80]!r}",
                                         path=path) from None
    else:  # safetensors.torch.save_model: {dropped name: kept name}
        for k, v in meta.items():
            if isinstance(v, str) and v in tensors and k not in tensors and not k.startswith("torchkeep."):
                out.append(Alias(k, v, None))
    checked = []
    for a in out:
        base = tensors.get(a.base)
        if base is None:
            raise CorruptCheckpointError(f"alias {a.name!r} refers to {a.base!r}, which is not in the file",
                                         path=path)
        if a.name in tensors:
            raise CorruptCheckpointError(f"alias {a.name!r} is also stored as a tensor", path=path)
        shape = a.shape if a.shape is not None else base.shape
        stride = a.stride
        if stride is not None and len(stride) != len(shape):
            raise CorruptCheckpointError(f"alias {a.name!r}: stride {stride} does not fit shape {shape}",
                                         path=path)
        numel = 1
        for s in shape:
            numel *= s
        if any(s < 0 for s in shape) or a.offset < 0 or (stride and any(s < 0 for s in stride)):
            raise CorruptCheckpointError(f"alias {a.name!r}: negative shape, offset or stride", path=path)
        if numel:
            st = stride if stride is not None else _contiguous_stride(shape)
            last = a.offset + sum((n - 1) * s for n, s in zip(shape, st))
            base_numel = 1
            for s in base.shape:
                base_numel *= s
            if last >= base_numel:
                raise CorruptCheckpointError(
                    f"alias {a.name!r} reaches element {last} of {a.base!r}, which has {base_numel}",
                    path=path)
        checked.append(Alias(a.name, a.base, tuple(shape), a.offset, stride))
    return checked


class SafetensorsReader(Reader):
    format = "safetensors"
    description = "safetensors file"

    def __init__(self, path: str | os.PathLike, *, trust: bool = False) -> None:
        super().__init__(path, trust=trust)
        self._header: Header | None = None
        self._mm: mmap.mmap | None = None
        self._mapped = True

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        if os.path.isdir(path):
            return False
        if len(head) >= 10 and head[8:9] == b"{" and head[9:10] in b'"} \t\r\n':
            return True
        # Content too short or too damaged to judge: claim it when the name says safetensors and
        # the length prefix is plausible, so the reader can say precisely what is wrong.
        if not path.endswith(".safetensors"):
            return False
        return len(head) < 10 or struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES

    # -- structure ---------------------------------------------------------------------
    @property
    def header(self) -> Header:
        if self._header is None:
            self._header = parse_header(self.path)
            self.metadata = dict(self._header.metadata)
        return self._header

    def read_tree(self) -> dict[str, TensorRef]:
        h = self.header
        out: dict[str, TensorRef] = {}
        for name, t in h.tensors.items():
            out[name] = TensorRef(shape=t.shape, dtype=t.dtype, reader=self, key=name, storage=name)
        for a in _aliases_from(h, self.path):
            base = h.tensors[a.base]
            out[a.name] = TensorRef(shape=a.shape, dtype=base.dtype, reader=self, key=a.name,
                                    storage=a.base, offset=a.offset, stride=a.stride)
        return out

    # -- bytes -------------------------------------------------------------------------
    def _map(self) -> mmap.mmap | None:
        if self._mm is None and self._mapped:
            h = self.header
            if h.file_size == 0:
                return None
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < h.file_size:
                    raise CorruptCheckpointError("the file shrank while open", path=self.path)
                try:
                    # ACCESS_COPY: private pages, so tensors are writable and the file never changes.
                    self._mm = mmap.mmap(f.fileno(), h.file_size, access=mmap.ACCESS_COPY)
                except (OSError, ValueError, OverflowError) as e:
                    log.debug("%s: cannot map (%s); reading with pread", self.path, e)
                    self._mapped = False
        return self._mm

    def _populate(self, mm: mmap.mmap, spans: list[tuple[int, int]]) -> None:
        """Fault the asked-for byte ranges in with one call per run, instead of one page fault per
        page later; skipped where the kernel lacks MADV_POPULATE_READ."""
        if _POPULATE_READ is None or not hasattr(mm, "madvise"):
            return
        page = mmap.PAGESIZE
        runs: list[list[int]] = []
        for b, e in sorted(spans):
            if e <= b:
                continue
            b -= b % page
            if runs and b <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], e)
            else:
                runs.append([b, e])
        for b, e in runs:
            try:
                mm.madvise(_POPULATE_READ, b, e - b)
            except (OSError, ValueError):
                return

    def _base(self, info: TensorInfo, mm: mmap.mmap | None) -> torch.Tensor:
        """The stored tensor ``info`` as a CPU tensor (zero-copy from the map where possible)."""
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        count = info.nbytes // info.dtype.itemsize
        if mm is not None and info.begin % info.dtype.itemsize == 0:
            flat = torch.frombuffer(mm, dtype=info.dtype, count=count, offset=info.begin)
        else:  # unaligned data (or no map): copy into an aligned buffer
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            if mm is not None:
                buf.numpy()[:] = memoryview(mm)[info.begin:info.end]
            else:
                from torchkeep.read.formats.torchzip import pread_into

                fd = os.open(self.path, os.O_RDONLY)
                try:
                    pread_into(fd, buf, info.begin, path=self.path, what=f"tensor {info.name!r}")
                finally:
                    os.close(fd)
            flat = buf.view(info.dtype)
        return flat.view(info.shape)

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu", *,
             mmap: bool = True) -> list[torch.Tensor]:
        """Read ``refs``; aliases come back as views sharing memory with their base.

        CPU tensors are copy-on-write views of a private map of the file (writable, zero-copy);
        ``mmap=False`` copies them out so that nothing refers to the file afterwards."""
        if not refs:
            return []
        h = self.header
        names = {r.storage if r.storage is not None else r.key for r in refs}
        for n in names:
            if n not in h.tensors:
                raise FormatError(f"no tensor named {n!r} in this file", path=self.path)
        mm = self._map()
        if mm is not None:
            self._populate(mm, [(h.tensors[n].begin, h.tensors[n].end) for n in names])
        dev = torch.device(device)
        bases: dict[str, torch.Tensor] = {}
        out = []
        for r in refs:
            key = r.storage if r.storage is not None else r.key
            base = bases.get(key)
            if base is None:
                base = self._base(h.tensors[key], mm)
                if dev.type != "cpu":
                    base = base.to(dev)
                elif not mmap and mm is not None:
                    base = base.clone()
                bases[key] = base
            if r.offset == 0 and r.stride is None and tuple(r.shape) == tuple(base.shape):
                out.append(base)
            else:
                stride = r.stride if r.stride is not None else _contiguous_stride(r.shape)
                out.append(base.as_strided(r.shape, stride, base.storage_offset() + r.offset)
                           if r.numel else torch.empty(r.shape, dtype=base.dtype, device=base.device))
        return out

    def close(self) -> None:
        # Tensors handed out keep the map alive through their buffers; just drop ours.
        self._mm = None


# -- writing ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """A tensor to be written: its name, torch dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass
class Layout:
    """Where every tensor goes in a safetensors file about to be written."""

    header: bytes            # length prefix + JSON, padded so data starts 8-aligned
    order: list[Spec]        # in data order
    offsets: dict[str, int]  # name -> absolute file offset
    total: int               # file size

    @property
    def data_start(self) -> int:
        return len(self.header)


def storable(dtype: torch.dtype) -> bool:
    return dtype in DTYPE_NAMES or dtype in _PAIRED


def layout(specs: Iterable[Spec], metadata: Mapping[str, str] | None = None,
           aliases: Iterable[Alias] = ()) -> Layout:
    """Plan a safetensors file: header in the given order, data ordered by alignment (widest
    element first, then given order) so every tensor is naturally aligned and there are no
    holes (the safetensors library rejects holes)."""
    specs = list(specs)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    paired = {s.name: dtype_label(s.dtype) for s in specs if s.dtype in _PAIRED}
    if paired:
        meta[DTYPES_KEY] = json.dumps(paired, separators=(",", ":"))
    alias_doc = {a.name: a.to_json() for a in aliases}
    if alias_doc:
        meta[ALIASES_KEY] = json.dumps(alias_doc, separators=(",", ":"))
    for s in specs:
        if not storable(s.dtype):
            raise FormatError(f"tensor {s.name!r} has dtype {dtype_label(s.dtype)}, which safetensors "
                              f"cannot store", hint="convert to a .pt file instead")
    order = sorted(specs, key=lambda s: -_width(s.dtype))
    rel, pos = {}, 0
    for s in order:
        rel[s.name] = pos
        pos += s.nbytes
    doc: dict[str, Any] = {}
    if meta:
        doc["__metadata__"] = meta
    for s in specs:
        name, shape = _stored_dtype(s)
        doc[s.name] = {"dtype": name, "shape": shape, "data_offsets": [rel[s.name], rel[s.name] + s.nbytes]}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pad = (-(8 + len(raw))) % ALIGN
    raw += b" " * pad
    header = struct.pack("<Q", len(raw)) + raw
    start = len(header)
    return Layout(header, order, {k: start + v for k, v in rel.items()}, start + pos)


def _width(dtype: torch.dtype) -> int:
    return _PAIRED[dtype][1].itemsize if dtype in _PAIRED else dtype.itemsize


def _stored_dtype(s: Spec) -> tuple[str, list[int]]:
    if s.dtype in _PAIRED:
        return _PAIRED[s.dtype][0], list(s.shape) + [2]
    name = DTYPE_NAMES[s.dtype]
    if name == "F4":
        if not s.shape:
            raise FormatError(f"tensor {s.name!r}: a 0-d float4 tensor cannot be stored in safetensors")
        return name, list(s.shape[:-1]) + [s.shape[-1] * 2]
    return name, list(s.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
