"""The resume doctor: say in words why a resumed run does not continue the original one.

Every checkpoint a :class:`~torchkeep.CheckpointManager` saves records a *fingerprint* of the
run at that moment (:func:`record`): global step, epoch and position, LR of every param group,
the schedulers' step counts, the GradScaler's scale, optimizer step counts, hashes of the RNG
states and of the dataloaders' generators, the hash of the sample indices of the *next* batch,
and the model's parameter names and shapes. Hashes, not states: the fingerprint is small JSON
in the commit record.

A restore observes the same quantities from the live objects twice: right after the restore, and
when the run asks for its first batch (``TrainState.batches``), which is when the mistakes that
happen *after* a restore show (a scheduler rebuilt, the RNG re-seeded, a scaler replaced). Each
divergence becomes a :class:`Finding` worded for a person ("the scheduler was rebuilt, not
restored: LR 1e-3, expected 4.2e-4"), logged as a warning, and recorded with the next checkpoint
together with what was expected and observed, so ``torchkeep doctor DIR`` can explain a resume
after the fact (:func:`diagnose_folder`), also across later rotation.

The next batch is found without loading data: the index sampler is replayed from the generator
states the epoch started from (as :mod:`torchkeep.progress` does to resume), with every global
generator set back afterwards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch.utils.data import DataLoader, IterableDataset

from . import progress as _progress
from . import rng as _rng
from .errors import StateError

if TYPE_CHECKING:  # pragma: no cover
    from .migrate import MigrationReport
    from .state import TrainState

log = logging.getLogger(__name__)

VERSION = 1
SEVERITIES = ("info", "warning")
_RNG_WORDS = {"python": "Python", "numpy": "numpy", "torch": "torch", "cuda": "CUDA", "mps": "MPS"}


# --------------------------------------------------------------------------------- helpers
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


def fmt(x: Any) -> str:
    """A number the way a person writes it: 1e-3, 4.2e-4, 0.1, 65536."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e12:
        return str(int(x))
    if isinstance(x, int):
        return str(x)
    a = abs(x)
    if a == 0:
        return "0"
    if 1e-2 <= a < 1e5:
        return f"{x:.4g}"
    mant, exp = f"{x:.2e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _path(part: str, name: str) -> str:
    return f"{part}.{name}" if name else part


def _flat(model: str, name: str) -> str:
    return f"{model}.{name}" if model else name


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


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


def _foreign_schedulers(state: "TrainState") -> dict[int, list[dict[str, Any]]]:
    """Schedulers alive in this process that drive one of the state's optimizers but are not part
    of the state: id(optimizer) -> their type and step count. (A walk over the garbage
    collector's objects, so only done when a restore is checked, never at a save.)"""
    import gc

    opts = {id(o): o for o in state._parts["optimizer"].values()}
    held = _held_schedulers(state._parts["scheduler"].values())
    out: dict[int, list[dict[str, Any]]] = {}
    for obj in gc.get_objects():
        try:
            if not _is_scheduler(obj) or id(obj) in held:
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
    parts = state._parts
    out: dict[str, Any] = {"version": VERSION, "step": int(state.step), "epoch": int(state.epoch),
                           "position": int(state.position)}
    params: dict[str, list[int]] = {}
    frozen: list[str] = []
    for mname, m in parts["model"].items():
        if isinstance(m, torch.nn.Module):
            for n, prm in m.named_parameters():
                fn = _flat(mname, n)
                params[fn] = [int(s) for s in prm.shape]
                if not prm.requires_grad:
                    frozen.append(fn)
    out["params"] = params
    out["frozen"] = frozen
    names = state._param_names()
    opts: dict[str, Any] = {}
    for oname, opt in parts["optimizer"].items():
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
        for oname, opt in parts["optimizer"].items():
            if id(opt) in foreign:
                opts[_path("optimizer", oname)]["foreign_schedulers"] = foreign[id(opt)]
    out["optimizers"] = opts
    scheds: dict[str, Any] = {}
    for sname, s in parts["scheduler"].items():
        rec: dict[str, Any] = {"type": type(s).__name__, "last_epoch": getattr(s, "last_epoch", None)}
        last = getattr(s, "_last_lr", None)
        if isinstance(last, (list, tuple)):
            rec["last_lr"] = [_num(x) for x in last]
        scheds[_path("scheduler", sname)] = rec
    out["schedulers"] = scheds
    scalers: dict[str, Any] = {}
    for cname, c in parts["scaler"].items():
        rec = {"type": type(c).__name__}
        try:
            enabled = bool(c.is_enabled())
            rec["enabled"] = enabled
            rec["scale"] = _num(c.get_scale()) if enabled else None
            rec["init_scale"] = _num(getattr(c, "_init_scale", None))
            rec["growth_tracker"] = int(c._get_growth_tracker()) if enabled else None
        except Exception:  # a scaler-like object of another kind: its state as a hash
            rec["state"] = _digest(c.state_dict()) if hasattr(c, "state_dict") else None
        scalers[_path("scaler", cname)] = rec
    out["scalers"] = scalers
    out["rng"] = ({k: ([_digest(x) for x in v] if k == "cuda" else _digest(v))
                   for k, v in _rng.capture().items()} if state.capture_rng else None)
    loaders: dict[str, Any] = {}
    for lname, dl in state._loaders.items():
        p = state._progress[lname]
        rec = {"epoch": p.epoch, "position": p.position,
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
            rec["next_batch"] = None if idx is None else _digest([_num(i) if isinstance(i, (int, float, torch.Tensor)) else repr(i) for i in idx])
            rec["next_at"] = [e, pos]
        except Exception as exc:  # a sampler that cannot be replayed: say so, do not fail a save
            log.debug("next batch of dataloader %r not found: %s", lname, exc)
            rec["next_batch"], rec["next_at"] = None, None
        loaders[lname or "dataloader"] = rec
    out["loaders"] = loaders
    return out


@dataclass
class _Session:
    """One process's run of a TrainState: its id, and what it was restored from."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    resumed: dict[str, Any] | None = None
    recorded: dict[str, Any] | None = None
    findings: list["Finding"] = field(default_factory=list)


_SESSIONS: "weakref.WeakKeyDictionary[Any, _Session]" = weakref.WeakKeyDictionary()


def _session(state: "TrainState") -> _Session:
    s = _SESSIONS.get(state)
    if s is None:
        s = _SESSIONS[state] = _Session()
    return s


def record(state: "TrainState") -> dict[str, Any]:
    """The fingerprint a save stores: :func:`observe`, the run's session id and, after a
    restore, what the restored run was expected to be and what it was."""
    fp = observe(state)
    s = _session(state)
    fp["session"] = s.id
    if s.resumed is not None:
        fp["resumed"] = s.resumed
    return fp


# -------------------------------------------------------------------------------- findings
@dataclass
class Finding:
    """One divergence between a restored run and the run it continues, in words."""

    kind: str          # params | frozen | progress | optimizer | scheduler | lr | scaler | rng | data | restart
    message: str
    severity: str = "warning"
    expected: Any = None
    observed: Any = None

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "message": self.message,
                "expected": self.expected, "observed": self.observed}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Finding":
        return cls(d.get("kind", "?"), d.get("message", ""), d.get("severity", "warning"),
                   d.get("expected"), d.get("observed"))


def _state_words(names: list[str], fates: Mapping[str, str], observed: Mapping[str, Any]) -> str:
    """How the optimizer state of ``names`` came out, e.g. 'optimizer state fresh for them'."""
    stateless = {n for o in (observed.get("optimizers") or {}).values() for n in o.get("stateless", [])}
    words = []
    for n in names:
        if n in fates:
            words.append(fates[n])
        elif n in stateless:
            words.append("fresh")
        elif observed.get("optimizers"):
            held = any(n not in o.get("stateless", []) for o in observed["optimizers"].values())
            words.append("carried" if held else "untrained")
    if not words:
        return ""
    if len(set(words)) == 1:
        w = words[0]
        if w == "untrained":
            return "no optimizer trains them"
        return f"optimizer state {w} for {'it' if len(names) == 1 else 'them'}"
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    return "optimizer state: " + ", ".join(f"{c} {w}" for w, c in counts.items())


def _param_findings(rec: Mapping[str, Any], obs: Mapping[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    rp, op = rec.get("params"), obs.get("params")
    if rp is None or op is None:
        return out
    mig = obs.get("migration") or {}
    fates = mig.get("fates") or {}
    # A restore with migrate=True asked for a changed model: its changes are notes, not problems.
    changed = "info" if obs.get("migration") is not None else "warning"
    renamed = {t: s for t, s in (mig.get("renamed") or {}).items() if t in op and s in rp and t not in rp}
    taken = set(renamed.values())
    gained = [n for n in op if n not in rp and n not in renamed]
    removed = [n for n in rp if n not in op and n not in taken]
    reshaped = [n for n in op if n in rp and list(op[n]) != list(rp[n])]
    if renamed:
        pairs = [f"{s} -> {t}" for t, s in renamed.items()]
        words = _state_words(list(renamed), fates, obs)
        out.append(Finding("params", f"{_plural(len(renamed), 'parameter')} renamed: {_names(pairs, 4)}"
                           + (f"; {words}" if words else ""), "info",
                           expected=list(taken), observed=list(renamed)))
    if gained:
        words = _state_words(gained, fates, obs)
        out.append(Finding("params", f"{_plural(len(gained), 'parameter')} gained: {_names(gained)}"
                           + (f"; {words}" if words else ""), changed, expected=None, observed=gained))
    if removed:
        out.append(Finding("params", f"{_plural(len(removed), 'parameter')} removed: {_names(removed)}; "
                           f"their weights and optimizer state were dropped", changed, expected=removed))
    if reshaped:
        shown = [f"{n} {fmt_shape(rp[n])} -> {fmt_shape(op[n])}" for n in reshaped]
        words = _state_words(reshaped, fates, obs)
        out.append(Finding("params", f"{_plural(len(reshaped), 'parameter')} reshaped: {_names(shown, 4)}"
                           + (f"; {words}" if words else ""), changed,
                           expected={n: rp[n] for n in reshaped}, observed={n: op[n] for n in reshaped}))
    rf, of = rec.get("frozen"), obs.get("frozen")
    if rf is not None and of is not None:
        newly = [n for n in of if n not in rf and n in rp]
        thawed = [n for n in rf if n not in of and n in op]
        if newly:
            out.append(Finding("frozen", f"{_plural(len(newly), 'parameter')} frozen since the checkpoint: "
                               f"{_names(newly)}", "info", observed=newly))
        if thawed:
            out.append(Finding("frozen", f"{_plural(len(thawed), 'parameter')} no longer frozen: "
                               f"{_names(thawed)}", "info", observed=thawed))
    return out


def fmt_shape(s: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(x)) for x in s) + "]"


def _progress_findings(rec: Mapping[str, Any], obs: Mapping[str, Any]) -> list[Finding]:
    out = []
    if rec.get("step") is not None and obs.get("step") != rec.get("step"):
        out.append(Finding("progress", f"the global step is {obs.get('step')}, expected {rec['step']}: "
                           "the training progress was not restored", expected=rec["step"],
                           observed=obs.get("step")))
    re_, rp = rec.get("epoch"), rec.get("position")
    oe, op = obs.get("epoch"), obs.get("position")
    if re_ is not None and (oe, op) != (re_, rp):
        out.append(Finding("progress", f"the run is at epoch {oe}, batch {op}; the checkpoint at epoch "
                           f"{re_}, batch {rp}: the position in the data was not restored",
                           expected=[re_, rp], observed=[oe, op]))
    return out


def _optimizer_findings(rec: Mapping[str, Any], obs: Mapping[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    ro, oo = rec.get("optimizers") or {}, obs.get("optimizers") or {}
    rs, os_ = rec.get("schedulers") or {}, obs.get("schedulers") or {}
    sched_found = False
    for path, r in rs.items():
        o = os_.get(path)
        if o is None:
            out.append(Finding("scheduler", f"the {_what(path, 'scheduler')} was not restored (this state has "
                               f"none): the checkpoint's schedule is at step {r.get('last_epoch')}, a rebuilt "
                               "one starts over", expected=r.get("last_epoch")))
            sched_found = True
            continue
        re_, oe = r.get("last_epoch"), o.get("last_epoch")
        rl, ol = r.get("last_lr") or [], o.get("last_lr") or []
        lr_diff = [(i, a, b) for i, (a, b) in enumerate(zip(ol, rl)) if not _close(a, b)]
        if re_ != oe or lr_diff:
            msg = f"the {_what(path, 'scheduler')} was rebuilt, not restored: "
            if lr_diff:
                i, a, b = lr_diff[0]
                msg += f"LR {fmt(a)}, expected {fmt(b)}"
                if re_ != oe:
                    msg += f" (its step count is {oe}, expected {re_})"
            else:
                msg += f"its step count is {oe}, expected {re_}"
            out.append(Finding("scheduler", msg, expected={"last_epoch": re_, "last_lr": rl},
                               observed={"last_epoch": oe, "last_lr": ol}))
            sched_found = True
    for path, r in ro.items():
        o = oo.get(path)
        what = _what(path, "optimizer")
        if o is None:
            out.append(Finding("optimizer", f"the {what} is not part of the restored state: its state "
                               f"(step {r.get('step')}) starts from zero", expected=r.get("step")))
            continue
        rstep, ostep = r.get("step"), o.get("step")
        if isinstance(rstep, (int, float)) and rstep > 0:
            if not ostep:
                out.append(Finding("optimizer", f"the {what} state was not restored: {o.get('type', '')} step "
                                   f"count {fmt(ostep or 0)}, expected {fmt(rstep)} (its moments start from "
                                   "zero)", expected=rstep, observed=ostep))
            elif not _close(ostep, rstep):
                out.append(Finding("optimizer", f"the {what} step count is {fmt(ostep)}, expected {fmt(rstep)}",
                                   expected=rstep, observed=ostep))
        rl, ol = r.get("lr") or [], o.get("lr") or []
        if sched_found or len(rl) != len(ol):
            continue  # the scheduler finding says it, or the groups changed (a migration)
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(ol, rl)) if not _close(a, b)]
        if not diff:
            continue
        i, a, b = diff[0]
        init = (o.get("initial_lr") or [None] * len(ol))[i]
        more = f" (param group {i}" + (f" and {len(diff) - 1} more" if len(diff) > 1 else "") + ")" \
            if len(ol) > 1 else ""
        foreign = o.get("foreign_schedulers") or []
        if foreign:
            f0 = foreign[0]
            msg = (f"the scheduler was rebuilt, not restored: LR {fmt(a)}, expected {fmt(b)}{more}; a new "
                   f"{f0['type']} at step {f0['last_epoch']} drives the {what}, not the restored one")
            kind = "scheduler"
        elif init is not None and _close(a, init) and not _close(b, init):
            msg = f"the scheduler was rebuilt, not restored: LR {fmt(a)}, expected {fmt(b)}{more}"
            kind = "scheduler"
        else:
            msg = f"the LR is {fmt(a)}, expected {fmt(b)}{more}: it was changed after the restore"
            kind = "lr"
        out.append(Finding(kind, msg, expected=rl, observed=ol))
    return out


def _what(path: str, word: str) -> str:
    return word if path == word else f"{word} {path.split('.', 1)[1]!r}"


def _scaler_findings(rec: Mapping[str, Any], obs: Mapping[str, Any]) -> list[Finding]:
    out = []
    rs, os_ = rec.get("scalers") or {}, obs.get("scalers") or {}
    for path, r in rs.items():
        o = os_.get(path)
        what = "GradScaler" if path == "scaler" else f"GradScaler {path.split('.', 1)[1]!r}"
        if o is None:
            out.append(Finding("scaler", f"the {what} was not restored (this state has none): scale "
                               f"{fmt(r.get('scale'))} in the checkpoint, a new one starts over",
                               expected=r.get("scale")))
            continue
        a, b = o.get("scale"), r.get("scale")
        if a is None or b is None or _close(a, b):
            if r.get("state") is not None and r.get("state") != o.get("state"):
                out.append(Finding("scaler", f"the {what}'s state differs from the checkpoint's"))
            continue
        if _close(a, o.get("init_scale")) and not o.get("growth_tracker"):
            out.append(Finding("scaler", f"the {what} was reset, not restored: scale {fmt(a)}, expected {fmt(b)}",
                               expected=b, observed=a))
        else:
            out.append(Finding("scaler", f"the {what}'s scale is {fmt(a)}, expected {fmt(b)}",
                               expected=b, observed=a))
    return out


def _words(keys: list[str]) -> str:
    w = [_RNG_WORDS.get(k, k) for k in keys]
    return w[0] if len(w) == 1 else ", ".join(w[:-1]) + " and " + w[-1]


def _rng_findings(rec: Mapping[str, Any], obs: Mapping[str, Any]) -> list[Finding]:
    r, o = rec.get("rng"), obs.get("rng")
    if not r:
        return []
    if o is None:
        return [Finding("rng", "the RNG is not part of the restored state (TrainState(rng=False)): random "
                        "draws (dropout, augmentation, shuffling) differ from the original run")]
    diff = [k for k in r if k in o and r[k] != o[k]]
    if not diff:
        return []
    at_restore = obs.get("rng_at_restore")
    late = [k for k in diff if at_restore is not None and at_restore.get(k) == r[k]]
    early = [k for k in diff if k not in late]
    out = []
    if late:
        out.append(Finding("rng", f"the {_words(late)} RNG was restored at the wrong moment: at the first "
                           "batch it differs from the checkpoint's, though the restore had set it (random "
                           "numbers were drawn, or a seed was set, between the restore and the first batch)",
                           expected={k: r[k] for k in late}, observed={k: o[k] for k in late}))
    if early:
        out.append(Finding("rng", f"the {_words(early)} RNG state was not restored: it differs from the "
                           "checkpoint's", expected={k: r[k] for k in early},
                           observed={k: o[k] for k in early}))
    return out


def _data_findings(rec: Mapping[str, Any], obs: Mapping[str, Any]) -> list[Finding]:
    out = []
    rl, ol = rec.get("loaders") or {}, obs.get("loaders") or {}
    for name, r in rl.items():
        what = "dataloader" if name == "dataloader" else f"dataloader {name!r}"
        o = ol.get(name)
        at = r.get("next_at") or [r.get("epoch"), r.get("position")]
        if o is None:
            out.append(Finding("data", f"the {what} is not part of the restored state: the data order and "
                               f"the position in the epoch (batch {at[1]} of epoch {at[0]}) are not restored"))
            continue
        why = []
        if r.get("samples") is not None and o.get("samples") != r.get("samples"):
            why.append(f"the dataset has {o.get('samples')} samples, the original run's {r['samples']}")
        if r.get("batches") is not None and o.get("batches") != r.get("batches"):
            why.append(f"{o.get('batches')} batches per epoch, the original run had {r['batches']}")
        gdiff = sorted(set(r.get("generators") or {}) ^ set(o.get("generators") or {})) + \
            [w for w in (r.get("generators") or {}) if w in (o.get("generators") or {})
             and r["generators"][w] != o["generators"][w]]
        if gdiff:
            why.append(f"its {', '.join(gdiff)} generator is not in the checkpoint's state")
        rn, on = r.get("next_batch"), o.get("next_batch")
        if rn is not None and rn != on:
            if not why and (rec.get("rng") or {}).get("torch") != (obs.get("rng") or {}).get("torch"):
                why.append("the global RNG that shuffles it differs")
            msg = f"the data order differs from the original run from batch {at[1]}" + \
                (f" of epoch {at[0]}" if at[0] else "")
            out.append(Finding("data", msg + (f" ({'; '.join(why)})" if why else ""),
                               expected={"next_batch": rn, "at": at},
                               observed={"next_batch": on, "at": o.get("next_at")}))
        elif gdiff:
            out.append(Finding("data", f"the {what}'s {', '.join(gdiff)} generator differs from the "
                               "checkpoint's: later epochs will be shuffled differently"))
    return out


def diagnose(recorded: Mapping[str, Any], observed: Mapping[str, Any]) -> list[Finding]:
    """Every divergence between a checkpoint's fingerprint and a restored run's, in words.

    ``observed`` may carry ``rng_at_restore`` (the RNG hashes right after the restore, to tell
    'restored at the wrong moment' from 'not restored') and ``migration`` (renames and
    optimizer-state fates from :class:`~torchkeep.migrate.MigrationReport.summary`).
    """
    if not recorded or not observed:
        return []
    out: list[Finding] = []
    out += _param_findings(recorded, observed)
    out += _progress_findings(recorded, observed)
    out += _optimizer_findings(recorded, observed)
    out += _scaler_findings(recorded, observed)
    out += _rng_findings(recorded, observed)
    out += _data_findings(recorded, observed)
    return out


# ------------------------------------------------------------------------ the live checks
def _report(findings: list[Finding], step: int, when: str, already: set[str]) -> None:
    for f in findings:
        if f.message in already:
            continue
        already.add(f.message)
        (log.warning if f.severity == "warning" else log.info)(
            "resume from step %d (%s): %s", step, when, f.message)


def _strip(fp: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if fp is None else {k: v for k, v in fp.items() if k not in ("resumed", "session")}


def after_restore(state: "TrainState", recorded: Mapping[str, Any] | None, step: int, *,
                  migration: "MigrationReport | None" = None) -> list[Finding]:
    """Check ``state`` right after it was restored from the checkpoint of ``step`` (whose
    fingerprint is ``recorded``), log each divergence, and arrange the check at its first batch.
    Starts a new session: the next saves record what this restore was expected to give."""
    s = _SESSIONS[state] = _Session()
    expected = _strip(recorded)
    obs = observe(state, deep=True)
    if migration is not None:
        obs["migration"] = migration.summary()
    findings = diagnose(expected, obs) if expected else []
    s.recorded = expected
    s.findings = findings
    s.resumed = {"from": step, "at": "restore", "expected": expected, "observed": obs,
                 "findings": [f.to_dict() for f in findings]}
    seen: set[str] = set()
    _report(findings, step, "right after the restore", seen)
    if expected is not None and state._loaders and hasattr(state, "before_first_batch"):
        rng_at_restore = obs.get("rng")

        def first_batch(st: "TrainState", loader: str | None = None) -> None:
            later = observe(st, deep=True)
            later["rng_at_restore"] = rng_at_restore
            if "migration" in obs:
                later["migration"] = obs["migration"]
            found = diagnose(expected, later)
            s.findings = found
            s.resumed = {"from": step, "at": "first batch", "expected": expected, "observed": later,
                         "findings": [f.to_dict() for f in found]}
            _report(found, step, "at its first batch", seen)

        state.before_first_batch = first_batch
    return findings


def check(state: "TrainState") -> list[Finding]:
    """Compare ``state`` now with the checkpoint it was restored from (call it just before the
    training loop, e.g. when the run has no dataloader in its state)."""
    s = _SESSIONS.get(state)
    if s is None or s.resumed is None:
        raise StateError("this TrainState was not restored by a CheckpointManager: there is nothing "
                         "to compare it with", hint="call manager.restore(state) first")
    if s.recorded is None:
        return []
    obs = observe(state, deep=True)
    prev = s.resumed.get("observed") or {}
    obs["rng_at_restore"] = prev.get("rng_at_restore", prev.get("rng"))
    if "migration" in prev:
        obs["migration"] = prev["migration"]
    found = diagnose(s.recorded, obs)
    s.findings = found
    s.resumed = {**s.resumed, "at": "check", "observed": obs, "findings": [f.to_dict() for f in found]}
    return found


def findings(state: "TrainState") -> list[Finding]:
    """The findings of the latest check of ``state`` (after restore, at its first batch, check)."""
    s = _SESSIONS.get(state)
    return list(s.findings) if s is not None else []


# ------------------------------------------------------------------------------ a folder
@dataclass
class Boundary:
    """Where a run in a checkpoint folder did not simply continue the previous checkpoint."""

    step: int                      # the first checkpoint written after it
    kind: str                      # 'resume' (restored through the manager) | 'restart'
    resumed_from: int | None
    previous: int | None           # the checkpoint before it in the folder
    at: str = ""                   # where the resumed run was checked
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def title(self) -> str:
        if self.kind == "resume":
            where = {"first batch": "at its first batch", "restore": "right after the restore",
                     "check": "by manager.doctor()"}.get(self.at, self.at)
            return f"step {self.step}: resumed from step {self.resumed_from} (checked {where})"
        return (f"step {self.step}: written by a new run that did not restore through the manager "
                f"(the checkpoint before it is step {self.previous})")

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "resumed_from": self.resumed_from,
                "previous": self.previous, "at": self.at,
                "findings": [f.to_dict() for f in self.findings]}


@dataclass
class FolderReport:
    """What ``torchkeep doctor DIR`` found: the checkpoints and every resume boundary."""

    directory: str
    steps: list[int] = field(default_factory=list)
    sessions: int = 0
    without_fingerprint: list[int] = field(default_factory=list)
    boundaries: list[Boundary] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for b in self.boundaries for f in b.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def headline(self) -> str:
        if not self.steps:
            return f"{self.directory}: no committed checkpoints"
        runs = f"written by {_plural(self.sessions, 'run')}" if self.sessions else "without fingerprints"
        resumes = sum(b.kind == "resume" for b in self.boundaries)
        return (f"{self.directory}: {_plural(len(self.steps), 'checkpoint')} (steps {self.steps[0]}.."
                f"{self.steps[-1]}) {runs}, {_plural(resumes, 'resume')}")

    def verdict(self) -> str:
        n = len(self.problems)
        notes = sum(len(b.findings) for b in self.boundaries) - n
        if n:
            return f"{_plural(n, 'problem')} found" + (f" (and {_plural(notes, 'note')})" if notes else "")
        if notes:
            return f"no problems found ({_plural(notes, 'note')})"
        if any(b.kind == "resume" for b in self.boundaries):
            return "every resume continues its checkpoint exactly"
        return "no problems found"

    def lines(self) -> list[str]:
        out = [self.headline()]
        if self.without_fingerprint:
            out.append(f"no fingerprint recorded at steps {_names([str(s) for s in self.without_fingerprint])} "
                       "(saved by an older torchkeep or a plain mapping)")
        for b in self.boundaries:
            out.append(b.title())
            if not b.findings:
                out.append("  ok: the restored run matches its checkpoint")
            for f in b.findings:
                out.append(f"  {'!' if f.severity == 'warning' else '-'} {f.message}")
        out.append(self.verdict())
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "steps": self.steps, "sessions": self.sessions,
                "without_fingerprint": self.without_fingerprint, "ok": self.ok,
                "boundaries": [b.to_dict() for b in self.boundaries], "verdict": self.verdict()}


def _restart_findings(prev: Mapping[str, Any], cur: Mapping[str, Any]) -> list[Finding]:
    """What a checkpoint from a new run without a recorded restore shows against the previous
    checkpoint: its counters went back, or its parameters changed."""
    out: list[Finding] = []
    if isinstance(prev.get("step"), int) and isinstance(cur.get("step"), int) and cur["step"] <= prev["step"]:
        out.append(Finding("restart", f"the global step went back from {prev['step']} to {cur['step']}: a "
                           "new run started over in this folder", expected=prev["step"], observed=cur["step"]))
    for path, r in (prev.get("optimizers") or {}).items():
        o = (cur.get("optimizers") or {}).get(path) or {}
        a, b = o.get("step"), r.get("step")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a < b:
            out.append(Finding("optimizer", f"the {_what(path, 'optimizer')} step count fell from {fmt(b)} "
                               f"to {fmt(a)}: its state was not restored", expected=b, observed=a))
    out += [f for f in _param_findings(prev, cur) if f.kind == "params"]
    if not out:
        out.append(Finding("restart", "the run was restarted without CheckpointManager.restore, so the "
                           "doctor could not check it", "info"))
    return out


def diagnose_folder(directory: str | os.PathLike) -> FolderReport:
    """Read the fingerprints of every committed checkpoint of a CheckpointManager folder (commit
    records only) and explain each resume boundary."""
    from .formats import native
    from .store import storage_for

    d = os.fspath(directory)
    storage, root = storage_for(d)
    if "://" not in d and not os.path.isdir(d):
        raise FileNotFoundError(2, "no such folder", d)
    rep = FolderReport(d)
    if storage.exists(storage.join(root, native.COMMIT)):
        folders = [(native.parse_step(os.path.basename(root.rstrip("/"))) or 0, root)]
    else:
        folders = native.committed_steps(storage, root)
    prev: dict[str, Any] | None = None
    prev_step: int | None = None
    sessions: set[str] = set()
    for step, folder in sorted(folders):
        rec = native.read_commit(storage, folder) or {}
        rep.steps.append(step)
        fp = rec.get("doctor")
        if not isinstance(fp, Mapping):
            rep.without_fingerprint.append(step)
            prev, prev_step = None, step
            continue
        sid = fp.get("session")
        new_session = prev is not None and sid != prev.get("session")
        resumed = fp.get("resumed")
        if sid:
            if isinstance(resumed, Mapping) and sid not in sessions:
                found = [Finding.from_dict(f) for f in resumed.get("findings") or []]
                if resumed.get("expected") and resumed.get("observed"):
                    found = diagnose(resumed["expected"], resumed["observed"])
                rep.boundaries.append(Boundary(step, "resume", resumed.get("from"), prev_step,
                                               resumed.get("at", ""), found))
            elif new_session and sid not in sessions:
                rep.boundaries.append(Boundary(step, "restart", None, prev_step,
                                               findings=_restart_findings(prev, fp)))
            sessions.add(sid)
        prev, prev_step = dict(fp), step
    rep.sessions = len(sessions)
    return rep


def to_json(fp: Mapping[str, Any]) -> str:
    return json.dumps(fp, sort_keys=True)
