"""The reports of an optimizer-state migration: each parameter's fate, each param group's source,
and a migrating restore's digest, with their text and JSON renderings (kept apart from the planning
in :mod:`torchkeep.carry.migration.optimizer` so the CLI and the doctor can read them without it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from torchkeep.carry.report import TransferReport

__all__ = ["FATES", "ParamFate", "GroupFate", "OptimizerReport", "MigrationReport"]

FATES = ("carried", "adapted", "reset", "fresh", "removed")


def _shape(s: Iterable[int] | None) -> str:
    return "-" if s is None else "[" + ", ".join(str(int(x)) for x in s) + "]"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return repr(v) if isinstance(v, str) else str(v)


# ---------------------------------------------------------------------------------- report
@dataclass
class ParamFate:
    """What happened to one parameter's optimizer state."""

    name: str                    # the target parameter ('removed': the source parameter)
    fate: str                    # one of FATES
    source: str | None = None    # the source parameter whose state it took
    detail: str = ""
    group: int | None = None     # target param group (None for 'removed')
    shape: tuple[int, ...] | None = None


@dataclass
class GroupFate:
    """Where one target param group took its hyper-parameters from."""

    group: int
    source: int | None           # the source group, None when no parameter of it had a source
    votes: int                   # parameters of the group whose source sat in ``source``
    size: int
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (before, carried)
    detail: str = ""


@dataclass
class OptimizerReport:
    """Every parameter's optimizer-state fate and where each param group's settings came from."""

    optimizer: str
    params: list[ParamFate] = field(default_factory=list)
    groups: list[GroupFate] = field(default_factory=list)
    names_from: str = ""         # how the saved state's parameter names were known
    note: str = ""
    applied: bool = False

    def names(self, fate: str) -> list[str]:
        """Parameters with the given fate, in the optimizer's order."""
        return [p.name for p in self.params if p.fate == fate]

    def fate(self, name: str) -> ParamFate:
        for p in self.params:
            if p.name == name and p.fate != "removed":
                return p
        raise KeyError(name)

    @property
    def counts(self) -> dict[str, int]:
        out = {f: 0 for f in FATES}
        for p in self.params:
            out[p.fate] += 1
        return out

    @property
    def exact(self) -> bool:
        """True when the saved state fits as is: every parameter's state carried under its own
        name, nothing removed, each group from the saved group at its position (what a plain
        ``load_state_dict`` would have done)."""
        return all(p.fate == "carried" and p.source == p.name for p in self.params) and \
            all(g.source == g.group for g in self.groups)

    def headline(self) -> str:
        c = self.counts
        n = sum(c[f] for f in FATES if f != "removed")
        return (f"optimizer {self.optimizer}: state of {n} parameters: {c['carried']} carried, "
                f"{c['adapted']} adapted, {c['reset']} reset, {c['fresh']} fresh; "
                f"{c['removed']} saved entries removed")

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """``(fate, parameter, shape, source, detail)`` for every parameter, then removed ones."""
        return [(p.fate, p.name if p.fate != "removed" else "-", _shape(p.shape),
                 (p.source or "-") if p.fate != "removed" else p.name, p.detail) for p in self.params]

    def table(self) -> str:
        rows = [("fate", "parameter", "shape", "source", "detail")] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join(("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4]).rstrip()
                         for r in rows)

    def group_lines(self) -> list[str]:
        out = []
        for g in self.groups:
            if g.source is None:
                out.append(f"group {g.group}: {g.detail or 'no parameter has a source: keeps its own settings'}")
                continue
            line = f"group {g.group} <- saved group {g.source} ({g.votes} of {g.size} parameters)"
            if g.changed:
                line += ": " + ", ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in g.changed.items())
            if g.detail:
                line += f" [{g.detail}]"
            out.append(line)
        return out

    def __str__(self) -> str:
        parts = [self.headline()]
        if self.names_from:
            parts.append(f"saved parameter names: {self.names_from}")
        if self.note:
            parts.append(self.note)
        parts.extend(self.group_lines())
        parts.append("")
        parts.append(self.table())
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer, "applied": self.applied, "names_from": self.names_from,
            "note": self.note, "counts": self.counts, "exact": self.exact,
            "params": [{"name": p.name, "fate": p.fate, "source": p.source, "detail": p.detail,
                        "group": p.group, "shape": None if p.shape is None else list(p.shape)}
                       for p in self.params],
            "groups": [{"group": g.group, "source": g.source, "votes": g.votes, "size": g.size,
                        "changed": {k: [_plain(a), _plain(b)] for k, (a, b) in g.changed.items()},
                        "detail": g.detail} for g in self.groups],
        }


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


@dataclass
class MigrationReport:
    """What a migrating restore did: one transfer report per model, one optimizer report per
    optimizer, and the schedulers whose per-group lists followed the group pairing."""

    step: int | None = None
    models: dict[str, "TransferReport"] = field(default_factory=dict)
    optimizers: dict[str, OptimizerReport] = field(default_factory=dict)
    schedulers: dict[str, str] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """True when the checkpoint fitted as is (the restore equals a plain one)."""
        return (all(r.ok and not r.adapted and all(t == s for t, s in r.loaded.items())
                    for r in self.models.values())
                and all(o.exact for o in self.optimizers.values()))

    def renamed(self) -> dict[str, str]:
        """Model tensors that took the values of a source tensor of another name (flat names)."""
        out = {}
        for m, r in self.models.items():
            for t, s in r.loaded.items():
                if t != s and not r.reasons.get(t, "").startswith("tied"):
                    out[_flat(m, t)] = _flat(m, s)
        return out

    def param_fates(self) -> dict[str, str]:
        """Flat parameter name -> its optimizer-state fate (removed ones under the source name)."""
        out: dict[str, str] = {}
        for o in self.optimizers.values():
            for p in o.params:
                if p.fate == "removed":
                    out.setdefault(p.name, "removed")
                else:
                    out[p.name] = p.fate
        return out

    def summary(self) -> dict[str, Any]:
        """A small JSON-able digest for the resume record (names, fates and renames)."""
        return {"exact": self.exact, "renamed": self.renamed(), "fates": self.param_fates(),
                "missing": sorted(_flat(m, t) for m, r in self.models.items() for t in r.missing),
                "unused": sorted(_flat(m, s) for m, r in self.models.items() for s in r.unused)}

    def __str__(self) -> str:
        head = f"migrated restore{f' of step {self.step}' if self.step is not None else ''}"
        parts = [head + (": the checkpoint fits as is" if self.exact else "")]
        for m, r in self.models.items():
            parts.append(f"\n[model {m or '(main)'}] " + str(r))
        for o, r in self.optimizers.items():
            parts.append(f"\n[optimizer {o or '(main)'}] " + str(r))
        for s, how in self.schedulers.items():
            parts.append(f"\n[{s}] {how}")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "exact": self.exact,
                "models": {k: v.to_dict() for k, v in self.models.items()},
                "optimizers": {k: v.to_dict() for k, v in self.optimizers.items()},
                "schedulers": dict(self.schedulers)}


def _flat(model_name: str, name: str) -> str:
    return f"{model_name}.{name}" if model_name else name
