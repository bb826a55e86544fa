"""Staging: the host copy of a state's tensors that a save writes from, taken before ``save()``
returns so that training can change the live tensors at once.

An asynchronous save that wrote the live tensors would write whatever the next optimizer step left
in them: a checkpoint mixing two steps (the bug behind pytorch #144657 for CPU tensors and
Lightning #21079). So :meth:`Stager.stage` copies every tensor the writer will read (CPU tensors
too) and returns only when every copy has landed.

Buffers are allocated once and reused by the next save: one block of host memory per pool,
carved into one aligned buffer per tensor, keyed by the set of (name, shape, dtype). The pool is
laid out again only when that set changes (usually once, when the optimizer state appears).
Tensors from CUDA go into a *pinned* pool: page-locked memory the GPU's copy engine writes at
full speed without an extra bounce, an anonymous mapping registered with CUDA at its exact size
(``torch.empty(pin_memory=True)`` rounds every block up to a power of two). Everything else goes
into a plain pool; the two share one code path, so the reuse and snapshot rules are tested on
machines without a GPU.

CUDA copies are issued ``non_blocking`` on a side stream per device that first waits for the
device's current stream (so the copy sees every kernel queued before ``save()``), and an event
on that stream is synchronized before :meth:`~Stager.stage` returns. Synchronizing later (in the
writer thread) would let ``save()`` return sooner, but the training stream could then overwrite a
parameter while its copy is in flight, and any other stream, host code or allocator reuse of a
freed tensor would race the copy; the snapshot is only a snapshot once it is complete. Waiting on
the event, not ``torch.cuda.synchronize()``, leaves other streams (data prefetch, collectives)
running. CPU copies run on a few threads while the copy engine works.

One rule for callers: a stager's buffers belong to the latest staged save until it is written;
stage the next save only after that (the manager waits for the previous write first).
"""
from __future__ import annotations

import logging
import mmap
import time
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from torchkeep.errors import StateError

log = logging.getLogger(__name__)

THREADS = 4          # parallel CPU copies into the buffers (memcpy releases the GIL)
BIG = 1 << 20        # CPU copies at least this large go to the thread pool
ALIGN = 64           # byte alignment of each buffer inside its pool (any dtype's item size)

Spec = tuple[tuple[int, ...], torch.dtype]


@dataclass
class StageStats:
    """What one :meth:`Stager.stage` did: tensors and bytes copied (from a device among them),
    bytes newly allocated for buffers, and the wall time until every copy had landed."""

    tensors: int = 0
    copied: int = 0
    nbytes: int = 0
    device_nbytes: int = 0
    allocated: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.nbytes / self.seconds / 2**30 if self.seconds else 0.0
        return (f"staged {self.copied}/{self.tensors} tensors, {self.nbytes / 2**20:.1f} MiB "
                f"({self.device_nbytes / 2**20:.1f} MiB from devices) in "
                f"{self.seconds * 1e3:.1f} ms "
                f"({rate:.2f} GiB/s); {self.allocated / 2**20:.1f} MiB newly allocated")


@dataclass
class Staged:
    """Host tensors that stay unchanged until written (buffers, or live CPU tensors when the save
    is synchronous), the device each came from (for tensors that were not on the CPU), and stats."""

    tensors: dict[str, torch.Tensor]
    devices: dict[str, str] = field(default_factory=dict)
    stats: StageStats = field(default_factory=StageStats)


def layout(specs: Mapping[str, Spec]) -> tuple[dict[str, int], int]:
    """Byte offset of each tensor's buffer in a pool (each aligned to :data:`ALIGN`) and the
    pool's size."""
    offsets, end = {}, 0
    for key, (shape, dtype) in specs.items():
        end = -(-end // ALIGN) * ALIGN
        offsets[key] = end
        end += _nbytes(shape, dtype)
    return offsets, end


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def _unpin(ptr: int) -> None:
    rc = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if rc != 0:  # pragma: no cover - only on a GPU, after a driver error
        log.warning("unpinning staging memory at %#x failed (cudaError %d)", ptr, rc)


class _Pool:
    """One block of host memory carved into a buffer per tensor, reused while the tensors' names,
    shapes and dtypes stay the same; ``pinned`` makes it page-locked for device copies."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.signature: tuple | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.nbytes = 0
        self._memory: torch.Tensor | None = None
        self._unpin: weakref.finalize | None = None

    def buffers_for(self, specs: dict[str, Spec]) -> int:
        """Make :attr:`buffers` fit ``specs``; the bytes newly allocated (0 when reused)."""
        sig = tuple(specs.items())
        if sig == self.signature:
            return 0
        if self.signature is not None and specs:
            log.info("staging: %s pool laid out again (%s)", "pinned" if self.pinned else "plain",
                     _change(dict(self.signature), specs))
        self.release()  # the previous save is written: its buffers are free
        if not specs:
            return 0
        offsets, total = layout(specs)
        mem = self._allocate(total)
        self.buffers = {k: _carve(mem, offsets[k], shape, dtype)
                        for k, (shape, dtype) in specs.items()}
        self.signature, self.nbytes = sig, total
        return total

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if not self.pinned:
            self._memory = torch.empty(nbytes, dtype=torch.uint8)
            return self._memory
        # A private anonymous mapping: page-aligned and no page shared with another allocation, so
        # registering it pins exactly its pages, and the storage starts where the pinning does
        # (Tensor.is_pinned() asks about the storage's first byte).
        span = -(-max(nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        raw = torch.frombuffer(mmap.mmap(-1, span), dtype=torch.uint8)
        ptr = raw.data_ptr()
        rc = int(torch.cuda.cudart().cudaHostRegister(ptr, span, 1))  # 1: portable (every device)
        if rc != 0:
            log.warning("staging: registering %d MiB of pinned memory failed (cudaError %d); using "
                        "torch's pinned allocator, which rounds the block up to a power of two",
                        nbytes >> 20, rc)
            self._memory = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            return self._memory
        self._memory = raw
        self._unpin = weakref.finalize(self, _unpin, ptr)
        self._unpin.atexit = False  # at exit the process's memory goes anyway
        return raw[:nbytes]

    def release(self) -> None:
        """Drop the buffers (and unpin them); tensors still referring to them stay valid."""
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        self._memory, self.buffers, self.signature, self.nbytes = None, {}, None, 0


def _carve(mem: torch.Tensor, offset: int, shape: tuple[int, ...],
           dtype: torch.dtype) -> torch.Tensor:
    n = _nbytes(shape, dtype)
    return mem[offset:offset + n].view(dtype).view(shape)


def _change(old: dict[str, Spec], new: dict[str, Spec]) -> str:
    added = [k for k in new if k not in old]
    gone = [k for k in old if k not in new]
    changed = [k for k in new if k in old and old[k] != new[k]]
    bits = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("new", added), ("gone", gone), ("reshaped", changed)) if keys]
    return "; ".join(bits) or "reordered"


def _plain(t: torch.Tensor) -> bool:
    """A CPU tensor the writer can read as it is."""
    return t.is_contiguous() and not t.is_conj() and not t.is_neg()


class Stager:
    """Copies a save's tensors into reused host buffers (pinned for CUDA tensors) and returns
    once the copies are complete. ``pin=False`` stages CUDA tensors into plain memory."""

    def __init__(self, *, pin: bool = True, threads: int = THREADS) -> None:
        self.pin = pin
        self.threads = threads
        self._plain = _Pool(pinned=False)
        self._pinned = _Pool(pinned=True)
        self._streams: dict[int, torch.cuda.Stream] = {}

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """The current buffers by tensor name (both pools)."""
        return {**self._plain.buffers, **self._pinned.buffers}

    @property
    def nbytes(self) -> int:
        """Host memory held for staging (pinned and plain)."""
        return self._plain.nbytes + self._pinned.nbytes

    def stage(self, tensors: Mapping[str, torch.Tensor], *, copy_cpu: bool = True) -> Staged:
        """Host tensors equal to ``tensors`` now, that stay so when the originals change.

        With ``copy_cpu=False`` (a synchronous save: nothing changes the live tensors before the
        writer is done) contiguous CPU tensors are passed through uncopied.
        """
        t0 = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        devices: dict[str, str] = {}
        specs: dict[bool, dict[str, Spec]] = {False: {}, True: {}}
        for key, t in tensors.items():
            if t.layout != torch.strided or t.is_quantized or t.is_meta:
                kind = f"{t.layout}{' quantized' if t.is_quantized else ''}" \
                       f"{' meta' if t.is_meta else ''}"
                raise StateError(f"cannot stage a {kind} tensor: only dense tensors with their "
                                 f"data are staged", entry=key)
            if t.device.type != "cpu":
                devices[key] = str(t.device)
            elif not copy_cpu and _plain(t):
                out[key] = t
                continue
            pinned = self.pin and t.device.type == "cuda"
            specs[pinned][key] = (tuple(t.shape), t.dtype)
        stats = StageStats(tensors=len(tensors))
        stats.allocated = (self._plain.buffers_for(specs[False])
                           + self._pinned.buffers_for(specs[True]))
        bufs = self.buffers
        # detached: a copy into a buffer must never join the autograd graph (in any thread)
        pairs = [(bufs[k], tensors[k].detach()) for k in tensors if k not in out]
        out.update((k, bufs[k]) for k in tensors if k not in out)
        with torch.no_grad():
            events = self._copy_from_cuda([p for p in pairs if p[1].device.type == "cuda"])
            for buf, t in pairs:
                if t.device.type not in ("cpu", "cuda"):  # other accelerators: a blocking copy
                    buf.copy_(t)
            self._copy_on_cpu([p for p in pairs if p[1].device.type == "cpu"])
            for ev in events:
                ev.synchronize()
        stats.copied = len(pairs)
        stats.nbytes = sum(t.nbytes for _, t in pairs)
        stats.device_nbytes = sum(t.nbytes for _, t in pairs if t.device.type != "cpu")
        stats.seconds = time.perf_counter() - t0
        log.debug("%s", stats)
        return Staged({k: out[k] for k in tensors}, devices, stats)

    def _copy_from_cuda(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """Issue the device-to-host copies on each device's side stream; one event per device."""
        by_device: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for buf, t in pairs:
            by_device.setdefault(t.device.index or 0, []).append((buf, t))
        events = []
        for index, group in by_device.items():
            stream = self._streams.get(index)
            if stream is None:
                stream = self._streams[index] = torch.cuda.Stream(device=index)
            stream.wait_stream(torch.cuda.current_stream(index))  # see what save() was handed
            with torch.cuda.stream(stream):
                for buf, t in group:
                    buf.copy_(t, non_blocking=self.pin)
                ev = torch.cuda.Event()
                ev.record(stream)
            events.append(ev)
        return events

    def _copy_on_cpu(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        big = sorted((p for p in pairs if p[1].nbytes >= BIG), key=lambda p: -p[1].nbytes)
        for buf, t in pairs:
            if t.nbytes < BIG:
                buf.copy_(t)
        if len(big) > 1 and self.threads > 1:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="torchkeep-stage") as pool:
                list(pool.map(lambda p: p[0].copy_(p[1]), big))
        else:
            for buf, t in big:
                buf.copy_(t)

    def release(self) -> None:
        """Free the buffers (the next stage allocates again)."""
        self._plain.release()
        self._pinned.release()
        self._streams.clear()
