"""Carry optimizer state (and EMA copies) by parameter *name* through a refactor.

torch's ``Optimizer.load_state_dict`` pairs saved state with parameters by position (pytorch
#1489): after a layer is added, a module renamed or a backbone frozen, the positions shift and
Adam's moments land on the wrong parameters, or the load fails. Here the saved state is keyed by
the *source* parameter names and carried through the same plan that :func:`torchkeep.transfer`
makes for the weights (exact names, rules, prefixes, structure, adapters), then rebuilt in the
target optimizer's own order:

* a parameter whose source has state keeps that state bit for bit ('carried'), renamed or not;
* a reshaped one gets each per-parameter tensor adapted with the weight's own adapter ('adapted'),
  or starts over with ``reshaped='reset'`` or when a tensor cannot be adapted ('reset');
* a parameter with no source, or whose source had no state, gets fresh state ('fresh');
* saved state that no target parameter takes is reported ('removed').

Param groups are paired by their parameters' names and the source group's hyper-parameters (lr,
betas, weight decay, initial_lr, ...) carried; an LR scheduler's per-group lists follow the same
pairing. :func:`restore_with_migration` does all of this for a whole :class:`~torchkeep.TrainState`
(``CheckpointManager.restore(state, migrate=True)``).
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import StateError, TransferError

if TYPE_CHECKING:  # pragma: no cover
    from .state import TrainState
    from .transfer import TransferReport

log = logging.getLogger(__name__)

FATES = ("carried", "adapted", "reset", "fresh", "removed")
RESHAPED = ("adapt", "reset")
# Keys under which training scripts keep the optimizer state, most preferred first.
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim", "opt",
                  "optimizers", "optimizer_states")
# Keys under which training scripts keep EMA weights.
EMA_KEYS = ("ema", "model_ema", "ema_model", "state_dict_ema", "ema_state_dict", "ema_state",
            "averaged_model", "swa_model")
# Leaf names of buffers that never sit in an optimizer (used when names must be inferred).
BUFFER_LEAVES = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_GROUP_META = ("params", "param_names")
_MAX_EMBED_CELLS = 20_000_000


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


# ------------------------------------------------------------------- the saved state's names
def is_optimizer_state(obj: Any) -> bool:
    """True for what ``Optimizer.state_dict()`` returns: ``{'state': {...}, 'param_groups': [...]}``."""
    if not isinstance(obj, Mapping):
        return False
    groups = obj.get("param_groups")
    return (isinstance(obj.get("state"), Mapping) and isinstance(groups, (list, tuple))
            and all(isinstance(g, Mapping) and "params" in g for g in groups))


def find_optimizer_state(tree: Any) -> tuple[str, Mapping[str, Any]]:
    """``(path, state dict)`` of the one optimizer state in a loaded checkpoint tree.

    Looks up to three levels deep; with several, the one under a usual key (``optimizer``,
    ``optimizer_state_dict``, ...) wins if it is the only such one.
    """
    found: list[tuple[str, Mapping[str, Any]]] = []

    def walk(obj: Any, path: str, depth: int) -> None:
        if is_optimizer_state(obj):
            found.append((path, obj))
            return
        if depth >= 3:
            return
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                if isinstance(v, (Mapping, list, tuple)):
                    walk(v, f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                if isinstance(v, (Mapping, list, tuple)):
                    walk(v, f"{path}.{i}" if path else str(i), depth + 1)

    walk(tree, "", 0)
    if not found:
        raise TransferError("the source holds no optimizer state (no mapping with 'state' and "
                            "'param_groups')",
                            hint="save optimizer.state_dict() next to the model (or use a torchkeep "
                                 "TrainState checkpoint), or leave out optimizer=")
    if len(found) == 1:
        return found[0]
    usual = [(p, o) for p, o in found if p.split(".")[0] in OPTIMIZER_KEYS and p.count(".") == 0]
    if len(usual) == 1:
        return usual[0]
    raise TransferError(f"the source holds {len(found)} optimizer states "
                        f"({', '.join(p or '<root>' for p, _ in found)}): which one is meant is unclear",
                        hint="load the one you mean and call torchkeep.migrate.migrate_optimizer")


def find_ema_state(tree: Any) -> tuple[str, dict[str, torch.Tensor]] | None:
    """``(key, tensors)`` of EMA weights kept next to the model (``ema``, ``model_ema``, ...)."""
    if not isinstance(tree, Mapping):
        return None
    for key in EMA_KEYS:
        sub = tree.get(key)
        if isinstance(sub, nn.Module):
            sub = sub.state_dict()
        if isinstance(sub, Mapping):
            tensors = {str(k): v for k, v in sub.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return key, tensors
    return None


def _pid(k: Any) -> Any:
    return int(k) if isinstance(k, str) and k.isdigit() else k


def _saved_ids(saved: Mapping[str, Any]) -> list[Any]:
    return [_pid(p) for g in saved["param_groups"] for p in g["params"]]


def _state_shape(entry: Any) -> tuple[int, ...] | None:
    """The parameter's shape as its per-parameter state shows it (the largest-rank tensor)."""
    if not isinstance(entry, Mapping):
        return None
    best = None
    for v in entry.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and (best is None or v.dim() > len(best)):
            best = tuple(v.shape)
    return best


def saved_param_names(saved: Mapping[str, Any], *,
                      weights: Sequence[tuple[str, tuple[int, ...], torch.dtype, Any]] | None = None,
                      clean: Callable[[str], str] = lambda n: n) -> tuple[list[str | None], str]:
    """The parameter name of each position of a saved optimizer state, and how it was known.

    In order: the names a torchkeep TrainState records (``param_names``); torch's own names in
    named param groups; else inferred from the model's weights in order (``(name, shape, dtype,
    storage)``, buffers and tied duplicates left out) where the shapes of the saved state allow
    only one reading. Raises TransferError when they cannot be known.
    """
    ids = _saved_ids(saved)
    n = len(ids)
    recorded = saved.get("param_names")
    if isinstance(recorded, (list, tuple)) and len(recorded) == n:
        return [clean(x) if isinstance(x, str) else None for x in recorded], "recorded with the checkpoint"
    groups = saved["param_groups"]
    if all(isinstance(g.get("param_names"), (list, tuple)) and len(g["param_names"]) == len(g["params"])
           for g in groups) and groups:
        return [clean(x) for g in groups for x in g["param_names"]], "named in the optimizer's param groups"
    if weights is None:
        raise TransferError(f"the saved optimizer state ({n} parameters) does not name its parameters",
                            hint="save with a torchkeep TrainState (it records the names) or pass "
                                 "source_names= to torchkeep.migrate.migrate_optimizer")
    seen: set[Any] = set()
    cands: list[tuple[str, tuple[int, ...]]] = []
    for name, shape, dtype, storage in weights:
        if not (dtype.is_floating_point or dtype.is_complex):
            continue
        if name.rpartition(".")[2] in BUFFER_LEAVES:
            continue
        if storage is not None:
            if storage in seen:
                continue  # a tied duplicate: named_parameters() lists it once
            seen.add(storage)
        cands.append((name, tuple(shape)))
    state = {_pid(k): v for k, v in saved["state"].items()}
    shapes = [_state_shape(state.get(i)) for i in ids]
    picked = _embed_unique(shapes, [s for _, s in cands])
    if picked is None:
        known = sum(s is not None for s in shapes)
        raise TransferError(
            f"cannot tell which model tensor each of the saved optimizer's {n} parameters is: the "
            f"model has {len(cands)} tensors that look like parameters and the shapes of the "
            f"{known} saved states allow {'no' if _embed_count(shapes, [s for _, s in cands]) == 0 else 'more than one'} "
            "reading", hint="save with a torchkeep TrainState (it records the names) or pass "
                            "source_names= to torchkeep.migrate.migrate_optimizer")
    how = "inferred from the model's order and shapes"
    if len(cands) != n:
        how += f" (the optimizer held {n} of {len(cands)} parameters)"
    return [cands[j][0] for j in picked], how


def _fits(a: tuple[int, ...] | None, b: tuple[int, ...]) -> bool:
    return a is None or a == b


def _embed_table(a: Sequence[Any], b: Sequence[Any]) -> list[list[int]] | None:
    n, m = len(a), len(b)
    if n > m or (n + 1) * (m + 1) > _MAX_EMBED_CELLS:
        return None
    # ways[i][j]: ways (capped at 2) to place a[i:] in order into b[j:].
    ways = [[0] * (m + 1) for _ in range(n + 1)]
    ways[n] = [1] * (m + 1)
    for i in range(n - 1, -1, -1):
        row, nxt, ai = ways[i], ways[i + 1], a[i]
        for j in range(m - 1, -1, -1):
            w = row[j + 1]
            if _fits(ai, b[j]):
                w += nxt[j + 1]
            row[j] = 2 if w > 2 else w
    return ways


def _embed_count(a: Sequence[Any], b: Sequence[Any]) -> int:
    t = _embed_table(a, b)
    return 0 if t is None else t[0][0]


def _embed_unique(a: Sequence[Any], b: Sequence[Any]) -> list[int] | None:
    """Indices into ``b`` of the only way to find ``a`` (shapes, None = any) in order in ``b``;
    None when there is no way or more than one."""
    ways = _embed_table(a, b)
    if ways is None or ways[0][0] != 1:
        return None
    out, j = [], 0
    for i in range(len(a)):
        while not (_fits(a[i], b[j]) and ways[i + 1][j + 1] == 1):
            j += 1
        out.append(j)
        j += 1
    return out


# ------------------------------------------------------------------------- the migration
@dataclass
class _OptimizerPlan:
    report: OptimizerReport
    state_dict: dict[str, Any]


def _qualname(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _per_param(v: Any, shape: tuple[int, ...] | None) -> bool:
    return isinstance(v, torch.Tensor) and shape is not None and tuple(v.shape) == shape and v.dim() > 0


def plan_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any],
                   saved_names: Sequence[str | None],
                   mapping: Mapping[str, tuple[str, Any]], target_names: Mapping[int, str], *,
                   source_shapes: Mapping[str, tuple[int, ...]] | None = None,
                   why_missing: Mapping[str, str] | None = None,
                   unused: Mapping[str, str] | None = None,
                   reshaped: str = "adapt", hyperparams: bool = True, copy: bool = False,
                   source_type: str | None = None, names_from: str = "") -> _OptimizerPlan:
    """The state dict that gives ``optimizer`` the saved state by name, and its report.

    ``mapping``: target parameter name -> (source name, :class:`~torchkeep.adapt.Adaptation`
    or None for a plain copy), the weights' plan. ``target_names``: ``id(parameter)`` -> name.
    ``copy`` clones carried tensors (when the saved state belongs to a live optimizer).
    """
    if reshaped not in RESHAPED:
        raise ValueError(f"reshaped={reshaped!r}: expected one of {', '.join(RESHAPED)}")
    why_missing, unused = why_missing or {}, unused or {}
    report = OptimizerReport(type(optimizer).__name__, names_from=names_from)
    ids = _saved_ids(saved)
    if len(saved_names) != len(ids):
        raise TransferError(f"{len(saved_names)} names for the saved optimizer's {len(ids)} parameters")
    state = {_pid(k): v for k, v in saved["state"].items()}
    saved_groups = list(saved["param_groups"])
    group_of: dict[Any, int] = {}
    for gi, g in enumerate(saved_groups):
        for p in g["params"]:
            group_of[_pid(p)] = gi
    by_name: dict[str, Any] = {}
    for pid, name in zip(ids, saved_names):
        if name is not None:
            by_name.setdefault(name, pid)
    saved_shapes: dict[str, tuple[int, ...]] = {}
    recorded_shapes = saved.get("param_shapes")
    if isinstance(recorded_shapes, (list, tuple)) and len(recorded_shapes) == len(ids):
        saved_shapes = {n: tuple(int(x) for x in s) for n, s in zip(saved_names, recorded_shapes)
                        if n is not None and s is not None}
    for name, pid in by_name.items():
        if name not in saved_shapes:
            shape = (source_shapes or {}).get(name) or _state_shape(state.get(pid))
            if shape is not None:
                saved_shapes[name] = tuple(shape)

    same_class = source_type is None or source_type == _qualname(optimizer)
    if not same_class:
        report.note = (f"the saved state is a {source_type.rsplit('.', 1)[-1]}'s, the optimizer is a "
                       f"{type(optimizer).__name__}: every parameter starts fresh")

    new_state: dict[int, Any] = {}
    new_groups: list[dict[str, Any]] = []
    taken: set[str] = set()
    targets_in_opt: set[str] = set()
    pos = 0
    for gi, group in enumerate(optimizer.param_groups):
        votes: collections.Counter = collections.Counter()
        positions = []
        for p in group["params"]:
            positions.append(pos)
            name = target_names.get(id(p))
            shape = tuple(p.shape)
            fate = ParamFate(name or f"<param {pos}>", "fresh", group=gi, shape=shape)
            report.params.append(fate)
            if name is not None:
                targets_in_opt.add(name)
            act = mapping.get(name) if name is not None else None
            if name is None:
                fate.detail = "not a parameter of the model: no name to match it by"
            elif act is None:
                why = why_missing.get(name)
                fate.detail = (f"the weight kept its init ({why})" if why else "new parameter")
            else:
                src, ad = act
                fate.source = src
                pid = by_name.get(src)
                if pid is None:
                    fate.detail = f"{src} is not in the saved optimizer (it was not trained there)"
                elif not same_class:
                    taken.add(src)
                    votes[group_of[pid]] += 1
                    fate.detail = "another optimizer class saved this state"
                else:
                    taken.add(src)
                    votes[group_of[pid]] += 1
                    entry = state.get(pid)
                    if not entry:
                        fate.detail = f"{src} had no state yet (never stepped)"
                    else:
                        moved = _move_entry(entry, saved_shapes.get(src), shape, ad, reshaped, copy, fate)
                        if moved is not None:
                            new_state[pos] = moved
            pos += 1
        new_group = {k: v for k, v in group.items() if k != "params"}
        gf = GroupFate(gi, None, 0, len(positions))
        if votes and same_class:
            (sg, n), *rest = votes.most_common()
            if rest and rest[0][1] == n:
                sg = min(g for g, c in votes.items() if c == n)
                gf.detail = f"tie: saved groups {sorted(g for g, c in votes.items() if c == n)}"
            gf.source, gf.votes = sg, n
            if hyperparams:
                for k, v in saved_groups[sg].items():
                    if k in _GROUP_META:
                        continue
                    before = group.get(k, None)
                    if k not in group or not _same(before, v):
                        gf.changed[k] = (before, v)
                    new_group[k] = v
        elif not same_class:
            gf.detail = "another optimizer class: keeps its own settings"
        report.groups.append(gf)
        new_group["params"] = positions
        new_groups.append(new_group)

    reverse = {s: t for t, (s, _) in mapping.items()}
    for pid, name in zip(ids, saved_names):
        label = name if name is not None else f"<saved param {pid}>"
        if name is not None and name in taken:
            continue
        had = bool(state.get(pid))
        f = ParamFate(label, "removed", shape=saved_shapes.get(name) if name else None)
        t = reverse.get(name) if name is not None else None
        if name is None:
            f.detail = "saved without a name"
        elif t is not None and t not in targets_in_opt:
            f.detail = f"its weight went to {t}, which this optimizer does not hold (frozen?)"
        elif name in unused:
            f.detail = f"its weight was not carried: {unused[name]}"
        else:
            f.detail = "no longer in the model"
        if not had:
            f.detail += " (it had no state)"
        report.params.append(f)
    return _OptimizerPlan(report, {"state": new_state, "param_groups": new_groups})


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else torch.equal(a, b)
    except Exception:
        return a is b


def _move_entry(entry: Mapping[str, Any], src_shape: tuple[int, ...] | None, dst_shape: tuple[int, ...],
                ad: Any, reshaped: str, copy: bool, fate: ParamFate) -> dict[str, Any] | None:
    """One parameter's saved state for its new parameter (or None: fresh), setting ``fate``."""
    def keep(v: Any) -> Any:
        return v.clone() if copy and isinstance(v, torch.Tensor) else v

    if src_shape is None or tuple(src_shape) == dst_shape:
        fate.fate = "carried"
        if ad is not None and getattr(ad, "how", ""):
            fate.detail = ad.how
        return {k: keep(v) for k, v in entry.items()}
    moved_from = f"{_shape(src_shape)} -> {_shape(dst_shape)}"
    if reshaped == "reset" or ad is None:
        fate.fate = "reset"
        fate.detail = f"reshaped {moved_from}: state reset"
        return None
    out: dict[str, Any] = {}
    for k, v in entry.items():
        if _per_param(v, tuple(src_shape)):
            new = torch.zeros(dst_shape, dtype=v.dtype, device=v.device)
            ad.write(v, new)
            out[k] = new
        elif isinstance(v, torch.Tensor) and v.dim() > 0:
            fate.fate = "reset"
            fate.detail = (f"reshaped {moved_from}: state {k!r} of shape {_shape(v.shape)} is not "
                           "per element, so it cannot be adapted: state reset")
            return None
        else:
            out[k] = keep(v)
    fate.fate = "adapted"
    fate.detail = f"{moved_from}: {ad.how}"
    return out


def migrate_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any],
                      mapping: Mapping[str, str | tuple[str, Any]] | None = None, *,
                      model: nn.Module | None = None, source_names: Sequence[str | None] | None = None,
                      reshaped: str = "adapt", hyperparams: bool = True,
                      dry_run: bool = False) -> OptimizerReport:
    """Load a saved optimizer state into ``optimizer`` by parameter name.

    ``saved``: an ``Optimizer.state_dict()`` (a torchkeep one names its parameters; otherwise
    pass ``source_names``, one per saved position). ``mapping``: target parameter name -> source
    name (or ``(source, adaptation)``) for renamed parameters; names not in it map to themselves.
    ``model``: names the optimizer's parameters (default: none are named, so all start fresh).
    """
    names = list(source_names) if source_names is not None else saved_param_names(saved)[0]
    how = "given" if source_names is not None else saved_param_names(saved)[1]
    target_names: dict[int, str] = {}
    if model is not None:
        for n, p in model.named_parameters(remove_duplicate=False):
            target_names.setdefault(id(p), n)
    full: dict[str, tuple[str, Any]] = {}
    given = dict(mapping or {})
    for t in target_names.values():
        v = given.get(t, t)
        full[t] = v if isinstance(v, tuple) else (v, None)
    plan = plan_optimizer(optimizer, saved, names, full, target_names, reshaped=reshaped,
                          hyperparams=hyperparams, copy=True, names_from=how)
    if not dry_run:
        apply_optimizer(optimizer, plan)
    return plan.report


def apply_optimizer(optimizer: torch.optim.Optimizer, plan: _OptimizerPlan) -> None:
    try:
        optimizer.load_state_dict(plan.state_dict)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # pragma: no cover - planned to fit
        raise TransferError(f"the optimizer refused the migrated state: {e}") from e
    plan.report.applied = True


# ----------------------------------------------------------------------------------- EMA
def plan_ema(ema: nn.Module | Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
             mapping: Mapping[str, tuple[str, Any]], reasons: Mapping[str, str], label: str
             ) -> tuple["TransferReport", dict[str, tuple[torch.Tensor, torch.Tensor, Any]]]:
    """Carry EMA weights through the model's plan: the EMA copy of target ``t`` takes the EMA
    copy of the source that ``t`` took its weight from, adapted the same way.

    Returns the report and ``ema name -> (source tensor, target tensor, adaptation)``.
    """
    from .transfer import TransferReport

    if isinstance(ema, nn.Module):
        tensors = {k: v for k, v in ema.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    else:
        tensors = {k: v for k, v in ema.items() if isinstance(v, torch.Tensor)}
    tmap, _ = _unwrap_ema(list(tensors))        # 'module.fc.weight' -> 'fc.weight'
    smap, stripped = _unwrap_ema(list(source))
    src = {smap[k]: v for k, v in source.items()}
    rep = TransferReport(source=label, target=f"EMA {type(ema).__name__}", stripped=stripped,
                         target_shapes={k: tuple(v.shape) for k, v in tensors.items()},
                         source_shapes={k: tuple(v.shape) for k, v in src.items()})
    actions: dict[str, tuple[torch.Tensor, torch.Tensor, Any]] = {}
    used: set[str] = set()
    for name, t in tensors.items():
        bare = tmap[name]
        act = mapping.get(bare)
        if act is None:
            if bare in src and tuple(src[bare].shape) == tuple(t.shape):
                act = (bare, None)   # an EMA-only tensor (AveragedModel's n_averaged)
            else:
                rep.missing.append(name)
                rep.why_missing[name] = "its model weight had no source"
                continue
        s, ad = act
        if s not in src:
            rep.missing.append(name)
            rep.why_missing[name] = f"the source EMA has no {s}"
            continue
        if ad is None and tuple(src[s].shape) != tuple(t.shape):
            rep.missing.append(name)
            rep.why_missing[name] = f"source EMA {s} is {_shape(src[s].shape)}"
            continue
        used.add(s)
        rep.loaded[name] = s
        rep.reasons[name] = f"{reasons.get(bare, 'exact').split(':')[0]} (the model's plan)"
        if ad is not None and getattr(ad, "how", ""):
            rep.adapted[name] = ad.how
        actions[name] = (src[s], t, ad)
    rep.unused = {s: "no EMA tensor of the target takes it" for s in src if s not in used}
    return rep, actions


def _unwrap_ema(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Names without wrapper prefixes; an EMA wrapper (AveragedModel, timm's ModelEma) keeps its
    model under ``module.`` next to its own counters, so ``module.`` goes wherever it stands."""
    from . import keys
    mapping, stripped = keys.unwrap_names(names)
    bare = {k: keys.strip_prefix(v, "module") for k, v in mapping.items()}
    if bare != mapping and len(set(bare.values())) == len(bare):
        return bare, stripped + ["module."]
    return mapping, stripped


def apply_ema(actions: Mapping[str, tuple[torch.Tensor, torch.Tensor, Any]]) -> None:
    with torch.no_grad():
        for src, dst, ad in actions.values():
            if ad is None:
                dst.copy_(src)
            else:
                ad.write(src.to(dst.device), dst)


# ------------------------------------------------------------------- a TrainState's restore
@dataclass
class Migration:
    """How ``CheckpointManager.restore(state, migrate=...)`` maps a checkpoint onto a changed
    model: the :func:`torchkeep.transfer` options for the weights, and ``reshaped`` ('adapt' or
    'reset') / ``hyperparams`` (carry param-group settings) for the optimizer state."""

    rules: Any = None
    match: str = "auto"
    adapt: bool | Iterable[str] = True
    reshaped: str = "adapt"
    hyperparams: bool = True


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


def _strip_like(name: str, stripped: Sequence[str]) -> str:
    """Undo on one recorded name what unwrapping did to the weights' names."""
    from . import keys
    for p in stripped:
        name = name.replace("._orig_mod.", ".") if p == "._orig_mod." else keys.strip_prefix(name, p)
    return name


def _per_name(live: Mapping[str, Any], stored: Any) -> dict[str, Any] | None:
    if stored is None:
        return None
    if list(live) == [""]:
        return {"": stored}
    return dict(stored) if isinstance(stored, Mapping) else None


def migrate_tree(state: "TrainState", tree: Mapping[str, Any], options: Migration | None = None
                 ) -> tuple[dict[str, Any], MigrationReport]:
    """A copy of a captured state ``tree`` rewritten to fit ``state``'s (changed) objects, and
    what was done. Models get every tensor the weights' plan carries (adapted where needed, the
    rest keep their current values); optimizers get their state by name; schedulers their
    per-group lists in the new group order. Restoring the result with ``TrainState.restore`` is
    then an ordinary, checked restore."""
    import importlib

    from . import adapt as _adapt
    # (the package attribute 'torchkeep.transfer' is the function, so import the module by name)
    tr = importlib.import_module("torchkeep.transfer")

    opts = options or Migration()
    enabled = _adapt.enabled_adapters(opts.adapt)
    parts = state._parts
    out = dict(tree)
    meta = dict(out.get("meta") or {})
    types_ = dict(meta.get("types") or {})
    versions = dict(meta.get("module_versions") or {})
    report = MigrationReport()

    # -- models: one plan each; flat names join them for the optimizers ----------------------
    flat_map: dict[str, tuple[str, Any]] = {}
    flat_shapes: dict[str, tuple[int, ...]] = {}
    why_missing: dict[str, str] = {}
    unused: dict[str, str] = {}
    strip: dict[str, list[str]] = {}
    live_models = parts["model"]
    stored_models = _per_name(live_models, tree.get("model"))
    if stored_models is not None and set(stored_models) == set(live_models):
        new_models: dict[str, Any] = {}
        for mname, module in live_models.items():
            sd = stored_models[mname]
            if not isinstance(module, nn.Module) or not isinstance(sd, Mapping):
                new_models[mname] = sd
                continue
            src = tr._from_mapping(sd, f"checkpoint {mname or 'model'}")
            tgt = tr._resolve_target(module)
            plan = tr._plan(src, tgt, opts.rules, opts.match, enabled)
            rep = plan.report
            report.models[mname] = rep
            values = tr._materialize(plan, src, tgt)
            live_sd = module.state_dict(keep_vars=True)
            new_sd = collections.OrderedDict()
            for k, v in live_sd.items():
                if k in values:
                    new_sd[k] = values[k]
                elif isinstance(v, torch.Tensor):
                    new_sd[k] = v.detach()
                else:
                    new_sd[k] = sd.get(k, v)
            new_models[mname] = new_sd
            versions.pop(tr._join("model", mname) if mname else "model", None)
            for t, (s, ad) in plan.actions.items():
                flat_map[_flat(mname, t)] = (_flat(mname, s), None if not getattr(ad, "how", "") else ad)
            flat_shapes.update({_flat(mname, s): sp.shape for s, sp in src.specs.items()})
            why_missing.update({_flat(mname, t): w for t, w in rep.why_missing.items()})
            unused.update({_flat(mname, s): w for s, w in rep.unused.items()})
            strip[mname] = list(src.stripped)
        out["model"] = new_models if list(live_models) != [""] else new_models[""]

    # -- optimizers: by name through the joined plan -----------------------------------------
    names = state._param_names()
    group_maps: dict[int, tuple[list[int | None], int]] = {}   # id(optimizer) -> (sources, saved groups)
    live_opts = parts["optimizer"]
    stored_opts = _per_name(live_opts, tree.get("optimizer"))
    if stored_opts is not None and set(stored_opts) == set(live_opts) and report.models:
        new_opts: dict[str, Any] = {}
        for oname, opt in live_opts.items():
            saved = stored_opts[oname]
            path = f"optimizer.{oname}" if oname else "optimizer"
            if not is_optimizer_state(saved):
                new_opts[oname] = saved
                continue
            recorded = saved.get("param_names") or []

            def clean(n: str) -> str:
                mname = next((m for m in strip if m and n.startswith(m + ".")), "")
                rest = n[len(mname) + 1:] if mname else n
                return _flat(mname, _strip_like(rest, strip.get(mname, [])))

            saved_names = [clean(n) if isinstance(n, str) else None for n in recorded]
            how = "recorded with the checkpoint"
            if len(saved_names) != len(_saved_ids(saved)):
                saved_names, how = saved_param_names(saved, clean=clean)
            plan = plan_optimizer(opt, saved, saved_names, flat_map, names, source_shapes=flat_shapes,
                                  why_missing=why_missing, unused=unused, reshaped=opts.reshaped,
                                  hyperparams=opts.hyperparams, source_type=types_.get(path),
                                  names_from=how)
            report.optimizers[oname] = plan.report
            params = [p for g in opt.param_groups for p in g["params"]]
            new_opts[oname] = {**plan.state_dict, "param_names": [names.get(id(p)) for p in params],
                               "param_shapes": [list(p.shape) for p in params]}
            types_[path] = _qualname(opt)
            group_maps[id(opt)] = ([g.source for g in plan.report.groups], len(saved["param_groups"]))
        out["optimizer"] = new_opts if list(live_opts) != [""] else new_opts[""]

    # -- schedulers: per-group lists follow the group pairing --------------------------------
    live_scheds = parts["scheduler"]
    stored_scheds = _per_name(live_scheds, tree.get("scheduler"))
    if stored_scheds is not None and group_maps:
        new_scheds = dict(stored_scheds)
        for sname, sched in live_scheds.items():
            opt = getattr(sched, "optimizer", None)
            gm = group_maps.get(id(opt)) if opt is not None else None
            if gm is None or sname not in stored_scheds:
                continue
            sources, n_saved = gm
            if sources == list(range(n_saved)):
                continue
            path = f"scheduler.{sname}" if sname else "scheduler"
            changed: list[str] = []
            new_scheds[sname] = _remap_groups(stored_scheds[sname], sched, sources, n_saved, changed)
            if changed:
                report.schedulers[path] = ("per-group lists remapped to the new param groups "
                                           f"({', '.join(sorted(set(changed)))}); sources "
                                           + ", ".join(f"{i}<-{'new' if s is None else s}"
                                                       for i, s in enumerate(sources)))
        out["scheduler"] = new_scheds if list(live_scheds) != [""] else new_scheds[""]

    meta["types"] = types_
    meta["module_versions"] = versions
    out["meta"] = meta
    return out, report


def _remap_groups(sd: Any, sched: Any, sources: list[int | None], n_saved: int,
                  changed: list[str]) -> Any:
    """A scheduler state whose lists of one value per saved param group follow ``sources``."""
    if not isinstance(sd, Mapping):
        return sd
    live = sched.state_dict() if hasattr(sched, "state_dict") else {}
    out = dict(sd)
    for k, v in sd.items():
        if k == "_schedulers" and isinstance(v, list):
            subs = getattr(sched, "_schedulers", None) or [None] * len(v)
            out[k] = [_remap_groups(c, s, sources, n_saved, changed) if s is not None else c
                      for c, s in zip(v, subs)]
        elif isinstance(v, list) and len(v) == n_saved and k not in ("lr_lambdas",):
            now = live.get(k) if isinstance(live, Mapping) else None
            new = []
            for i, s in enumerate(sources):
                if s is not None:
                    new.append(v[s])
                elif isinstance(now, list) and i < len(now):
                    new.append(now[i])
                else:
                    new.append(v[0])
            out[k] = new
            changed.append(k)
    return out


def restore_with_migration(state: "TrainState", tree: Mapping[str, Any], *, strict: bool = True,
                           options: Migration | bool | None = None,
                           step: int | None = None) -> MigrationReport:
    """Restore ``tree`` into ``state`` whose model may have changed since it was saved: weights
    through the transfer plan, optimizer state by name, the rest as usual (``strict`` applies to
    the parts other than models and optimizers). An unchanged model restores exactly."""
    opts = options if isinstance(options, Migration) else Migration()
    try:
        new_tree, report = migrate_tree(state, tree, opts)
    except TransferError as e:
        raise StateError(f"cannot migrate the checkpoint onto this state: {e.detail}",
                         hint=e.hint) from e
    report.step = step
    state.restore(new_tree, strict=strict)
    for r in report.models.values():
        r.applied = True
    for o in report.optimizers.values():
        o.applied = True
    if not report.exact:
        log.info("%s", report)
    return report
