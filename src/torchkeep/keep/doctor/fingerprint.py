"""The resume fingerprint of a run: what :func:`observe` reads from a TrainState's live objects
(step and position, LRs, scheduler, scaler and optimizer steps, hashes of RNG and generator states
and of the next batch's sample indices, parameter names and shapes) as small JSON, so
:mod:`torchkeep.keep.doctor.live` can compare a resumed run against the original one.

The next batch is found without loading data: the index sampler is replayed from the generator
states the epoch started from (as :mod:`torchkeep.keep.progress` does to resume), with every global
generator set back afterwards.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch.utils.data import DataLoader, IterableDataset

from torchkeep.keep import progress as _progress
from torchkeep.keep import rng as _rng

if TYPE_CHECKING:  # pragma: no cover
    from torchkeep.keep.trainstate import TrainState

__all__ = ["VERSION", "observe", "next_batch"]

log = logging.getLogger(__name__)

VERSION = 1


def _digest(obj: Any) -> str:
    """A short stable hash of an RNG state, generator state or index list."""
    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            h.update(b"T")
            h.update(o.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                     if o.dtype != torch.bool else o.cpu().numpy().tobytes())
        elif hasattr(o, "tobytes") and hasattr(o, "dtype"):  # numpy
            h.update(b"A")
            h.update(o.tobytes())
        elif isinstance(o, Mapping):
            h.update(b"{")
            for k in sorted(o, key=str):
                feed(str(k))
                feed(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for x in o:
                feed(x)
            h.update(b"]")
        else:
            h.update(repr(o).encode())
            h.update(b";")

    feed(obj)
    return h.hexdigest()[:16]


def _num(x: Any) -> Any:
    """A JSON-able number (non-finite floats as strings), None stays None."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        return x
    try:
        f = float(x)
    except (TypeError, ValueError):
        return repr(x)
    return f if math.isfinite(f) else repr(f)


def _path(part: str, name: str) -> str:
    return f"{part}.{name}" if name else part


def _flat(model: str, name: str) -> str:
    return f"{model}.{name}" if model else name


# ------------------------------------------------------------------------------ next batch
def _index_sampler(loader: DataLoader) -> Any:
    s = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    return s.inner if isinstance(s, _progress.ResumableIndexSampler) else s


def next_batch(loader: DataLoader, p: _progress.LoaderProgress) -> tuple[list[Any] | None, int, int]:
    """The sample indices of the batch ``loader`` hands out next after ``p``, with its epoch and
    position: replayed from the generators, with every generator set back afterwards. None where
    there are no indices (an IterableDataset) or the epoch's start was not recorded."""
    epoch, position, start = p.epoch, p.position, p.epoch_start
    if isinstance(loader.dataset, IterableDataset):
        return None, epoch, position
    inner = _index_sampler(loader)
    try:
        n = len(inner)
    except TypeError:
        n = None
    if position > 0 and n is not None and position >= n:
        epoch, position, start = epoch + 1, 0, None  # the epoch is used up: the next one's first
    if position > 0 and not start:
        return None, epoch, position
    now_rng = _rng.capture(devices=False)
    now_gens = _progress.generator_states(loader)
    try:
        if position > 0:
            _rng.restore(start["rng"])
            _progress.set_generator_states(loader, start.get("generators") or {}, strict=False)
        _progress.set_epoch(loader, epoch)
        # The draws of DataLoader.__iter__, in its order: the sampler's iterator, then the base
        # seed (not drawn again by a persistent worker pool's reset), then the batches.
        it = iter(inner)
        if not (loader.persistent_workers and getattr(loader, "_iterator", None) is not None):
            torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        first = None
        for i, batch in enumerate(it):
            if i == position:
                first = batch
                break
    finally:
        _rng.restore(now_rng)
        _progress.set_generator_states(loader, now_gens, strict=False)
        _progress.set_epoch(loader, p.epoch)
    if first is None:
        return None, epoch, position
    if isinstance(first, torch.Tensor):
        first = first.tolist()
    return (list(first) if isinstance(first, (list, tuple)) else [first]), epoch, position


# ----------------------------------------------------------------------------- fingerprint
def _is_scheduler(obj: Any) -> bool:
    sched = torch.optim.lr_scheduler
    return issubclass(type(obj), (sched.LRScheduler, sched.ReduceLROnPlateau))  # type(): no proxies


def _held_schedulers(schedulers: Iterable[Any]) -> set[int]:
    """ids of the given schedulers and of those nested in them (SequentialLR, ChainedScheduler)."""
    out: set[int] = set()
    stack = list(schedulers)
    while stack:
        s = stack.pop()
        if id(s) in out:
            continue
        out.add(id(s))
        stack.extend(getattr(s, "_schedulers", None) or [])
    return out


def _referring_schedulers(opts: list[Any]) -> list[Any]:
    """Schedulers that refer to one of ``opts`` (through their ``optimizer`` attribute, held in
    the instance or in its ``__dict__``): the garbage collector's referrers, found in C rather
    than by walking every object in Python (a walk cost ~1 s per restore in a large process)."""
    import gc

    found: dict[int, Any] = {}
    for r in gc.get_referrers(*opts):
        if _is_scheduler(r):
            found[id(r)] = r
        elif isinstance(r, dict) and any(r.get("optimizer") is o for o in opts):
            for owner in gc.get_referrers(r):
                if _is_scheduler(owner) and getattr(owner, "__dict__", None) is r:
                    found[id(owner)] = owner
    return list(found.values())


def _foreign_schedulers(state: "TrainState") -> dict[int, list[dict[str, Any]]]:
    """Schedulers alive in this process that drive one of the state's optimizers but are not part
    of the state: id(optimizer) -> their type and step count. (Asks the garbage collector for
    the optimizers' referrers, so only done when a restore is checked, never at a save.)"""
    opts = {id(o): o for o in state._parts["optimizer"].values()}
    held = _held_schedulers(state._parts["scheduler"].values())
    out: dict[int, list[dict[str, Any]]] = {}
    for obj in _referring_schedulers(list(opts.values())) if opts else []:
        try:
            if id(obj) in held:
                continue
            opt = getattr(obj, "optimizer", None)
        except ReferenceError:  # pragma: no cover - a dead weak proxy
            continue
        if id(opt) in opts and opts[id(opt)] is opt:
            out.setdefault(id(opt), []).append({"type": type(obj).__name__,
                                                "last_epoch": getattr(obj, "last_epoch", None)})
    return out


def observe(state: "TrainState", *, deep: bool = False) -> dict[str, Any]:
    """The fingerprint of ``state``'s live objects now (JSON-able; see the module docstring).
    ``deep`` also looks for schedulers outside the state that drive its optimizers."""
    out: dict[str, Any] = {"version": VERSION, "step": int(state.step), "epoch": int(state.epoch),
                           "position": int(state.position)}
    out["params"], out["frozen"] = _observe_params(state)
    out["optimizers"] = _observe_optimizers(state, deep)
    out["schedulers"] = _observe_schedulers(state)
    out["scalers"] = _observe_scalers(state)
    out["rng"] = ({k: ([_digest(x) for x in v] if k == "cuda" else _digest(v))
                   for k, v in _rng.capture().items()} if state.capture_rng else None)
    out["loaders"] = {lname or "dataloader": _observe_loader(lname, dl, state._progress[lname])
                      for lname, dl in state._loaders.items()}
    return out


def _observe_params(state: "TrainState") -> tuple[dict[str, list[int]], list[str]]:
    """Every model parameter's shape by flat name, and the frozen ones."""
    params: dict[str, list[int]] = {}
    frozen: list[str] = []
    for mname, m in state._parts["model"].items():
        if isinstance(m, torch.nn.Module):
            for n, prm in m.named_parameters():
                fn = _flat(mname, n)
                params[fn] = [int(s) for s in prm.shape]
                if not prm.requires_grad:
                    frozen.append(fn)
    return params, frozen


def _observe_optimizers(state: "TrainState", deep: bool) -> dict[str, Any]:
    """Per optimizer: type, parameter count, parameters without state, LRs and step count."""
    names = state._param_names()
    opts: dict[str, Any] = {}
    for oname, opt in state._parts["optimizer"].items():
        steps, stateless, n = [], [], 0
        for g in opt.param_groups:
            for prm in g["params"]:
                n += 1
                st = opt.state.get(prm)
                if not st:
                    stateless.append(names.get(id(prm)) or f"<param {n - 1}>")
                elif st.get("step") is not None:
                    steps.append(_num(st["step"]))
        numeric = [s for s in steps if isinstance(s, (int, float))]
        opts[_path("optimizer", oname)] = {
            "type": type(opt).__name__, "params": n, "stateless": stateless,
            "lr": [_num(g.get("lr")) for g in opt.param_groups],
            "initial_lr": [_num(g.get("initial_lr")) for g in opt.param_groups],
            "step": max(numeric) if numeric else None}
    if deep:
        foreign = _foreign_schedulers(state)
        for oname, opt in state._parts["optimizer"].items():
            if id(opt) in foreign:
                opts[_path("optimizer", oname)]["foreign_schedulers"] = foreign[id(opt)]
    return opts


def _observe_schedulers(state: "TrainState") -> dict[str, Any]:
    scheds: dict[str, Any] = {}
    for sname, s in state._parts["scheduler"].items():
        rec: dict[str, Any] = {"type": type(s).__name__, "last_epoch": getattr(s, "last_epoch", None)}
        last = getattr(s, "_last_lr", None)
        if isinstance(last, (list, tuple)):
            rec["last_lr"] = [_num(x) for x in last]
        scheds[_path("scheduler", sname)] = rec
    return scheds


def _observe_scalers(state: "TrainState") -> dict[str, Any]:
    scalers: dict[str, Any] = {}
    for cname, c in state._parts["scaler"].items():
        rec: dict[str, Any] = {"type": type(c).__name__}
        try:
            enabled = bool(c.is_enabled())
            rec["enabled"] = enabled
            rec["scale"] = _num(c.get_scale()) if enabled else None
            rec["init_scale"] = _num(getattr(c, "_init_scale", None))
            rec["growth_tracker"] = int(c._get_growth_tracker()) if enabled else None
        except Exception:  # a scaler-like object of another kind: its state as a hash
            rec["state"] = _digest(c.state_dict()) if hasattr(c, "state_dict") else None
        scalers[_path("scaler", cname)] = rec
    return scalers


def _observe_loader(lname: str, dl: Any, p: Any) -> dict[str, Any]:
    """A loader's position, generator hashes, sizes, and the hash of its next batch's indices
    (the sampler is replayed; no data is loaded)."""
    rec: dict[str, Any] = {
        "epoch": p.epoch, "position": p.position,
        "generators": {w: _digest(g.get_state()) for w, g in _progress.generators(dl).items()}}
    try:
        rec["samples"] = len(dl.dataset)  # type: ignore[arg-type]
    except TypeError:
        rec["samples"] = None
    try:
        rec["batches"] = len(dl)
    except TypeError:
        rec["batches"] = None
    try:
        idx, e, pos = next_batch(dl, p)
        rec["next_batch"] = None if idx is None else _digest(
            [_num(i) if isinstance(i, (int, float, torch.Tensor)) else repr(i) for i in idx])
        rec["next_at"] = [e, pos]
    except Exception as exc:  # a sampler that cannot be replayed: say so, do not fail a save
        log.debug("next batch of dataloader %r not found: %s", lname, exc)
        rec["next_batch"], rec["next_at"] = None, None
    return rec

