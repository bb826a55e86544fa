"""Shape adapters: carry a tensor into a target of another shape or dtype where that is sound.

Adapters, each named so callers can enable them one by one:

* ``in_channels``: the first convolution's input channels (an RGB stem into a grey-scale model
  and back). To one channel the kernels are summed over the input channels; to more, they are
  tiled and scaled by ``in_src / in_dst`` so the response to a constant image stays the same.
* ``rows``: classifier and embedding rows. A classifier that gains classes keeps the old rows
  and its new rows keep their init; an embedding table is grown or cut (vocabulary resized).
  A classifier with *fewer* classes is not adapted: its rows would be classes of another task,
  so the new head keeps its init (what timm and transformers do).
* ``pos_embed``: absolute position embeddings for another grid or length. A ``[1, P+N, d]``
  (or ``[1, d, H, W]``) table is resampled bicubically (antialiased, as timm does) from its
  square grid to the target's, keeping the P class/register tokens as they are; a ``[L, d]``
  table is linearly interpolated to a longer sequence and cut to a shorter one.
* ``vocab_mean``: the new rows of a grown embedding table start at the mean of the old rows
  (what transformers' ``resize_token_embeddings`` does) instead of their init.
* ``vocab_cov`` (off unless named): new rows drawn from a normal distribution with the old
  rows' mean and covariance instead.
* ``cast``: same shape, another dtype (float16 weights into a float32 model).

Roles ('first_conv', 'classifier', 'embedding', 'position') are decided by the caller from module types or
tensor order; an adapter applies only when source and target tensor play the same role.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# On by default (adapt=True); OPTIONAL_ADAPTERS only when named.
ADAPTERS: tuple[str, ...] = ("in_channels", "rows", "pos_embed", "vocab_mean", "cast")
OPTIONAL_ADAPTERS: tuple[str, ...] = ("vocab_cov",)
MAX_PREFIX_TOKENS = 8  # class + register tokens looked for in a position table


@dataclass(frozen=True)
class Adaptation:
    """How one source tensor becomes its target: ``write(src, dst)`` fills ``dst`` in place."""

    adapters: tuple[str, ...]
    how: str
    write: Callable[[torch.Tensor, torch.Tensor], None]


def enabled_adapters(adapt: bool | str | Iterable[str]) -> frozenset[str]:
    """``adapt`` as a set of adapter names: True = the default ADAPTERS, False = none, or names
    from ADAPTERS and OPTIONAL_ADAPTERS ('vocab_cov' implies the mean it centres on)."""
    if adapt is True:
        return frozenset(ADAPTERS)
    if adapt is False or adapt is None:
        return frozenset()
    names = {adapt} if isinstance(adapt, str) else set(adapt)
    unknown = sorted(names - set(ADAPTERS) - set(OPTIONAL_ADAPTERS))
    if unknown:
        raise ValueError(f"unknown adapter(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(ADAPTERS + OPTIONAL_ADAPTERS)}")
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


def _rows_writer(n: int, fill: str | None = None) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Copy the first ``n`` rows; with ``fill`` ('mean' or 'cov'), set the rows after them from
    the statistics of the source rows (computed in float32)."""
    def write(src: torch.Tensor, dst: torch.Tensor) -> None:
        dst[:n].copy_(src[:n])
        if fill is None or dst.shape[0] <= n:
            return
        old = src[:n].to(torch.float32)
        mean = old.mean(dim=0)
        extra = dst.shape[0] - n
        new = mean.expand(extra, *mean.shape)
        if fill == "cov":
            new = _sample_like(old, mean, extra)
        dst[n:].copy_(new.to(device=dst.device, dtype=dst.dtype))
    return write


def _sample_like(old: torch.Tensor, mean: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` rows from N(mean, cov of ``old``); the mean where that covariance is singular."""
    centred = old.reshape(old.shape[0], -1) - mean.reshape(1, -1)
    cov = centred.T @ centred / max(old.shape[0] - 1, 1)
    try:
        dist = torch.distributions.MultivariateNormal(mean.reshape(-1), covariance_matrix=cov)
    except (ValueError, RuntimeError):
        log.warning("vocab_cov: the old rows' covariance is singular (%d rows of %d values); "
                    "new rows start at their mean instead", old.shape[0], centred.shape[1])
        return mean.expand(k, *mean.shape)
    return dist.sample((k,)).reshape(k, *mean.shape)


def _prefix_tokens(a: int, b: int) -> list[int]:
    """Counts P of leading class/register tokens that leave square grids on both sides."""
    return [p for p in range(min(MAX_PREFIX_TOKENS, a, b) + 1)
            if a - p > 0 and b - p > 0 and math.isqrt(a - p) ** 2 == a - p
            and math.isqrt(b - p) ** 2 == b - p]


def _grid_writer(p: int, old: int, new: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def write(src: torch.Tensor, dst: torch.Tensor) -> None:
        d = src.shape[-1]
        grid = src[:, p:].to(torch.float32).reshape(1, old, old, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True)
        dst[:, :p].copy_(src[:, :p])
        dst[:, p:].copy_(grid.permute(0, 2, 3, 1).reshape(1, new * new, d))
    return write


def _map_writer(size: tuple[int, int]) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def write(src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(F.interpolate(src.to(torch.float32), size=size, mode="bicubic", antialias=True))
    return write


def _sequence_writer(n: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def write(src: torch.Tensor, dst: torch.Tensor) -> None:
        if n <= src.shape[0]:
            dst.copy_(src[:n])
            return
        seq = src.to(torch.float32).T.unsqueeze(0)              # [1, d, L]
        dst.copy_(F.interpolate(seq, size=n, mode="linear").squeeze(0).T)
    return write


def _position(src_shape: tuple[int, ...], dst_shape: tuple[int, ...]
              ) -> tuple[Adaptation | None, str | None]:
    """How to resample a position table, or (None, why not)."""
    if len(src_shape) == 4 and src_shape[:2] == dst_shape[:2] and src_shape[0] == 1:
        size = (int(dst_shape[2]), int(dst_shape[3]))
        return Adaptation(("pos_embed",), f"pos_embed: grid {src_shape[2]}x{src_shape[3]} -> "
                          f"{size[0]}x{size[1]} (bicubic)", _map_writer(size)), None
    if len(src_shape) == 3 and src_shape[0] == dst_shape[0] == 1 and src_shape[2] == dst_shape[2]:
        ps = _prefix_tokens(src_shape[1], dst_shape[1])
        if len(ps) != 1:
            why = ("no count of class/register tokens leaves a square grid on both sides" if not ps
                   else f"{' or '.join(map(str, ps))} class/register tokens would each leave square grids")
            return None, f"position table {list(src_shape)} -> {list(dst_shape)}: {why}"
        p = ps[0]
        a, b = math.isqrt(src_shape[1] - p), math.isqrt(dst_shape[1] - p)
        return Adaptation(("pos_embed",), f"pos_embed: grid {a}x{a} -> {b}x{b} (bicubic), "
                          f"{p} prefix tokens kept", _grid_writer(p, a, b)), None
    if len(src_shape) == 2 and src_shape[1] == dst_shape[1]:
        if len(_prefix_tokens(src_shape[0], dst_shape[0])) >= 1 and src_shape[0] > 4:
            return None, (f"position table {list(src_shape)} -> {list(dst_shape)} could be a grid "
                          "(with class tokens) or a sequence; not guessed")
        a, b = src_shape[0], dst_shape[0]
        how = (f"pos_embed: sequence {a} -> {b} (linear interpolation)" if b > a
               else f"pos_embed: first {b} of {a} positions")
        return Adaptation(("pos_embed",), how, _sequence_writer(b)), None
    return None, None


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
    if same_rank and src_role == dst_role == "position":
        shape_ad, pos_why = _position(src_shape, dst_shape)
        if shape_ad is None:
            return None, f"{mismatch}: {pos_why}" if pos_why else mismatch
        if "pos_embed" not in enabled:
            return None, f"{mismatch} (adapter 'pos_embed' disabled)"
    elif (same_rank and len(dst_shape) >= 3 and src_role == dst_role == "first_conv"
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
        fill = None
        names: tuple[str, ...] = ("rows",)
        if b > a and dst_role == "embedding" and ({"vocab_mean", "vocab_cov"} & enabled):
            fill = "cov" if "vocab_cov" in enabled else "mean"
            names += ("vocab_cov",) if fill == "cov" else ("vocab_mean",)
            start = ("drawn from the old rows' mean and covariance" if fill == "cov"
                     else "set to the old rows' mean")
            how = f"rows: {a} copied, {b - a} new rows {start} ({dst_role} grown {a}->{b})"
        elif b > a:
            how = f"rows: {a} copied, {b - a} new rows keep their init ({dst_role} grown {a}->{b})"
        else:
            how = f"rows: first {b} of {a} copied ({dst_role} cut {a}->{b})"
        shape_ad = Adaptation(names, how, _rows_writer(n, fill))
        if "rows" not in enabled:
            return None, f"{mismatch} (adapter 'rows' disabled)"
    if shape_ad is None:
        return None, why
    if cast:
        if "cast" not in enabled:
            return None, f"{mismatch} and dtype {_dtype(src_dtype)} != {_dtype(dst_dtype)} (adapter 'cast' disabled)"
        return Adaptation(shape_ad.adapters + ("cast",), f"{shape_ad.how}; {cast_how}", shape_ad.write), None
    return shape_ad, None
