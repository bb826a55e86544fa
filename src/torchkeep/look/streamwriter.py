"""Streams planned tensors into one safetensors or torch.save file for :mod:`torchkeep.convert`:
reading ahead, casting, checksumming and writing overlap, and the kernel writes back behind them
(``sync_file_range``) with a final fsync in the background, so a big file is durable soon after
its last byte. Each written tensor's CRC-32 is recorded on its item for verification.
"""
from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.read.formats import safetensors as st
from torchkeep.read.formats.base import TensorRef

SYNC_EVERY = 64 << 20  # bytes written between background flushes


# -- the planned tensors ------------------------------------------------------------------

@dataclass(eq=False)
class _Item:
    src: str                    # name in the source (after wrapper prefixes were stripped)
    name: str                   # name written
    ref: TensorRef
    dtype: torch.dtype          # written dtype
    group: Any = None           # storage identity; None when the tensor shares nothing
    alias: st.Alias | None = None
    crc: int | None = None

    @property
    def contiguous(self) -> bool:
        return self.ref.stride is None or tuple(self.ref.stride) == _cstride(self.ref.shape) \
            or self.ref.numel <= 1

    @property
    def nbytes(self) -> int:
        return self.ref.numel * self.dtype.itemsize


def _cstride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))



# -- reading the source tensor by tensor --------------------------------------------------

class _Feeder:
    """Hands out stored items as contiguous CPU tensors in their written dtype, in the order
    they are written. Items are read in batches (consecutive items of one reader, up to
    BATCH_BYTES) so per-call overhead is paid once per batch, and every stored item of a shared
    storage is read with the first, so a storage is read once; memory stays bounded by a batch."""

    def __init__(self, order: Sequence[_Item]) -> None:
        self._order = [it for it in order if it.alias is None]
        self._pos = {id(it): i for i, it in enumerate(self._order)}
        self._groups: dict[Any, list[_Item]] = {}
        for it in self._order:
            if it.group is not None:
                self._groups.setdefault(it.group, []).append(it)
        self._cache: dict[int, torch.Tensor] = {}

    def get(self, it: _Item, out: torch.Tensor | None = None) -> torch.Tensor:
        """The item's tensor; with ``out`` (a uint8 buffer of at least ``it.nbytes``) a cast or
        a gather of a non-contiguous tensor writes into it instead of fresh memory."""
        t = self._cache.pop(id(it), None)
        if t is None:
            batch = self._batch(self._pos[id(it)])
            for b, x in zip(batch, batch[0].ref.reader.load([b.ref for b in batch], "cpu")):
                self._cache[id(b)] = x
            t = self._cache.pop(id(it))
        t = t.detach()
        if out is not None and t.numel() and t.device.type == "cpu" and (
                t.dtype != it.dtype or not t.is_contiguous()):
            dst = out[:it.nbytes].view(it.dtype).view(t.shape)
            dst.copy_(t)
            return dst
        return _prepare(t, it.dtype)

    def _batch(self, i: int) -> list[_Item]:
        first = self._order[i]
        reader = first.ref.reader
        batch, seen, size = [], set(), 0
        for it in self._order[i:]:
            if it.ref.reader is not reader or (batch and (size + it.nbytes > BATCH_BYTES
                                                          or len(batch) >= BATCH_ITEMS)):
                break
            for m in (self._groups.get(it.group, [it]) if it.group is not None else [it]):
                if id(m) not in seen and id(m) not in self._cache:
                    seen.add(id(m))
                    batch.append(m)
                    size += m.nbytes
        return batch


BATCH_BYTES = 64 << 20  # source bytes read per reader call
BATCH_ITEMS = 1024
RUN_BYTES = 16 << 20  # bytes handed from the reading thread to the writer at a time
RUN_ITEMS = 512


def _prepare(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(st.tensor_bytes(t.contiguous()))


def _view(base: torch.Tensor, a: st.Alias) -> torch.Tensor:
    if a.shape is None:
        return base
    stride = a.stride if a.stride is not None else _cstride(a.shape)
    if not _prod(a.shape):
        return torch.empty(a.shape, dtype=base.dtype)
    return base.as_strided(a.shape, stride, base.storage_offset() + a.offset)


def _prod(xs: Sequence[int]) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


# -- durable writing ---------------------------------------------------------------------

class _Flusher:
    """Starts writeback of a file being written every SYNC_EVERY bytes, from a background thread,
    so the disk works while the next tensors are read and checksummed instead of all at the end.

    Uses Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which queues the pages for writing
    without waiting and without a journal commit; elsewhere writeback is left to the final fsync.
    """

    def __init__(self, f: Any) -> None:
        self._f = f
        self._fd = f.fileno()
        self._start = f.tell()
        self._queued = self._start
        self._pos = self._start
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        if _sync_file_range is not None:
            self._thread = threading.Thread(target=self._run, name="torchkeep-flush", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                break
            end = self._pos
            if end > self._queued:
                _sync_file_range(self._fd, self._queued, end - self._queued, 2)  # SYNC_FILE_RANGE_WRITE
                self._queued = end

    def wrote(self, pos: int) -> None:
        """The file now holds ``pos`` bytes (written to the OS, not buffered)."""
        self._pos = pos
        if self._thread is not None and pos - self._queued >= SYNC_EVERY:
            self._wake.set()

    def finish_async(self) -> "_Call":
        """Stop the periodic writeback and fsync the whole file in the background."""
        self._f.flush()
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join()
        t = _Call(lambda: os.fsync(self._fd))
        t.start()
        return t


def _load_sync_file_range() -> Callable[..., int] | None:
    if not hasattr(os, "sched_getaffinity"):  # Linux only
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_sync_file_range = _load_sync_file_range()
_BIG = 1 << 20  # tensors at least this large are checksummed in a helper thread while written


class _Call(threading.Thread):
    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True, name="torchkeep-fsync")
        self._fn = fn
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as e:  # re-raised by result()
            self.error = e

    def result(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _aligned(n: int) -> int:
    return -(-n // 64) * 64


def _runs(order: Sequence[_Item], nbytes: int = RUN_BYTES, items: int = RUN_ITEMS) -> list[list[_Item]]:
    """Consecutive items grouped into runs of about ``nbytes`` (or ``items``) each."""
    runs: list[list[_Item]] = [[]]
    size = 0
    for it in order:
        if runs[-1] and (size >= nbytes or len(runs[-1]) >= items):
            runs.append([])
            size = 0
        runs[-1].append(it)
        size += it.nbytes
    return [r for r in runs if r]


def _write_safetensors(f: Any, items: Sequence[_Item], metadata: Mapping[str, str],
                       tick: Callable[[int], None]) -> tuple[_Call, int]:
    """Stream ``items`` (stored ones; their aliases ride in the metadata) into ``f``.

    Three things overlap: a helper thread reads (and casts) the next run of tensors, the main
    thread writes the current one while another helper checksums it (zlib, torch and file
    writes all release the GIL), and the kernel writes earlier runs to disk (_Flusher)."""
    stored = [it for it in items if it.alias is None]
    aliases = [it.alias for it in items if it.alias is not None]
    lay = st.layout([st.Spec(it.name, it.dtype, tuple(it.ref.shape)) for it in stored],
                    metadata, aliases)
    by_name = {it.name: it for it in stored}
    order = [by_name[spec.name] for spec in lay.order]
    feeder = _Feeder(order)
    runs = _runs(order)
    f.write(lay.header)
    f.flush()
    flusher = _Flusher(f)
    written = 0
    with ThreadPoolExecutor(1, thread_name_prefix="torchkeep-read") as ahead, \
            ThreadPoolExecutor(1, thread_name_prefix="torchkeep-crc") as summer:
        # Casts and gathers go into two scratch buffers used in turn (the reader fills one
        # while the writer drains the other): fresh memory for every tensor would cost a page
        # fault per 4 KiB, more than the cast itself.
        scratch: list[torch.Tensor | None] = [None, None]

        def fetch(run: list[_Item], slot: int) -> list[torch.Tensor]:
            need = sum(_aligned(it.nbytes) for it in run if it.dtype != it.ref.dtype or not it.contiguous)
            buf = scratch[slot]
            if need and (buf is None or buf.numel() < need):
                buf = scratch[slot] = torch.empty(need, dtype=torch.uint8)
            out, off = [], 0
            for it in run:
                if need and (it.dtype != it.ref.dtype or not it.contiguous):
                    out.append(feeder.get(it, buf[off:]))
                    off += _aligned(it.nbytes)
                else:
                    out.append(feeder.get(it))
            return out

        next_run = ahead.submit(fetch, runs[0], 0) if runs else None
        for i, run in enumerate(runs):
            tensors = next_run.result()
            next_run = ahead.submit(fetch, runs[i + 1], (i + 1) % 2) if i + 1 < len(runs) else None
            for it, t in zip(run, tensors):
                mv = st.tensor_bytes(t)
                fut = summer.submit(zlib.crc32, mv) if len(mv) >= _BIG else None
                f.write(mv)
                it.crc = fut.result() if fut is not None else zlib.crc32(mv)
                written += len(mv)
                tick(len(mv))
            f.flush()
            flusher.wrote(lay.data_start + written)
            del tensors, mv
    if f.tell() != lay.total:
        raise CorruptCheckpointError(f"wrote {f.tell()} bytes but planned {lay.total}", path=f.name)
    return flusher.finish_async(), written


def _write_torch(f: Any, items: Sequence[_Item], tick: Callable[[int], None]) -> tuple[_Call, int]:
    feeder = _Feeder(items)
    stored: dict[str, torch.Tensor] = {}
    written = 0
    for it in items:
        if it.alias is None:
            t = stored[it.name] = feeder.get(it)
            it.crc = _crc(t)
            written += t.nbytes
            tick(t.nbytes)
    obj = {}
    for it in items:
        obj[it.name] = stored[it.name] if it.alias is None else _view(stored[it.alias.base], it.alias)
    torch.save(obj, f)
    f.flush()
    t = _Call(lambda: os.fsync(f.fileno()))
    t.start()
    return t, written
