"""Convert a checkpoint's model weights to safetensors (or a torch.save file), renamed, cast or
sharded on the way, written atomically and verified against the source before success.

This module plans (names, dtypes, aliases, shards) and verifies; :mod:`torchkeep.look.streamwriter`
streams the tensors into the file one storage at a time, so the weights are never held twice.
Tensors that shared storage in the source are written once; the other names are recorded as
aliases (views into the stored tensor) in the metadata and restored by torchkeep's reader.
While the disk catches up, the written file is re-read through the reader and every name,
shape, dtype, alias and checksum is compared with what the source gave.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from torchkeep.errors import CorruptCheckpointError, FormatError, UnsafeCheckpointError
from torchkeep.look.streamwriter import (_BIG, BATCH_BYTES, BATCH_ITEMS, _crc, _cstride, _Item,
                                         _prepare, _write_safetensors, _write_torch)
from torchkeep.read import keys
from torchkeep.read.formats import safetensors as st
from torchkeep.read.formats.base import MEMORY, Reader, TensorRef
from torchkeep.store.files import atomic_dir, atomic_write, fsync_dir, tmp_name

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


@dataclass
class ConvertResult:
    """What :func:`convert` wrote and how it got there."""

    src: str
    dst: str
    format: str                                  # 'safetensors' | 'torch-zip' | 'hf-sharded'
    files: list[str] = field(default_factory=list)
    tensors: int = 0                             # names written, aliases included
    stored: int = 0                              # tensors whose bytes were written
    nbytes: int = 0                              # tensor bytes written
    aliases: dict[str, str] = field(default_factory=dict)     # alias -> stored tensor it views
    renamed: dict[str, str] = field(default_factory=dict)     # source name -> new name
    cast: list[str] = field(default_factory=list)             # names whose dtype changed
    skipped: dict[str, str] = field(default_factory=dict)     # name -> why it was not written
    unshared: list[str] = field(default_factory=list)         # shared in the source, copied here
    wrapper: str | None = None                   # where the weights sat in the source
    prefixes: list[str] = field(default_factory=list)         # wrapper prefixes stripped
    verified: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f" from '{self.wrapper}'" if self.wrapper else ""
        pre = f", stripped {', '.join(self.prefixes)}" if self.prefixes else ""
        files = f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        check = "verified against the source" if self.verified else "NOT verified"
        lines = [f"wrote {self.dst} ({self.format}): {self.tensors} tensors{where}{pre}, "
                 f"{self.nbytes:,} bytes in {files}, {check} in {self.seconds:.1f}s"]
        if self.aliases:
            shown = ", ".join(f"{a} → {b}" for a, b in list(self.aliases.items())[:4])
            more = f" (+{len(self.aliases) - 4} more)" if len(self.aliases) > 4 else ""
            lines.append(f"  shared tensors written once: {shown}{more}")
        if self.renamed:
            lines.append(f"  renamed {len(self.renamed)} tensors")
        if self.cast:
            lines.append(f"  cast {len(self.cast)} tensors")
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        if self.unshared:
            lines.append(f"  {len(self.unshared)} tensors shared storage in the source but are "
                         f"written as separate copies: {', '.join(self.unshared[:4])}")
        return "\n".join(lines)


def parse_size(size: int | str | None) -> int | None:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, 1024 -> 1024 (GB = 10**9, as HF does)."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size <= 0:
            raise ValueError(f"shard size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {size!r} (examples: 2GB, 500MB, 1GiB, 1048576)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return n


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _CASTABLE:
            raise ValueError(f"cannot cast to {dtype}; choose one of bf16, fp16, fp32, fp64")
        return dtype
    d = _DTYPE_NAMES.get(str(dtype).lower().replace("torch.", ""))
    if d is None:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of bf16, fp16, fp32, fp64")
    return d


# -- the source --------------------------------------------------------------------------

def _memory_ref(t: torch.Tensor) -> TensorRef:
    """A ref to an in-memory tensor that keeps its storage identity (for alias detection)."""
    t = t.detach()
    shares = t.numel() > 0 and t.device.type != "meta"
    return TensorRef(shape=tuple(t.shape), dtype=t.dtype, reader=MEMORY, key=t,
                     storage=f"mem:{t.untyped_storage().data_ptr()}" if shares else None,
                     offset=t.storage_offset(), stride=tuple(t.stride()))


def _source(src: Any, trust: bool) -> tuple[str, dict[str, Any], Any, str | None, list[str]]:
    """(description, name -> TensorRef or plain value, closer, wrapper, prefixes)."""
    from torchkeep.read.checkpoint import Checkpoint
    from torchkeep.read.checkpoint import open as open_checkpoint

    if isinstance(src, Mapping):
        flat = {str(k): (_memory_ref(v) if isinstance(v, torch.Tensor) else v) for k, v in src.items()}
        return "<state dict>", flat, None, None, []
    ck = src if isinstance(src, Checkpoint) else open_checkpoint(src, trust=trust)
    closer = None if isinstance(src, Checkpoint) else ck
    wrapper, flat, prefixes = ck.wrapper, ck.state_items(), ck.prefixes
    if wrapper is None:
        if closer is not None:
            closer.close()
        raise FormatError("found no model weights to convert (no mapping of names to tensors)",
                          path=ck.path, hint="torchkeep inspect shows what the file holds")
    from torchkeep.read.formats.deepspeed import zero3_placeholders
    from torchkeep.read.unpickler import Opaque

    empty = zero3_placeholders(ck.tree)
    if empty:
        if closer is not None:
            closer.close()
        raise FormatError(
            f"{len(empty)} parameters ({', '.join(empty[:3])}) are empty placeholders: this is a "
            "DeepSpeed ZeRO-3 model-states file, whose weights live in the optimizer partitions",
            path=ck.path, hint="convert the DeepSpeed run folder (with 'latest') or its global_stepN "
                               "folder instead")
    from torchkeep.read.formats.quantized import QuantizedRef

    quant = [k for k, v in flat.items() if isinstance(v, QuantizedRef)]
    if quant:
        if closer is not None:
            closer.close()
        raise FormatError(f"{len(quant)} weights are quantized ({quant[0]}: {flat[quant[0]].scheme}); "
                          "convert writes plain tensors only", path=ck.path,
                          hint="read them with Checkpoint.state_dict() (or dequantize=True for float)")
    opaque = {k: v for k, v in flat.items() if isinstance(v, Opaque)}
    if opaque:
        if not trust:
            globs = sorted({o.global_name for o in opaque.values()})
            raise UnsafeCheckpointError(
                f"weights {', '.join(sorted(opaque)[:5])} need globals that are not allowlisted: "
                f"{', '.join(globs)}", globals=globs, path=ck.path)
        flat = {k: (_memory_ref(v) if isinstance(v, torch.Tensor) else v)
                for k, v in ck.state_dict().items()}
    return ck.path, dict(flat), closer, wrapper, list(prefixes)


def _plan(flat: Mapping[str, Any], strip_prefix: str | None, add_prefix: str | None,
          rename: Iterable[Any], dtype: torch.dtype | None, res: ConvertResult) -> list[_Item]:
    rules = keys.compile_rules(rename)
    items: list[_Item] = []
    seen: dict[str, str] = {}
    for src_name, v in flat.items():
        if not isinstance(v, TensorRef):
            res.skipped[src_name] = f"not a tensor ({type(v).__name__})"
            continue
        if isinstance(v.key, torch.Tensor) and v.key.device.type == "meta":
            res.skipped[src_name] = "meta tensor without data"
            continue
        name = src_name
        if strip_prefix:
            name = keys.strip_prefix(name, strip_prefix)
        name = keys.apply_rules(name, rules)
        if add_prefix:
            name = keys.add_prefix(name, add_prefix)
        if not name:
            raise ValueError(f"renaming {src_name!r} leaves an empty name")
        if name in seen:
            raise ValueError(f"names collide after renaming: {seen[name]!r} and {src_name!r} both "
                             f"become {name!r}")
        seen[name] = src_name
        if name != src_name:
            res.renamed[src_name] = name
        out = v.dtype
        if dtype is not None and v.dtype in _CASTABLE and v.dtype != dtype:
            out = dtype
            res.cast.append(name)
        group = (id(v.reader), v.storage) if v.storage is not None and v.numel else None
        items.append(_Item(src_name, name, v, out, group))
    _find_aliases(items, res)
    return items


def _find_aliases(items: list[_Item], res: ConvertResult) -> None:
    """Mark items that view another item's stored bytes; the rest are written."""
    groups: dict[Any, list[_Item]] = {}
    for it in items:
        if it.group is not None:
            groups.setdefault(it.group, []).append(it)
    for members in groups.values():
        if len(members) < 2:
            continue
        bases: list[_Item] = []
        copies: dict[tuple, _Item] = {}
        for it in sorted(members, key=lambda i: -i.ref.numel):  # stable: source order on ties
            alias = next((a for a in (_alias_of(it, b) for b in bases) if a is not None), None)
            if alias is None:
                ident = (it.ref.offset, tuple(it.ref.shape), it.ref.stride, it.ref.dtype, it.dtype)
                twin = copies.get(ident)
                if twin is not None:
                    alias = st.Alias(it.name, twin.name)
                elif it.contiguous:
                    bases.append(it)
                else:
                    copies[ident] = it
            it.alias = alias
        written = [m for m in members if m.alias is None]
        if len(written) > 1:  # e.g. disjoint slices of one buffer: each is written by itself
            res.unshared.extend(m.name for m in written)


def _alias_of(it: _Item, base: _Item) -> st.Alias | None:
    a, b = it.ref, base.ref
    if a.dtype != b.dtype or it.dtype != base.dtype or not a.numel:
        return None
    rel = a.offset - b.offset
    if rel < 0:
        return None
    stride = tuple(a.stride) if a.stride is not None else _cstride(a.shape)
    last = rel + sum((n - 1) * s for n, s in zip(a.shape, stride))
    if last >= b.numel:
        return None
    if rel == 0 and tuple(a.shape) == tuple(b.shape) and it.contiguous:
        return st.Alias(it.name, base.name)
    return st.Alias(it.name, base.name, tuple(a.shape), rel,
                    None if stride == _cstride(a.shape) else stride)


# -- verification ------------------------------------------------------------------------

def _expected_alias_crcs(items: Sequence[_Item]) -> dict[str, int]:
    """Checksums of the aliases as the source has them (cast like their base)."""
    crcs: dict[str, int] = {}
    by_name = {it.name: it for it in items}
    for it in items:
        a = it.alias
        if a is None:
            continue
        base = by_name[a.base]
        if a.shape is None:
            crcs[it.name] = base.crc
        else:
            crcs[it.name] = _crc(_prepare(it.ref.reader.load([it.ref], "cpu")[0], it.dtype))
    return crcs


def _verify(reader: Reader, items: Sequence[_Item], where: str) -> None:
    """Re-read what was written and compare it with the source: names, shapes, dtypes, aliasing
    and a CRC-32 of every tensor's bytes. Any difference raises CorruptCheckpointError."""
    from torchkeep.read.tree import walk

    flat = {n: v for n, v in walk(reader.read_tree()) if isinstance(v, TensorRef)}
    want = {it.name: it for it in items}
    missing = [n for n in want if n not in flat]
    extra = [n for n in flat if n not in want]
    if missing or extra:
        raise CorruptCheckpointError(
            f"verification failed: {len(missing)} tensors missing ({', '.join(missing[:3])}) and "
            f"{len(extra)} unexpected ({', '.join(extra[:3])}) in what was written", path=where)
    alias_crcs = _expected_alias_crcs(items)
    by_reader: dict[int, tuple[Reader, list[str]]] = {}
    for n, ref in flat.items():
        it = want[n]
        if tuple(ref.shape) != tuple(it.ref.shape) or ref.dtype != it.dtype:
            raise CorruptCheckpointError(
                f"verification failed: {n!r} was written as {st.dtype_label(ref.dtype)} "
                f"{list(ref.shape)}, expected {st.dtype_label(it.dtype)} {list(it.ref.shape)}", path=where)
        if it.alias is not None:
            base_ref = flat[it.alias.base]
            if ref.storage is None or ref.storage != base_ref.storage or ref.reader is not base_ref.reader:
                raise CorruptCheckpointError(
                    f"verification failed: {n!r} should share storage with {it.alias.base!r}", path=where)
        by_reader.setdefault(id(ref.reader), (ref.reader, []))[1].append(n)
    workers = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else (os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers, thread_name_prefix="torchkeep-verify") as pool:
        for r, names in by_reader.values():
            # safetensors files are mapped, so loading all refs costs no copy; torch files are
            # read in batches of about BATCH_BYTES to keep memory bounded.
            chunks = [names] if r.format == "safetensors" else _batches(names, flat)
            for chunk in chunks:
                tensors = r.load([flat[n] for n in chunk], "cpu")
                crcs = [pool.submit(_crc, t) if t.nbytes >= _BIG else _crc(t) for t in tensors]
                for n, got in zip(chunk, (c if isinstance(c, int) else c.result() for c in crcs)):
                    it = want[n]
                    if got != (it.crc if it.alias is None else alias_crcs[n]):
                        raise CorruptCheckpointError(
                            f"verification failed: the bytes of {n!r} read back differ from the "
                            f"source", path=where,
                            hint="disk or memory error? the destination was not replaced")
                del tensors


def _batches(names: Sequence[str], flat: Mapping[str, TensorRef]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for n in names:
        if out[-1] and (size + flat[n].nbytes > BATCH_BYTES or len(out[-1]) >= BATCH_ITEMS):
            out.append([])
            size = 0
        out[-1].append(n)
        size += flat[n].nbytes
    return out


# -- sharding ----------------------------------------------------------------------------

def _shards(items: Sequence[_Item], limit: int) -> list[list[_Item]]:
    """Split in source order into shards of at most ``limit`` bytes (a bigger tensor gets a
    shard of its own); aliases go with the tensor they view."""
    out: list[list[_Item]] = []
    cur: list[_Item] = []
    size = 0
    for it in items:
        if it.alias is not None:
            continue
        if cur and size + it.nbytes > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it.nbytes
    if cur or not out:
        out.append(cur)
    home = {it.name: i for i, shard in enumerate(out) for it in shard}
    for it in items:
        if it.alias is not None:
            out[home[it.alias.base]].append(it)
    return out


# -- the entry point ---------------------------------------------------------------------

def convert(src: Any, dst: str | os.PathLike, *, strip_prefix: str | None = None,
            add_prefix: str | None = None, rename: Iterable[Any] = (),
            dtype: str | torch.dtype | None = None, max_shard_size: int | str | None = None,
            trust: bool = False, format: str | None = None, overwrite: bool = False,
            on_progress: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Write the model weights of ``src`` (a path, an open Checkpoint, or a mapping of names to
    tensors) to ``dst``.

    The weights are what :meth:`Checkpoint.state_dict` finds (wrapper prefixes stripped); names
    are then rewritten by ``strip_prefix``, the ``rename`` rules ('REGEX=REPL', in order) and
    ``add_prefix``. ``dtype`` casts float16/bfloat16/float32/float64 tensors (integers, bools and
    float8 are kept). The output is safetensors unless ``dst`` ends in .pt/.pth/.bin/.ckpt or
    ``format='torch'``; with ``max_shard_size`` ('2GB') ``dst`` is a folder of shards plus an HF
    style index. Everything is written under a temporary name, fsynced, verified against the
    source and only then renamed into place; ``dst`` is replaced only with ``overwrite=True``.
    """
    t0 = time.perf_counter()
    dst = os.fspath(dst)
    limit = parse_size(max_shard_size)
    cast_to = parse_dtype(dtype)
    fmt = format or ("torch" if dst.endswith(TORCH_SUFFIXES) and limit is None else "safetensors")
    if fmt not in ("safetensors", "torch"):
        raise ValueError(f"unknown output format {fmt!r} (safetensors or torch)")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(17, "destination exists (pass overwrite=True, CLI --force, to replace it)", dst)
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise FileNotFoundError(2, f"its folder {parent} does not exist (create it first)", dst)
    if limit is None and os.path.isdir(dst):
        raise ValueError(f"{dst}: is a folder; give a file name, or --max-shard-size for a sharded folder")
    desc, flat, closer, wrapper, prefixes = _source(src, trust)
    res = ConvertResult(src=desc, dst=dst, format="hf-sharded" if limit else
                        ("torch-zip" if fmt == "torch" else "safetensors"),
                        wrapper=wrapper, prefixes=prefixes)
    try:
        items = _plan(flat, strip_prefix, add_prefix, rename, cast_to, res)
        _refuse_empty(items, res, desc)
        if fmt == "safetensors":
            for it in items:
                if not st.storable(it.dtype):
                    raise FormatError(f"tensor {it.src!r} has dtype {st.dtype_label(it.dtype)}, which "
                                      f"safetensors cannot store", path=desc,
                                      hint="convert to a .pt file instead")
        total = sum(it.nbytes for it in items if it.alias is None)
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if on_progress is not None:
                on_progress(done, total)

        meta = _carried_metadata(closer or src)
        if limit is None:
            _convert_file(items, dst, fmt, meta, tick, res)
        else:
            _convert_sharded(items, dst, fmt, limit, meta, tick, res, overwrite)
    finally:
        if closer is not None:
            closer.close()
    res.tensors = len(items)
    res.stored = sum(1 for it in items if it.alias is None)
    res.aliases = {it.name: it.alias.base for it in items if it.alias is not None}
    res.verified = True
    res.seconds = time.perf_counter() - t0
    return res


def _refuse_empty(items: Sequence[_Item], res: ConvertResult, desc: str) -> None:
    """Refuse to write a file without data: no tensors at all, or only empty ones."""
    if not items:
        why = "; ".join(f"{n}: {w}" for n, w in list(res.skipped.items())[:3])
        raise FormatError("no tensors to write" + (f" (skipped {len(res.skipped)}: {why})" if why else
                                                   " (the weights mapping is empty)"), path=desc)
    if all(it.ref.numel == 0 for it in items):
        shapes = sorted({tuple(it.ref.shape) for it in items})
        zero3 = any(s == (0,) for s in shapes)
        raise FormatError(
            f"all {len(items)} tensors are empty (shapes {', '.join(map(str, shapes[:3]))}); "
            "the file would hold no weights" + (
                ": (0,) placeholders are what a DeepSpeed ZeRO-3 model-states file keeps, its "
                "weights live in the optimizer partitions" if zero3 else ""), path=desc,
            hint="open the DeepSpeed run folder (with 'latest') or its global_stepN folder instead"
            if zero3 else "torchkeep inspect shows what the file holds")


def _carried_metadata(src: Any) -> dict[str, str]:
    """safetensors metadata of the source worth keeping (never torchkeep's own keys)."""
    meta = {"format": "pt"}
    reader = getattr(src, "reader", None)
    if reader is not None and getattr(reader, "format", None) == "safetensors":
        for k, v in reader.metadata.items():
            if isinstance(v, str) and not k.startswith("torchkeep."):
                meta[k] = v
        # save_model's {dropped: kept} entries describe the source's ties, not ours.
        names = set(reader.header.tensors)
        meta = {k: v for k, v in meta.items() if not (v in names and k not in names)}
    return meta


def _convert_file(items: list[_Item], dst: str, fmt: str, meta: dict[str, str],
                  tick: Callable[[int], None], res: ConvertResult) -> None:
    with atomic_write(dst) as f:
        if fmt == "safetensors":
            sync, res.nbytes = _write_safetensors(f, items, meta, tick)
            reader: Reader = st.SafetensorsReader(f.name)
        else:
            from torchkeep.read.formats.torchzip import TorchZipReader

            sync, res.nbytes = _write_torch(f, items, tick)
            reader = TorchZipReader(f.name)
        try:
            _verify(reader, items, dst)
        finally:
            reader.close()
            sync.result()  # type: ignore[attr-defined]
    res.files = [dst]


def _convert_sharded(items: list[_Item], dst: str, fmt: str, limit: int, meta: dict[str, str],
                     tick: Callable[[int], None], res: ConvertResult, overwrite: bool) -> None:
    from torchkeep.read.formats.hfindex import ShardedReader

    shards = _shards(items, limit)
    n = len(shards)
    stem, ext = ("model", ".safetensors") if fmt == "safetensors" else ("pytorch_model", ".bin")
    names = [f"{stem}{ext}"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}{ext}" for i in range(n)]
    build = tmp_name(dst) if os.path.exists(dst) else dst
    with atomic_dir(build) as folder:
        open_files: list[tuple[Any, Any]] = []
        try:
            for shard, name in zip(shards, names):
                f = open(os.path.join(folder, name), "wb")
                open_files.append((f, None))
                if fmt == "safetensors":
                    sync, nb = _write_safetensors(f, shard, meta, tick)
                else:
                    sync, nb = _write_torch(f, shard, tick)
                open_files[-1] = (f, sync)
                res.nbytes += nb
            _write_index(folder, n, shards, names, stem, ext, res.nbytes)
            reader = ShardedReader(folder)
            try:
                _verify(reader, items, dst)
            finally:
                reader.close()
        finally:
            for f, sync in open_files:
                if sync is not None:
                    sync.join()
                f.close()
        for f, sync in open_files:
            sync.result()
    if build != dst:  # replacing an existing folder: swap it out, then remove the old one
        old = tmp_name(dst)
        os.rename(dst, old)
        os.rename(build, dst)
        fsync_dir(os.path.dirname(os.path.abspath(dst)))
        shutil.rmtree(old, ignore_errors=True)
    res.files = [os.path.join(dst, nm) for nm in sorted(os.listdir(dst))]


def _write_index(folder: str, n: int, shards: Sequence[Sequence[_Item]], names: Sequence[str],
                 stem: str, ext: str, total: int) -> None:
    """The HF index naming each stored tensor's shard (aliases live in their shard's metadata)."""
    if n < 2:
        return
    weight_map = {it.name: name for shard, name in zip(shards, names) for it in shard
                  if it.alias is None}
    doc = {"metadata": {"total_size": total, "format": "pt"}, "weight_map": weight_map}
    with open(os.path.join(folder, f"{stem}{ext}.index.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

