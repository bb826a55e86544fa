"""Per-tensor statistics, histograms and before/after change, computed in streaming fashion.

A checkpoint is processed one storage at a time and every tensor chunk by chunk, accumulating
in float64 (Chan's parallel update for the variance), so memory stays bounded by the largest
storage plus one chunk: with a memory-mapped format a checkpoint larger than memory can be
reported. NaN and Inf are counted, and the other statistics are over the finite values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from torchkeep.look.diffing import TensorDiff, compare
from torchkeep.read.formats.base import TensorRef

#: Elements per chunk: 4 Mi elements is 32 MiB once widened to float64.
DEFAULT_CHUNK = 1 << 22
DEFAULT_BINS = 48

# Buffers whose values are legitimately large or constant (BatchNorm statistics, counters).
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Histogram:
    """Counts of the finite values in ``len(counts)`` equal bins spanning [lo, hi]."""

    lo: float
    hi: float
    counts: list[int]

    @property
    def edges(self) -> list[float]:
        n = len(self.counts)
        return [self.lo + (self.hi - self.lo) * i / n for i in range(n + 1)]


@dataclass(frozen=True)
class Thresholds:
    """When a tensor is flagged. Only floating tensors are judged; integer and bool tensors are
    counters and masks whose values say nothing about training health.

    - ``nonfinite``: any NaN or Inf.
    - ``exploded``: max |x| above ``explode_at`` (BatchNorm running statistics excepted).
    - ``dead``: a matrix or kernel (2 dims or more) that is all zeros or constant (std at most
      ``dead_std`` absolute or ``dead_rstd`` times |mean|). Vectors are not judged: zero biases
      and unit norm weights are how layers start.
    """

    explode_at: float = 1e3
    dead_std: float = 1e-8
    dead_rstd: float = 1e-6


@dataclass
class TensorStats:
    """Statistics of one tensor. ``mean``/``std``/``min``/``max``/``abs_max`` are over the finite
    values (None when there are none); ``std`` is the population standard deviation."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    abs_max: float | None = None
    l2: float = 0.0          # Euclidean norm of the finite values
    zeros: int = 0
    nan: int = 0
    inf: int = 0
    flags: list[str] = field(default_factory=list)
    histogram: Histogram | None = None
    error: str | None = None  # why no statistics could be computed (unsupported dtype)

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def finite(self) -> int:
        return self.numel - self.nan - self.inf


# -- chunking --------------------------------------------------------------------------------
def chunks(t: torch.Tensor, size: int = DEFAULT_CHUNK) -> Iterator[torch.Tensor]:
    """1-d pieces of ``t`` of at most ``size`` elements, in logical order.

    The cut points depend only on the shape, so two tensors of the same shape are cut alike
    (whatever their strides); pieces of a contiguous tensor are views, not copies.
    """
    if t.numel() == 0:
        return
    if t.dim() <= 1:
        flat = t.reshape(-1)
        for i in range(0, flat.numel(), size):
            yield flat[i:i + size]
        return
    per_row = math.prod(t.shape[1:])
    if per_row >= size:
        for i in range(t.shape[0]):
            yield from chunks(t[i], size)
        return
    step = max(1, size // per_row)
    for i in range(0, t.shape[0], step):
        yield t[i:i + step].reshape(-1)


def _values(chunk: torch.Tensor) -> torch.Tensor:
    """The chunk's values as float64: bool as 0/1, complex as magnitude, quantized dequantized."""
    if chunk.is_quantized:
        chunk = chunk.dequantize()
    if chunk.is_complex():
        chunk = chunk.abs()
    return chunk.to(torch.float64)


def _is_floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


# -- one tensor ------------------------------------------------------------------------------
class RunningStats:
    """Accumulates statistics over chunks of one tensor (float64, numerically stable)."""

    def __init__(self) -> None:
        self.count = 0      # finite values seen
        self.mean = 0.0
        self.m2 = 0.0       # sum of squared deviations from the mean
        self.sumsq = 0.0
        self.min: float | None = None
        self.max: float | None = None
        self.zeros = 0
        self.nan = 0
        self.inf = 0

    def update(self, chunk: torch.Tensor) -> None:
        """Add a 1-d chunk of any dtype."""
        if chunk.is_quantized:
            chunk = chunk.dequantize()
        self.zeros += _zeros(chunk)
        x = _values(chunk)
        total = float(x.sum())
        if not math.isfinite(total) and _is_floating(chunk.dtype):
            # a NaN or Inf somewhere (a finite sum proves there is none): count them, drop them
            finite = torch.isfinite(x)
            bad = x.numel() - int(finite.sum())
            if bad:
                n_nan = int(torch.isnan(x).sum())
                self.nan += n_nan
                self.inf += bad - n_nan
                x = x[finite]
                total = float(x.sum())
        c = x.numel()
        if not c:
            return
        if chunk.dtype in (torch.int64, torch.uint64):
            lo, hi = _exact_minmax(chunk)
        else:
            lo_t, hi_t = torch.aminmax(x)
            lo, hi = float(lo_t), float(hi_t)
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        cmean = total / c
        dev = x - cmean
        cm2 = float(torch.dot(dev, dev))
        self.sumsq += float(torch.dot(x, x))
        total_n = self.count + c
        delta = cmean - self.mean
        self.mean += delta * c / total_n
        self.m2 += cm2 + delta * delta * self.count * c / total_n
        self.count = total_n

    def result(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> TensorStats:
        s = TensorStats(name=name, shape=tuple(shape), dtype=_dtype_name(dtype),
                        numel=math.prod(shape), zeros=self.zeros, nan=self.nan, inf=self.inf,
                        l2=math.sqrt(self.sumsq))
        if self.count:
            s.mean = self.mean
            s.std = math.sqrt(max(self.m2, 0.0) / self.count)
            s.min, s.max = self.min, self.max
            s.abs_max = max(abs(self.min), abs(self.max))  # type: ignore[arg-type]
        return s


def _zeros(chunk: torch.Tensor) -> int:
    try:
        return chunk.numel() - int(torch.count_nonzero(chunk))
    except (RuntimeError, NotImplementedError):  # dtypes without the kernel (uint16/32/64)
        return int((chunk == 0).sum())


def _exact_minmax(chunk: torch.Tensor) -> tuple[float, float]:
    """Min and max of a 64-bit integer chunk without the float64 rounding of huge values."""
    try:
        lo, hi = torch.aminmax(chunk)
        return int(lo), int(hi)  # type: ignore[return-value]
    except RuntimeError:  # dtype without a min/max kernel
        x = chunk.to(torch.float64)
        return float(x.min()), float(x.max())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _range(lo: float, hi: float) -> tuple[float, float] | None:
    """Histogram bounds for values in [lo, hi]; a constant tensor gets a unit-wide range."""
    if lo == hi:
        return lo - 0.5, hi + 0.5
    if not math.isfinite(hi - lo):
        return None
    return lo, hi


def histogram(t: torch.Tensor, lo: float, hi: float, bins: int = DEFAULT_BINS,
              chunk: int = DEFAULT_CHUNK) -> Histogram:
    """Counts of ``t``'s values in ``bins`` equal bins over the finite range [lo, hi] (streamed);
    NaN, Inf and values outside the range are not counted (torch.histc skips them)."""
    counts = torch.zeros(bins, dtype=torch.float64)
    for c in chunks(t, chunk):
        counts += torch.histc(_values(c), bins=bins, min=lo, max=hi)
    return Histogram(lo=lo, hi=hi, counts=[int(v) for v in counts.tolist()])


def flag(s: TensorStats, thresholds: Thresholds = Thresholds()) -> list[str]:
    """The reasons ``s`` looks odd: 'nonfinite', 'exploded', 'dead' (see :class:`Thresholds`)."""
    if not s.dtype.startswith(("float", "bfloat", "complex")) or s.error:
        return []
    out = []
    if s.nan or s.inf:
        out.append("nonfinite")
    buffer = s.name.endswith(_BUFFER_SUFFIXES)
    if not buffer and s.abs_max is not None and s.abs_max > thresholds.explode_at:
        out.append("exploded")
    if not buffer and len(s.shape) >= 2 and s.numel >= 2 and s.std is not None and s.mean is not None:
        if s.zeros == s.numel or s.std <= max(thresholds.dead_std, thresholds.dead_rstd * abs(s.mean)):
            out.append("dead")
    return out


def tensor_stats(t: torch.Tensor, name: str = "", *, bins: int | None = None,
                 chunk: int = DEFAULT_CHUNK, thresholds: Thresholds = Thresholds()) -> TensorStats:
    """Statistics of ``t`` (any dtype, any shape, empty and 0-d included), with flags, and a
    histogram of ``bins`` bins when ``bins`` is given."""
    run = RunningStats()
    try:
        for c in chunks(t, chunk):
            run.update(c)
    except (RuntimeError, TypeError) as e:  # a dtype torch cannot widen (bit types, float4)
        return TensorStats(name=name, shape=tuple(t.shape), dtype=_dtype_name(t.dtype),
                           numel=t.numel(), error=f"no statistics for {_dtype_name(t.dtype)}: {e}")
    s = run.result(name, t.shape, t.dtype)
    s.flags = flag(s, thresholds)
    if bins and s.min is not None:
        bounds = _range(float(s.min), float(s.max))  # type: ignore[arg-type]
        if bounds:
            s.histogram = histogram(t, *bounds, bins=bins, chunk=chunk)
    return s


# -- whole checkpoints -----------------------------------------------------------------------
class StorageLoader:
    """Reads lazy refs one storage at a time, so tensors that share a storage (tied weights,
    views) are read once, and holds each tensor only until it is taken."""

    def __init__(self, refs: Mapping[str, TensorRef]) -> None:
        self.refs = refs
        self._groups: dict[tuple, list[str]] = {}
        self._group_of: dict[str, tuple] = {}
        for name, ref in refs.items():
            key = (id(ref.reader), ref.storage) if ref.storage is not None else (id(ref), name)
            self._groups.setdefault(key, []).append(name)
            self._group_of[name] = key
        self._held: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        t = self._held.pop(name, None)
        if t is not None:
            return t
        key = self._group_of[name]
        names = self._groups.pop(key)
        refs = [self.refs[n] for n in names]
        loaded = refs[0].reader.load(refs, "cpu")
        self._held.update(zip(names, loaded))
        return self._held.pop(name)


@dataclass
class PairItem:
    """One name of a two-checkpoint pass: stats of each side that has it, and the change
    (:func:`torchkeep.look.diffing.compare`) when both have it with the same shape."""

    name: str
    a: TensorStats | None
    b: TensorStats | None
    change: TensorDiff | None


Progress = Callable[[int], None]
WantHistogram = Callable[[TensorStats], bool]


def _stats(t: torch.Tensor, name: str, chunk: int, thresholds: Thresholds) -> TensorStats:
    return tensor_stats(t, name, chunk=chunk, thresholds=thresholds)


def _add_histogram(s: TensorStats, t: torch.Tensor, bounds: tuple[float, float] | None,
                   bins: int, chunk: int) -> None:
    if bounds is not None:
        s.histogram = histogram(t, *bounds, bins=bins, chunk=chunk)


def _measure(t: torch.Tensor, name: str, bins: int, chunk: int, thresholds: Thresholds,
             want_histogram: WantHistogram) -> TensorStats:
    """Statistics of one tensor, with its histogram over its own range if ``want_histogram``
    asks for one once the statistics are known."""
    s = _stats(t, name, chunk, thresholds)
    if s.min is not None and want_histogram(s):
        _add_histogram(s, t, _range(float(s.min), float(s.max)), bins, chunk)  # type: ignore[arg-type]
    return s


def stream_stats(refs: Mapping[str, TensorRef], *, bins: int = DEFAULT_BINS,
                 chunk: int = DEFAULT_CHUNK, thresholds: Thresholds = Thresholds(),
                 want_histogram: WantHistogram = lambda s: False,
                 progress: Progress | None = None) -> Iterator[TensorStats]:
    """Statistics of every ref, in order, reading one storage at a time.

    ``want_histogram(stats)`` decides, once a tensor's statistics are known and while it is
    still in memory, whether it gets a histogram; ``progress(nbytes)`` is called per tensor.
    """
    loader = StorageLoader(refs)
    for name, ref in refs.items():
        s = _measure(loader.take(name), name, bins, chunk, thresholds, want_histogram)
        if progress:
            progress(ref.nbytes)
        yield s


def stream_pair(refs_a: Mapping[str, TensorRef], refs_b: Mapping[str, TensorRef], *,
                bins: int = DEFAULT_BINS, chunk: int = DEFAULT_CHUNK,
                thresholds: Thresholds = Thresholds(),
                want_histogram: WantHistogram = lambda s: False,
                progress: Progress | None = None) -> Iterator[PairItem]:
    """Statistics of both checkpoints and the change of every name they share with one shape,
    in one read of each tensor (the change is :func:`torchkeep.look.diffing.compare`'s).

    Names are visited in a's order, then b's new names. A pair selected for a histogram (by
    either side's statistics) gets both histograms over one common range, so they overlay.
    """
    la, lb = StorageLoader(refs_a), StorageLoader(refs_b)
    for name, ra in refs_a.items():
        rb = refs_b.get(name)
        ta = la.take(name)
        if rb is None:
            sa = _measure(ta, name, bins, chunk, thresholds, want_histogram)
            del ta
            if progress:
                progress(ra.nbytes)
            yield PairItem(name, sa, None, None)
            continue
        sa = _stats(ta, name, chunk, thresholds)
        tb = lb.take(name)
        sb = _stats(tb, name, chunk, thresholds)
        change = compare(name, ta, tb) if tuple(ta.shape) == tuple(tb.shape) else None
        if want_histogram(sa) or want_histogram(sb):
            lows = [float(s.min) for s in (sa, sb) if s.min is not None]
            highs = [float(s.max) for s in (sa, sb) if s.max is not None]
            if lows:
                bounds = _range(min(lows), max(highs))
                _add_histogram(sa, ta, bounds, bins, chunk)
                _add_histogram(sb, tb, bounds, bins, chunk)
        del ta, tb
        if progress:
            progress(ra.nbytes + rb.nbytes)
        yield PairItem(name, sa, sb, change)
    for name, rb in refs_b.items():
        if name in refs_a:
            continue
        sb = _measure(lb.take(name), name, bins, chunk, thresholds, want_histogram)
        if progress:
            progress(rb.nbytes)
        yield PairItem(name, None, sb, None)


__all__ = ["TensorStats", "Histogram", "Thresholds", "RunningStats", "PairItem",
           "StorageLoader", "tensor_stats", "histogram", "flag", "chunks",
           "stream_stats", "stream_pair", "DEFAULT_CHUNK", "DEFAULT_BINS"]
