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
:mod:`torchkeep.migratereport`, finding and naming the saved state in :mod:`torchkeep.migratenames`.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from torch import nn

from .errors import StateError, TransferError
from .migratenames import (BUFFER_LEAVES, EMA_KEYS, OPTIMIZER_KEYS, _pid, _saved_ids, _state_shape,
                           find_ema_state, find_optimizer_state, is_optimizer_state, saved_param_names)
from .migratereport import FATES, GroupFate, MigrationReport, OptimizerReport, ParamFate, _flat, _shape

if TYPE_CHECKING:  # pragma: no cover
    from .state import TrainState
    from .transferreport import TransferReport

__all__ = ["FATES", "RESHAPED", "OPTIMIZER_KEYS", "EMA_KEYS", "BUFFER_LEAVES", "ParamFate", "GroupFate",
           "OptimizerReport", "MigrationReport", "Migration", "is_optimizer_state",
           "find_optimizer_state", "find_ema_state", "saved_param_names", "plan_optimizer",
           "migrate_optimizer", "apply_optimizer", "plan_ema", "apply_ema", "migrate_tree",
           "restore_with_migration"]

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
    from .transferreport import TransferReport

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
