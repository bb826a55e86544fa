"""Shape adapters: carry a tensor into a target of another shape or dtype where that is sound.

Three adapters, each named so callers can enable them one by one:

* ``in_channels``: the first convolution's input channels (an RGB stem into a grey-scale model
  and back). To one channel the kernels are summed over the input channels; to more, they are
  tiled and scaled by ``in_src / in_dst`` so the response to a constant image stays the same.
* ``rows``: classifier and embedding rows. A classifier that gains classes keeps the old rows
  and its new rows keep their init; an embedding table is grown or cut (vocabulary resized).
  A classifier with *fewer* classes is not adapted: its rows would be classes of another task,
  so the new head keeps its init (what timm and transformers do).
* ``cast``: same shape, another dtype (float16 weights into a float32 model).

Roles ('first_conv', 'classifier', 'embedding') are decided by the caller from module types or
tensor order; an adapter applies only when source and target tensor play the same role.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

ADAPTERS: tuple[str, ...] = ("in_channels", "rows", "cast")


@dataclass(frozen=True)
class Adaptation:
    """How one source tensor becomes its target: ``write(src, dst)`` fills ``dst`` in place."""

    adapters: tuple[str, ...]
    how: str
    write: Callable[[torch.Tensor, torch.Tensor], None]


def enabled_adapters(adapt: bool | str | Iterable[str]) -> frozenset[str]:
    """``adapt`` as a set of adapter names: True = all, False = none, or names from ADAPTERS."""
    if adapt is True:
        return frozenset(ADAPTERS)
    if adapt is False or adapt is None:
        return frozenset()
    names = {adapt} if isinstance(adapt, str) else set(adapt)
    unknown = sorted(names - set(ADAPTERS))
    if unknown:
        raise ValueError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(ADAPTERS)}")
    return frozenset(names)


def _shape(s: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(x)) for x in s) + "]"


def _dtype(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.copy_(src)


def _in_channels_writer(n_src: int, n_dst: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def write(src: torch.Tensor, dst: torch.Tensor) -> None:
        w = src.to(torch.float32) if src.is_floating_point() and src.dtype != torch.float64 else src
        if n_dst == 1:
            w = w.sum(dim=1, keepdim=True)
        else:
            reps = math.ceil(n_dst / n_src)
            w = w.repeat(1, reps, *([1] * (w.dim() - 2)))[:, :n_dst] * (n_src / n_dst)
        dst.copy_(w)
    return write


def _rows_writer(n: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def write(src: torch.Tensor, dst: torch.Tensor) -> None:
        dst[:n].copy_(src[:n])
    return write


def plan(src_shape: tuple[int, ...], src_dtype: torch.dtype, dst_shape: tuple[int, ...],
         dst_dtype: torch.dtype, *, src_role: str | None, dst_role: str | None,
         enabled: frozenset[str], dst_name: str = "the target") -> tuple[Adaptation | None, str | None]:
    """How to carry a source tensor into a target of another shape or dtype.

    Returns ``(adaptation, None)`` when an enabled adapter applies, else ``(None, why)`` where
    ``why`` says what does not fit (and which adapter would apply if it is only disabled).
    """
    src_shape, dst_shape = tuple(src_shape), tuple(dst_shape)
    cast = src_dtype != dst_dtype
    cast_how = f"cast {_dtype(src_dtype)} -> {_dtype(dst_dtype)}"
    mismatch = f"shape {_shape(src_shape)} does not fit {dst_name} {_shape(dst_shape)}"
    if src_shape == dst_shape:
        if not cast:
            return Adaptation((), "", _copy), None
        if "cast" not in enabled:
            return None, (f"dtype {_dtype(src_dtype)} does not fit {dst_name} {_dtype(dst_dtype)} "
                          "(adapter 'cast' disabled)")
        return Adaptation(("cast",), cast_how, _copy), None

    shape_ad: Adaptation | None = None
    why = mismatch
    same_rank = len(src_shape) == len(dst_shape)
    if (same_rank and len(dst_shape) >= 3 and src_role == dst_role == "first_conv"
            and src_shape[:1] == dst_shape[:1] and src_shape[2:] == dst_shape[2:]):
        a, b = src_shape[1], dst_shape[1]
        how = (f"in_channels {a}->{b}: summed over input channels" if b == 1 else
               f"in_channels {a}->{b}: tiled and scaled by {a}/{b}")
        shape_ad = Adaptation(("in_channels",), how, _in_channels_writer(a, b))
        if "in_channels" not in enabled:
            return None, f"{mismatch} (adapter 'in_channels' disabled)"
    elif (same_rank and len(dst_shape) in (1, 2) and src_role == dst_role
          and dst_role in ("classifier", "embedding") and src_shape[1:] == dst_shape[1:]):
        a, b = src_shape[0], dst_shape[0]
        if dst_role == "classifier" and b < a:
            return None, (f"{mismatch}: a head with fewer classes ({b} < {a}) keeps its init")
        n = min(a, b)
        if b > a:
            how = f"rows: {a} copied, {b - a} new rows keep their init ({dst_role} grown {a}->{b})"
        else:
            how = f"rows: first {b} of {a} copied ({dst_role} cut {a}->{b})"
        shape_ad = Adaptation(("rows",), how, _rows_writer(n))
        if "rows" not in enabled:
            return None, f"{mismatch} (adapter 'rows' disabled)"
    if shape_ad is None:
        return None, why
    if cast:
        if "cast" not in enabled:
            return None, f"{mismatch} and dtype {_dtype(src_dtype)} != {_dtype(dst_dtype)} (adapter 'cast' disabled)"
        return Adaptation(shape_ad.adapters + ("cast",), f"{shape_ad.how}; {cast_how}", shape_ad.write), None
    return shape_ad, None
