"""Compare the model weights of two checkpoints tensor by tensor, without holding either whole.

Names present on one side only, shape and dtype changes, and for every common tensor the largest
absolute difference and the relative change ``||a - b|| / ||a||``, accumulated in float64 over
slices of the tensors (NaN-aware: NaNs in the same place are equal, a NaN on one side only is
counted). Bit-identical tensors are recognised first and flagged unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch

from torchkeep.read.formats.base import TensorRef

CHUNK = 1 << 22  # elements per float64 slice


@dataclass
class TensorDiff:
    """How one tensor present on both sides changed."""

    name: str
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    unchanged: bool = False        # bit-identical (same dtype, same bytes)
    max_abs: float = 0.0           # max |a - b| over the comparable elements
    rel_change: float = 0.0        # ||a - b|| / ||a|| (inf when a is all zeros and b is not)
    norm_a: float = 0.0            # over a's finite values
    norm_diff: float = 0.0
    changed_elements: int = 0      # elements whose values differ
    nan_mismatch: int = 0          # NaN on one side only

    @property
    def dtype_changed(self) -> bool:
        return self.dtype_a != self.dtype_b


@dataclass
class ShapeChange:
    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str


@dataclass
class DiffReport:
    """Result of :func:`diff`. ``tensors`` is sorted by change, largest first."""

    a: str
    b: str
    only_a: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, dtype)
    only_b: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    shape_changed: list[ShapeChange] = field(default_factory=list)
    tensors: list[TensorDiff] = field(default_factory=list)

    @property
    def changed(self) -> list[TensorDiff]:
        return [t for t in self.tensors if not t.unchanged]

    @property
    def unchanged(self) -> list[TensorDiff]:
        return [t for t in self.tensors if t.unchanged]

    @property
    def dtype_changed(self) -> list[TensorDiff]:
        return [t for t in self.tensors if t.dtype_changed]

    @property
    def identical(self) -> bool:
        """Same names, shapes, dtypes and bytes."""
        return not (self.only_a or self.only_b or self.shape_changed or self.changed)

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> Any:
            return x if math.isfinite(x) else str(x)

        tensors = []
        for t in self.tensors:
            d = asdict(t)
            d["shape"] = list(t.shape)
            d["max_abs"], d["rel_change"] = num(t.max_abs), num(t.rel_change)
            d["norm_a"], d["norm_diff"] = num(t.norm_a), num(t.norm_diff)
            tensors.append(d)
        return {
            "a": self.a, "b": self.b, "identical": self.identical,
            "only_a": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.only_a.items()},
            "only_b": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.only_b.items()},
            "shape_changed": [{**asdict(c), "shape_a": list(c.shape_a), "shape_b": list(c.shape_b)}
                              for c in self.shape_changed],
            "counts": {"common": len(self.tensors), "changed": len(self.changed),
                       "unchanged": len(self.unchanged), "dtype_changed": len(self.dtype_changed),
                       "only_a": len(self.only_a), "only_b": len(self.only_b),
                       "shape_changed": len(self.shape_changed)},
            "tensors": tensors,
        }


def _label(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _side(x: Any, trust: bool) -> tuple[str, dict[str, TensorRef | torch.Tensor], Any]:
    """(description, name -> lazy or in-memory tensor, checkpoint to close)."""
    from torchkeep.read.checkpoint import Checkpoint
    from torchkeep.read.checkpoint import open as open_checkpoint

    if isinstance(x, Mapping):
        return "<state dict>", {str(k): v for k, v in x.items() if isinstance(v, torch.Tensor)}, None
    ck = x if isinstance(x, Checkpoint) else open_checkpoint(x, trust=trust)
    closer = None if isinstance(x, Checkpoint) else ck
    refs: dict[str, Any] = dict(ck.state_refs())
    if not refs:  # no state dict found: compare every tensor by its full name
        refs = {e.name: e.ref for e in ck.entries() if e.ref is not None}
    return ck.path, refs, closer


def _meta(v: Any) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(v.shape), v.dtype


def _load(v: Any) -> torch.Tensor:
    return v.load("cpu") if isinstance(v, TensorRef) else v.detach().cpu()


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as a flat uint8 tensor (a view when already contiguous)."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ra, rb = _raw(a), _raw(b)
    if ra.numel() != rb.numel():
        return False
    if ra.numel() % 8 == 0 and ra.numel():
        return torch.equal(ra.view(torch.int64), rb.view(torch.int64))
    return torch.equal(ra, rb)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float64 (complex128 for complex) values; unsigned types torch cannot cast directly go
    through int64 first."""
    if t.is_complex():
        return t.to(torch.complex128)
    try:
        return t.to(torch.float64)
    except (RuntimeError, TypeError):
        return t.to(torch.int64).to(torch.float64)


def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
    """Difference statistics of two same-shape tensors, in float64 slices."""
    d = TensorDiff(name, tuple(a.shape), _label(a.dtype), _label(b.dtype))
    if a.dtype == b.dtype and _bytes_equal(a, b):
        d.unchanged = True
        return d
    fa, fb = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    sq_a = sq_d = 0.0
    max_abs = 0.0
    changed = nan_mis = 0
    for i in range(0, fa.numel(), CHUNK):
        x, y = _wide(fa[i:i + CHUNK]), _wide(fb[i:i + CHUNK])
        nan_x, nan_y = torch.isnan(x), torch.isnan(y)
        same = (x == y) | (nan_x & nan_y)
        one_nan = nan_x ^ nan_y
        nan_mis += int(one_nan.sum())
        changed += int((~same).sum())
        diff = torch.where(same | one_nan, torch.zeros((), dtype=x.dtype), x - y).abs()
        if diff.numel():
            m = float(diff.max())
            if m > max_abs or math.isnan(m):
                max_abs = m
            sq_d += float((diff * diff).sum()) if math.isfinite(m) else math.inf
        ax = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype)).abs()
        sq_a += float((ax * ax).sum())
    d.max_abs = max_abs
    d.norm_a, d.norm_diff = math.sqrt(sq_a), math.sqrt(sq_d)
    d.changed_elements, d.nan_mismatch = changed, nan_mis
    if nan_mis:
        d.rel_change = math.inf
    elif d.norm_a > 0:
        d.rel_change = d.norm_diff / d.norm_a
    else:
        d.rel_change = 0.0 if d.norm_diff == 0 else math.inf
    return d


def _order(t: TensorDiff) -> tuple:
    """Largest change first; unchanged tensors last, each group in name order."""
    rel = t.rel_change if not math.isnan(t.rel_change) else math.inf
    return (t.unchanged, -rel, -t.max_abs, t.name)


def diff(a: Any, b: Any, *, trust: bool = False, names: Iterable[str] | None = None) -> DiffReport:
    """Compare the model weights of ``a`` and ``b`` (paths, open Checkpoints or mappings of
    names to tensors). Tensors are read one pair at a time; ``names`` limits the comparison."""
    desc_a, A, close_a = _side(a, trust)
    try:
        desc_b, B, close_b = _side(b, trust)
    except BaseException:
        if close_a is not None:
            close_a.close()
        raise
    try:
        if names is not None:
            keep = set(names)
            A = {k: v for k, v in A.items() if k in keep}
            B = {k: v for k, v in B.items() if k in keep}
        rep = DiffReport(a=desc_a, b=desc_b)
        for k, v in A.items():
            if k not in B:
                s, dt = _meta(v)
                rep.only_a[k] = (s, _label(dt))
        for k, v in B.items():
            if k not in A:
                s, dt = _meta(v)
                rep.only_b[k] = (s, _label(dt))
        for k, va in A.items():
            vb = B.get(k)
            if vb is None:
                continue
            (sa, da), (sb, db) = _meta(va), _meta(vb)
            if sa != sb:
                rep.shape_changed.append(ShapeChange(k, sa, sb, _label(da), _label(db)))
                continue
            ta, tb = _load(va), _load(vb)
            rep.tensors.append(compare(k, ta, tb))
            del ta, tb
        rep.tensors.sort(key=_order)
        return rep
    finally:
        for c in (close_a, close_b):
            if c is not None:
                c.close()


__all__ = ["diff", "DiffReport", "TensorDiff", "ShapeChange", "compare"]
