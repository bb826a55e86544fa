"""The resume doctor over a folder: what each recorded restart and resume says about the run."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torchkeep.keep.doctor.diagnosis import (Finding, _names, _param_findings, _plural, _what,
                                             diagnose, fmt)


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
    from torchkeep.read.formats import native
    from torchkeep.store.backends import storage_for

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
