"""The HTML report's data: :func:`prepare` opens the checkpoint(s) and picks the tensors (no
bytes read); the returned :class:`ReportPlan` streams through them once (:mod:`torchkeep.look.stats`)
and gives a :class:`ReportData`, which :func:`render_html` (:mod:`torchkeep.look.report.page`, re-exported
here) turns into one self-contained page; :func:`write_report` does all three and writes the page
atomically.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Callable

from torchkeep.errors import TorchkeepError
from torchkeep.look.diffing import TensorDiff
from torchkeep.look.stats import (DEFAULT_BINS, DEFAULT_CHUNK, TensorStats, Thresholds, stream_pair,
                                  stream_stats)
from torchkeep.read.checkpoint import Checkpoint, Summary
from torchkeep.read.checkpoint import open as open_checkpoint
from torchkeep.read.formats.base import TensorRef
from torchkeep.read.scanner import ScanReport, scan


@dataclass
class ReportOptions:
    """What the report computes. Histograms go to the ``top`` largest tensors and to at most
    ``flagged_histograms`` flagged ones."""

    top: int = 12
    flagged_histograms: int = 24
    bins: int = DEFAULT_BINS
    chunk: int = DEFAULT_CHUNK
    thresholds: Thresholds = field(default_factory=Thresholds)
    all_tensors: bool = False  # every tensor in the file (optimizer state too), not just the weights


@dataclass
class Side:
    """One checkpoint of the report."""

    path: str
    summary: Summary
    source: str                      # which tensors were analysed: 'model weights' / 'every tensor'
    bytes_by_dtype: dict[str, int]
    scan: ScanReport | None = None
    scan_error: str | None = None
    stats: list[TensorStats] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path)) or self.path

    @property
    def flagged(self) -> list[TensorStats]:
        return [s for s in self.stats if s.flags]

    @property
    def verdict(self) -> str:
        """'safe', 'unsafe', 'review' (unknown globals or a damaged pickle) or 'unknown'."""
        if self.scan is None:
            return "unknown"
        if self.scan.unsafe:
            return "unsafe"
        return "safe" if self.scan.safe else "review"


@dataclass
class KeyChange:
    """A name both checkpoints have, with another shape or dtype."""

    name: str
    shape_a: tuple[int, ...]
    dtype_a: str
    shape_b: tuple[int, ...]
    dtype_b: str


@dataclass
class Comparison:
    """How checkpoint b differs from a, name by name."""

    changes: list[TensorDiff] = field(default_factory=list)  # same shape in both, in a's order
    added: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)
    removed: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)
    reshaped: list[KeyChange] = field(default_factory=list)
    retyped: list[KeyChange] = field(default_factory=list)  # same shape, other dtype

    @property
    def frozen(self) -> list[TensorDiff]:
        """Tensors that did not change at all (bit for bit, same dtype)."""
        return [c for c in self.changes if c.unchanged]

    @property
    def changed(self) -> list[TensorDiff]:
        return [c for c in self.changes if not c.unchanged]


@dataclass
class ReportData:
    sides: list[Side]
    comparison: Comparison | None
    options: ReportOptions
    created: str
    version: str

    @property
    def pair(self) -> bool:
        return self.comparison is not None


def _dtype(d) -> str:
    return str(d).replace("torch.", "")


def _pick_refs(ck: Checkpoint, all_tensors: bool) -> tuple[dict[str, TensorRef], str]:
    if not all_tensors:
        refs = ck.state_refs()
        if refs:
            return refs, "model weights"
    return {e.name: e.ref for e in ck.entries() if e.ref is not None}, "every tensor"


def _side(ck: Checkpoint, all_tensors: bool) -> tuple[Side, dict[str, TensorRef]]:
    refs, source = _pick_refs(ck, all_tensors)
    by_dtype: dict[str, int] = {}
    for e in ck.entries():
        d = _dtype(e.dtype)
        by_dtype[d] = by_dtype.get(d, 0) + e.nbytes
    side = Side(path=ck.path, summary=ck.summary, source=source, bytes_by_dtype=by_dtype)
    try:
        side.scan = scan(ck.path)
    except (TorchkeepError, OSError) as e:
        side.scan_error = str(e)
    return side, refs


class ReportPlan:
    """Checkpoints opened and tensors chosen, nothing read yet; :meth:`collect` reads them."""

    def __init__(self, path: str | os.PathLike, other: str | os.PathLike | None,
                 options: ReportOptions) -> None:
        self.options = options
        self._cks: list[Checkpoint] = []
        self.sides: list[Side] = []
        self.refs: list[dict[str, TensorRef]] = []
        try:
            for p in (path, other) if other is not None else (path,):
                self._cks.append(open_checkpoint(p))
                side, refs = _side(self._cks[-1], options.all_tensors)
                self.sides.append(side)
                self.refs.append(refs)
        except BaseException:
            self.close()
            raise

    @property
    def total_bytes(self) -> int:
        """Tensor bytes :meth:`collect` reads (for a progress bar)."""
        return sum(r.nbytes for refs in self.refs for r in refs.values())

    def _want_histogram(self) -> Callable[[TensorStats], bool]:
        sizes: dict[str, int] = {}
        for refs in self.refs:
            for n, r in refs.items():
                sizes[n] = max(sizes.get(n, 0), r.numel)
        largest = set(sorted(sizes, key=lambda n: -sizes[n])[: self.options.top])
        flagged: set[str] = set()

        def want(s: TensorStats) -> bool:
            if s.name in largest or s.name in flagged:
                return True
            if s.flags and len(flagged) < self.options.flagged_histograms:
                flagged.add(s.name)
                return True
            return False
        return want

    def collect(self, progress: Callable[[int], None] | None = None) -> ReportData:
        """Stream through the tensors once: statistics, histograms and (for a pair) changes."""
        from torchkeep.version import __version__

        o = self.options
        kw = dict(bins=o.bins, chunk=o.chunk, thresholds=o.thresholds,
                  want_histogram=self._want_histogram(), progress=progress)
        comparison = None
        if len(self.sides) == 1:
            self.sides[0].stats = list(stream_stats(self.refs[0], **kw))  # type: ignore[arg-type]
        else:
            ra, rb = self.refs
            comparison = _key_changes(ra, rb)
            for item in stream_pair(ra, rb, **kw):  # type: ignore[arg-type]
                if item.a is not None:
                    self.sides[0].stats.append(item.a)
                if item.b is not None:
                    self.sides[1].stats.append(item.b)
                if item.change is not None:
                    comparison.changes.append(item.change)
        created = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        return ReportData(sides=self.sides, comparison=comparison, options=o, created=created,
                          version=__version__)

    def close(self) -> None:
        for ck in self._cks:
            ck.close()

    def __enter__(self) -> "ReportPlan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key_changes(ra: dict[str, TensorRef], rb: dict[str, TensorRef]) -> Comparison:
    c = Comparison()
    for n, r in ra.items():
        if n not in rb:
            c.removed.append((n, tuple(r.shape), _dtype(r.dtype)))
            continue
        s = rb[n]
        if tuple(r.shape) != tuple(s.shape):
            c.reshaped.append(KeyChange(n, tuple(r.shape), _dtype(r.dtype), tuple(s.shape), _dtype(s.dtype)))
        elif r.dtype != s.dtype:
            c.retyped.append(KeyChange(n, tuple(r.shape), _dtype(r.dtype), tuple(s.shape), _dtype(s.dtype)))
    c.added = [(n, tuple(r.shape), _dtype(r.dtype)) for n, r in rb.items() if n not in ra]
    return c


def prepare(path: str | os.PathLike, other: str | os.PathLike | None = None,
            options: ReportOptions | None = None) -> ReportPlan:
    """Open ``path`` (and ``other``), scan them for unsafe pickles and choose the tensors to
    analyse; no tensor bytes are read yet."""
    return ReportPlan(path, other, options or ReportOptions())


__all__ = ["ReportOptions", "ReportPlan", "ReportData", "Side", "Comparison", "KeyChange",
           "prepare"]
