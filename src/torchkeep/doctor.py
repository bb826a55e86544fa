"""The resume doctor: say in words why a resumed run does not continue the original one.

Every checkpoint a :class:`~torchkeep.CheckpointManager` saves records a *fingerprint* of the
run at that moment (:func:`record`, built on :func:`torchkeep.fingerprint.observe`): global step,
epoch and position, LRs, scheduler, scaler and optimizer steps, hashes of the RNG and generator
states and of the next batch's sample indices, and the model's parameter names and shapes.
Hashes, not states: the fingerprint is small JSON in the commit record.

A restore observes the same quantities from the live objects twice: right after the restore, and
when the run asks for its first batch (``TrainState.batches``), which is when the mistakes that
happen *after* a restore show (a scheduler rebuilt, the RNG re-seeded, a scaler replaced). Each
divergence becomes a :class:`Finding` worded for a person ("the scheduler was rebuilt, not
restored: LR 1e-3, expected 4.2e-4"), logged as a warning, and recorded with the next checkpoint
together with what was expected and observed, so ``torchkeep doctor DIR`` can explain a resume
after the fact (:func:`diagnose_folder`), also across later rotation. The wording of findings
lives in :mod:`torchkeep.diagnosis`.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .diagnosis import (SEVERITIES, Finding, _names, _param_findings, _plural, _what, diagnose, fmt,
                        fmt_shape)
from .errors import StateError
from .fingerprint import VERSION, next_batch, observe

if TYPE_CHECKING:  # pragma: no cover
    from .migrate import MigrationReport
    from .state import TrainState

__all__ = ["VERSION", "SEVERITIES", "observe", "next_batch", "record", "Finding", "diagnose", "fmt",
           "fmt_shape", "after_restore", "check", "findings", "Boundary", "FolderReport",
           "diagnose_folder", "to_json"]

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------- sessions
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
