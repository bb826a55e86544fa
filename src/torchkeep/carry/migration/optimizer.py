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
(``CheckpointManager.restore(state, migrate=True)``). The reports are in
:mod:`torchkeep.carry.migration.report`, finding and naming the saved state in :mod:`torchkeep.carry.migration.names`.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from torchkeep.carry.migration.names import (BUFFER_LEAVES, EMA_KEYS, OPTIMIZER_KEYS, _pid,
                                             _saved_ids, _state_shape, find_ema_state,
                                             find_optimizer_state, is_optimizer_state,
                                             saved_param_names)
from torchkeep.carry.migration.report import (FATES, GroupFate, MigrationReport, OptimizerReport,
                                              ParamFate, _shape)
from torchkeep.errors import TransferError

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = ["FATES", "RESHAPED", "OPTIMIZER_KEYS", "EMA_KEYS", "BUFFER_LEAVES", "ParamFate", "GroupFate",
           "OptimizerReport", "MigrationReport", "is_optimizer_state",
           "find_optimizer_state", "find_ema_state", "saved_param_names", "plan_optimizer",
           "migrate_optimizer", "apply_optimizer"]

log = logging.getLogger(__name__)

RESHAPED = ("adapt", "reset")
_GROUP_META = ("params", "param_names")


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


@dataclass
class _Saved:
    """The saved optimizer state, indexed: per-parameter state and group by saved id, the id of
    each saved name, and each saved parameter's shape where it is known."""
    ids: list[Any]
    names: Sequence[str | None]
    state: dict[Any, Any]
    groups: list[dict[str, Any]]
    group_of: dict[Any, int]
    by_name: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]


def _index_saved(saved: Mapping[str, Any], saved_names: Sequence[str | None],
                 source_shapes: Mapping[str, tuple[int, ...]] | None) -> _Saved:
    ids = _saved_ids(saved)
    if len(saved_names) != len(ids):
        raise TransferError(f"{len(saved_names)} names for the saved optimizer's {len(ids)} parameters")
    state = {_pid(k): v for k, v in saved["state"].items()}
    groups = list(saved["param_groups"])
    group_of = {_pid(p): gi for gi, g in enumerate(groups) for p in g["params"]}
    by_name: dict[str, Any] = {}
    for pid, name in zip(ids, saved_names):
        if name is not None:
            by_name.setdefault(name, pid)
    shapes: dict[str, tuple[int, ...]] = {}
    recorded = saved.get("param_shapes")
    if isinstance(recorded, (list, tuple)) and len(recorded) == len(ids):
        shapes = {n: tuple(int(x) for x in sh) for n, sh in zip(saved_names, recorded)
                  if n is not None and sh is not None}
    for name, pid in by_name.items():
        if name not in shapes:
            shape = (source_shapes or {}).get(name) or _state_shape(state.get(pid))
            if shape is not None:
                shapes[name] = tuple(shape)
    return _Saved(ids, saved_names, state, groups, group_of, by_name, shapes)


def plan_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any],
                   saved_names: Sequence[str | None],
                   mapping: Mapping[str, tuple[str, Any]], target_names: Mapping[int, str], *,
                   source_shapes: Mapping[str, tuple[int, ...]] | None = None,
                   why_missing: Mapping[str, str] | None = None,
                   unused: Mapping[str, str] | None = None,
                   reshaped: str = "adapt", hyperparams: bool = True, copy: bool = False,
                   source_type: str | None = None, names_from: str = "") -> _OptimizerPlan:
    """The state dict that gives ``optimizer`` the saved state by name, and its report.

    ``mapping``: target parameter name -> (source name, :class:`~torchkeep.carry.adapters.Adaptation`
    or None for a plain copy), the weights' plan. ``target_names``: ``id(parameter)`` -> name.
    ``copy`` clones carried tensors (when the saved state belongs to a live optimizer).
    """
    if reshaped not in RESHAPED:
        raise ValueError(f"reshaped={reshaped!r}: expected one of {', '.join(RESHAPED)}")
    report = OptimizerReport(type(optimizer).__name__, names_from=names_from)
    sv = _index_saved(saved, saved_names, source_shapes)
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
            fate = ParamFate(name or f"<param {pos}>", "fresh", group=gi, shape=tuple(p.shape))
            report.params.append(fate)
            if name is not None:
                targets_in_opt.add(name)
            moved = _carry_param(fate, name, sv, mapping, why_missing or {}, same_class,
                                 reshaped, copy, taken, votes)
            if moved is not None:
                new_state[pos] = moved
            pos += 1
        gf, new_group = _group_fate(gi, group, votes, sv.groups, same_class, hyperparams)
        report.groups.append(gf)
        new_group["params"] = positions
        new_groups.append(new_group)
    report.params.extend(_removed(sv, mapping, taken, targets_in_opt, unused or {}))
    return _OptimizerPlan(report, {"state": new_state, "param_groups": new_groups})


def _carry_param(fate: ParamFate, name: str | None, sv: _Saved,
                 mapping: Mapping[str, tuple[str, Any]], why_missing: Mapping[str, str],
                 same_class: bool, reshaped: str, copy: bool, taken: set[str],
                 votes: collections.Counter) -> Any:
    """One target parameter: its fate, and the saved state it gets (None: starts fresh).
    Records the source name as taken and votes for the saved group it came from."""
    act = mapping.get(name) if name is not None else None
    if name is None:
        fate.detail = "not a parameter of the model: no name to match it by"
        return None
    if act is None:
        why = why_missing.get(name)
        fate.detail = (f"the weight kept its init ({why})" if why else "new parameter")
        return None
    src, ad = act
    fate.source = src
    pid = sv.by_name.get(src)
    if pid is None:
        fate.detail = f"{src} is not in the saved optimizer (it was not trained there)"
        return None
    taken.add(src)
    votes[sv.group_of[pid]] += 1
    if not same_class:
        fate.detail = "another optimizer class saved this state"
        return None
    entry = sv.state.get(pid)
    if not entry:
        fate.detail = f"{src} had no state yet (never stepped)"
        return None
    return _move_entry(entry, sv.shapes.get(src), fate.shape, ad, reshaped, copy, fate)


def _group_fate(gi: int, group: Mapping[str, Any], votes: collections.Counter,
                saved_groups: list[dict[str, Any]], same_class: bool, hyperparams: bool
                ) -> tuple[GroupFate, dict[str, Any]]:
    """A target group follows the saved group most of its parameters came from (ties: the
    lowest), taking its hyper-parameters unless ``hyperparams`` is off."""
    new_group = {k: v for k, v in group.items() if k != "params"}
    gf = GroupFate(gi, None, 0, len(group["params"]))
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
    return gf, new_group


def _removed(sv: _Saved, mapping: Mapping[str, tuple[str, Any]], taken: set[str],
             targets_in_opt: set[str], unused: Mapping[str, str]) -> list[ParamFate]:
    """The saved parameters whose state no target parameter took, each with the reason."""
    out = []
    reverse = {s: t for t, (s, _) in mapping.items()}
    for pid, name in zip(sv.ids, sv.names):
        if name is not None and name in taken:
            continue
        f = ParamFate(name if name is not None else f"<saved param {pid}>", "removed",
                      shape=sv.shapes.get(name) if name else None)
        t = reverse.get(name) if name is not None else None
        if name is None:
            f.detail = "saved without a name"
        elif t is not None and t not in targets_in_opt:
            f.detail = f"its weight went to {t}, which this optimizer does not hold (frozen?)"
        elif name in unused:
            f.detail = f"its weight was not carried: {unused[name]}"
        else:
            f.detail = "no longer in the model"
        if not sv.state.get(pid):
            f.detail += " (it had no state)"
        out.append(f)
    return out


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


