"""Compare a recorded resume fingerprint with an observed one and word each divergence as a
:class:`Finding` for a person; pure functions over the fingerprints' JSON, shared by the live
checks and the folder history of :mod:`torchkeep.keep.doctor.live`."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["SEVERITIES", "Finding", "diagnose", "fmt", "fmt_shape"]

SEVERITIES = ("info", "warning")
_RNG_WORDS = {"python": "Python", "numpy": "numpy", "torch": "torch", "cuda": "CUDA", "mps": "MPS"}


# --------------------------------------------------------------------------------- helpers
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


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")

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
    optimizer-state fates from :class:`~torchkeep.carry.migration.optimizer.MigrationReport.summary`).
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

