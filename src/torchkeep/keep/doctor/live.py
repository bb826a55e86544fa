"""The resume doctor: say in words why a resumed run does not continue the original one.

Every checkpoint a :class:`~torchkeep.CheckpointManager` saves records a *fingerprint* of the
run at that moment (:func:`record`, built on :func:`torchkeep.keep.doctor.fingerprint.observe`): global step,
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
lives in :mod:`torchkeep.keep.doctor.diagnosis`.
"""
from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torchkeep.errors import StateError
from torchkeep.keep.doctor.diagnosis import SEVERITIES, Finding, diagnose, fmt, fmt_shape
from torchkeep.keep.doctor.fingerprint import VERSION, next_batch, observe

if TYPE_CHECKING:  # pragma: no cover
    from torchkeep.carry.migration.optimizer import MigrationReport
    from torchkeep.keep.trainstate import TrainState

__all__ = ["VERSION", "SEVERITIES", "observe", "next_batch", "record", "Finding", "diagnose", "fmt",
           "fmt_shape", "after_restore", "check", "findings"]

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


