"""Compare two checkpoints' whole state (or only their model weights) tensor by tensor, without
holding either whole.

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
    # plain values (epoch, lr, ...) that differ: name -> (a, b); MISSING on the side without it
    values: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    weights_only: bool = False

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
        return not (self.only_a or self.only_b or self.shape_changed or self.changed or self.values)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (non-finite floats stay floats; the CLI's --json writes them as
        null with a ``<key>_nonfinite`` flag)."""
        tensors = []
        for t in self.tensors:
            d = asdict(t)
            d["shape"] = list(t.shape)
            tensors.append(d)
        return {
            "a": self.a, "b": self.b, "identical": self.identical, "weights_only": self.weights_only,
            "values": {k: {"a": _plain(va), "b": _plain(vb)} for k, (va, vb) in self.values.items()},
            "only_a": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.only_a.items()},
            "only_b": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.only_b.items()},
            "shape_changed": [{**asdict(c), "shape_a": list(c.shape_a), "shape_b": list(c.shape_b)}
                              for c in self.shape_changed],
            "counts": {"common": len(self.tensors), "changed": len(self.changed),
                       "unchanged": len(self.unchanged), "dtype_changed": len(self.dtype_changed),
                       "only_a": len(self.only_a), "only_b": len(self.only_b),
                       "shape_changed": len(self.shape_changed), "values": len(self.values)},
            "tensors": tensors,
        }

    def headline(self) -> str:
        what = "model weights" if self.weights_only else "whole state"
        return (f"{'identical' if self.identical else 'different'} ({what}): {len(self.tensors)} "
                f"common tensors, {len(self.changed)} changed, {len(self.unchanged)} unchanged, "
                f"{len(self.dtype_changed)} dtype changes, {len(self.shape_changed)} shape changes, "
                f"{len(self.only_a)} only in A, {len(self.only_b)} only in B"
                + ("" if self.weights_only else f", {len(self.values)} other values differ"))

    def format(self, limit: int | None = 20) -> str:
        """Plain text: names on one side only, shape changes, the ``limit`` most changed tensors
        (None: all) in an aligned table, differing values, and the headline."""
        from torchkeep.look.textable import aligned

        lines = [f"A {self.a}", f"B {self.b}"]
        for title, side in (("only in A", self.only_a), ("only in B", self.only_b)):
            if side:
                lines.append(f"{title} ({len(side)}):")
                lines += [f"  {n}  {_shape(s)} {dt}" for n, (s, dt) in list(side.items())[:limit]]
                if limit is not None and len(side) > limit:
                    lines.append(f"  … {len(side) - limit} more")
        if self.shape_changed:
            lines.append(f"shape changed ({len(self.shape_changed)}):")
            for c in self.shape_changed[:limit]:
                dt = f" {c.dtype_a} → {c.dtype_b}" if c.dtype_a != c.dtype_b else f" {c.dtype_a}"
                lines.append(f"  {c.name}  {_shape(c.shape_a)} → {_shape(c.shape_b)}{dt}")
        changed = self.changed
        if changed:
            lines.append(aligned(TABLE_HEADER, [table_row(d) for d in changed[:limit]], right=(3, 4, 5)))
            if limit is not None and len(changed) > limit:
                lines.append(f"  … {len(changed) - limit} more changed tensors")
        if self.values:
            lines.append(f"values changed ({len(self.values)}):")
            for n, (va, vb) in list(self.values.items())[:limit]:
                lines.append(f"  {n}: {_show(va)} → {_show(vb)}")
        lines.append(self.headline())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


MISSING: Any = _Missing()
TABLE_HEADER = ("tensor", "shape", "dtype", "max |a-b|", "rel change", "elements changed")


def _plain(v: Any) -> Any:
    return None if v is MISSING else v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:59] + "…"


def _shape(s: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in s) + "]"


def _num(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.3g}")


def table_row(d: TensorDiff) -> tuple[str, str, str, str, str, str]:
    """``TABLE_HEADER``'s cells for one changed tensor."""
    numel = 1
    for n in d.shape:
        numel *= n
    el = f"{d.changed_elements:,}/{numel:,}" + (f" ({d.nan_mismatch:,} NaN)" if d.nan_mismatch else "")
    dt = d.dtype_a if not d.dtype_changed else f"{d.dtype_a} → {d.dtype_b}"
    return d.name, _shape(d.shape), dt, _num(d.max_abs), _num(d.rel_change), el


def _label(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _side(x: Any, trust: bool, weights_only: bool
          ) -> tuple[str, dict[str, TensorRef | torch.Tensor], dict[str, Any], Any]:
    """(description, name -> lazy or in-memory tensor, name -> plain value, checkpoint to
    close). The model weights go by the names a bare model uses ('module.' stripped); with the
    whole state, every other tensor and plain value goes by its full dotted name."""
    from torchkeep.read.checkpoint import Checkpoint
    from torchkeep.read.checkpoint import open as open_checkpoint

    if isinstance(x, Mapping):
        tensors = {str(k): v for k, v in x.items() if isinstance(v, torch.Tensor)}
        values = {} if weights_only else {str(k): v for k, v in x.items() if _is_plain(v)}
        return "<state dict>", tensors, values, None
    ck = x if isinstance(x, Checkpoint) else open_checkpoint(x, trust=trust)
    closer = None if isinstance(x, Checkpoint) else ck
    refs: dict[str, Any] = dict(ck.state_refs())
    wrapper = ck.summary.wrapper
    if not refs:  # no state dict found: compare every tensor by its full name
        refs, wrapper = {}, None
    values: dict[str, Any] = {}
    if not weights_only or not refs:
        inside = (lambda n: True) if wrapper == "" else (
            lambda n: wrapper is not None and (n == wrapper or n.startswith(wrapper + ".")))
        refs.update({e.name: e.ref for e in ck.entries() if e.ref is not None and not inside(e.name)})
    if not weights_only:
        from torchkeep.read import tree

        values = {n: v for n, v in tree.walk(ck.tree) if _is_plain(v)}
    return ck.path, refs, values, closer


def _is_plain(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None))) and not isinstance(v, TensorRef)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


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


def diff(a: Any, b: Any, *, trust: bool = False, names: Iterable[str] | None = None,
         weights_only: bool = False) -> DiffReport:
    """Compare ``a`` and ``b`` (paths, open Checkpoints or mappings of names to tensors): their
    whole state (model weights, optimizer state, every other tensor and plain value), or with
    ``weights_only`` only the model weights each holds. Tensors are read one pair at a time;
    ``names`` limits the comparison."""
    desc_a, A, VA, close_a = _side(a, trust, weights_only)
    try:
        desc_b, B, VB, close_b = _side(b, trust, weights_only)
    except BaseException:
        if close_a is not None:
            close_a.close()
        raise
    try:
        if names is not None:
            keep = set(names)
            A = {k: v for k, v in A.items() if k in keep}
            B = {k: v for k, v in B.items() if k in keep}
            VA = {k: v for k, v in VA.items() if k in keep}
            VB = {k: v for k, v in VB.items() if k in keep}
        rep = DiffReport(a=desc_a, b=desc_b, weights_only=weights_only)
        for k in list(VA) + [k for k in VB if k not in VA]:
            va, vb = VA.get(k, MISSING), VB.get(k, MISSING)
            if not _same(va, vb):
                rep.values[k] = (va, vb)
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


__all__ = ["diff", "DiffReport", "TensorDiff", "ShapeChange", "compare", "MISSING"]
