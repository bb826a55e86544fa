"""A TrainState's migrating restore: a saved state (weights, optimizer, EMA, scheduler groups)
put into a changed model through :mod:`torchkeep.carry`'s plan."""
from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from torchkeep.carry import adapters as _adapt
from torchkeep.carry import planner as tr
from torchkeep.carry.migration.names import _saved_ids, is_optimizer_state, saved_param_names
from torchkeep.carry.migration.optimizer import _qualname, plan_optimizer
from torchkeep.carry.migration.report import MigrationReport, _flat
from torchkeep.errors import StateError, TransferError
from torchkeep.keep.trainstate import TrainState

log = logging.getLogger(__name__)


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
    from torchkeep.read import keys
    for p in stripped:
        name = name.replace("._orig_mod.", ".") if p == "._orig_mod." else keys.strip_prefix(name, p)
    return name


def _per_name(live: Mapping[str, Any], stored: Any) -> dict[str, Any] | None:
    if stored is None:
        return None
    if list(live) == [""]:
        return {"": stored}
    return dict(stored) if isinstance(stored, Mapping) else None


@dataclass
class _Joined:
    """The models' plans joined under flat names (``model.fc.weight`` when a TrainState holds
    several models), for the optimizers that span them."""
    actions: dict[str, tuple[str, Any]] = field(default_factory=dict)
    source_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    why_missing: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    strip: dict[str, list[str]] = field(default_factory=dict)


def migrate_tree(state: "TrainState", tree: Mapping[str, Any], options: Migration | None = None
                 ) -> tuple[dict[str, Any], MigrationReport]:
    """A copy of a captured state ``tree`` rewritten to fit ``state``'s (changed) objects, and
    what was done. Models get every tensor the weights' plan carries (adapted where needed, the
    rest keep their current values); optimizers get their state by name; schedulers their
    per-group lists in the new group order. Restoring the result with ``TrainState.restore`` is
    then an ordinary, checked restore."""
    opts = options or Migration()
    out = dict(tree)
    meta = dict(out.get("meta") or {})
    types_ = dict(meta.get("types") or {})
    versions = dict(meta.get("module_versions") or {})
    report = MigrationReport()
    joined = _migrate_models(state, tree, opts, out, report, versions)
    group_maps = _migrate_optimizers(state, tree, opts, out, report, joined, types_)
    _migrate_schedulers(state, tree, out, report, group_maps)
    meta["types"] = types_
    meta["module_versions"] = versions
    out["meta"] = meta
    return out, report


def _migrate_models(state: "TrainState", tree: Mapping[str, Any], opts: Migration,
                    out: dict[str, Any], report: MigrationReport, versions: dict[str, Any]) -> _Joined:
    """Models: one transfer plan each; the new state dicts go into ``out``."""
    joined = _Joined()
    enabled = _adapt.enabled_adapters(opts.adapt)
    live_models = state._parts["model"]
    stored_models = _per_name(live_models, tree.get("model"))
    if stored_models is None or set(stored_models) != set(live_models):
        return joined
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
        new_sd = collections.OrderedDict()
        for k, v in module.state_dict(keep_vars=True).items():
            if k in values:
                new_sd[k] = values[k]
            elif isinstance(v, torch.Tensor):
                new_sd[k] = v.detach()
            else:
                new_sd[k] = sd.get(k, v)
        new_models[mname] = new_sd
        versions.pop(tr._join("model", mname) if mname else "model", None)
        for t, (s, ad) in plan.actions.items():
            joined.actions[_flat(mname, t)] = (_flat(mname, s), None if not getattr(ad, "how", "") else ad)
        joined.source_shapes.update({_flat(mname, s): sp.shape for s, sp in src.specs.items()})
        joined.why_missing.update({_flat(mname, t): w for t, w in rep.why_missing.items()})
        joined.unused.update({_flat(mname, s): w for s, w in rep.unused.items()})
        joined.strip[mname] = list(src.stripped)
    out["model"] = new_models if list(live_models) != [""] else new_models[""]
    return joined


def _migrate_optimizers(state: "TrainState", tree: Mapping[str, Any], opts: Migration,
                        out: dict[str, Any], report: MigrationReport, joined: _Joined,
                        types_: dict[str, Any]) -> dict[int, tuple[list[int | None], int]]:
    """Optimizers: their state by parameter name through the joined plan. Returns, per
    ``id(optimizer)``, the saved group each new group came from and the saved group count."""
    names = state._param_names()
    group_maps: dict[int, tuple[list[int | None], int]] = {}
    live_opts = state._parts["optimizer"]
    stored_opts = _per_name(live_opts, tree.get("optimizer"))
    if stored_opts is None or set(stored_opts) != set(live_opts) or not report.models:
        return group_maps
    strip = joined.strip

    def clean(n: str) -> str:
        mname = next((m for m in strip if m and n.startswith(m + ".")), "")
        rest = n[len(mname) + 1:] if mname else n
        return _flat(mname, _strip_like(rest, strip.get(mname, [])))

    new_opts: dict[str, Any] = {}
    for oname, opt in live_opts.items():
        saved = stored_opts[oname]
        path = f"optimizer.{oname}" if oname else "optimizer"
        if not is_optimizer_state(saved):
            new_opts[oname] = saved
            continue
        recorded = saved.get("param_names") or []
        saved_names = [clean(n) if isinstance(n, str) else None for n in recorded]
        how = "recorded with the checkpoint"
        if len(saved_names) != len(_saved_ids(saved)):
            saved_names, how = saved_param_names(saved, clean=clean)
        plan = plan_optimizer(opt, saved, saved_names, joined.actions, names,
                              source_shapes=joined.source_shapes, why_missing=joined.why_missing,
                              unused=joined.unused, reshaped=opts.reshaped,
                              hyperparams=opts.hyperparams, source_type=types_.get(path),
                              names_from=how)
        report.optimizers[oname] = plan.report
        params = [p for g in opt.param_groups for p in g["params"]]
        new_opts[oname] = {**plan.state_dict, "param_names": [names.get(id(p)) for p in params],
                           "param_shapes": [list(p.shape) for p in params]}
        types_[path] = _qualname(opt)
        group_maps[id(opt)] = ([g.source for g in plan.report.groups], len(saved["param_groups"]))
    out["optimizer"] = new_opts if list(live_opts) != [""] else new_opts[""]
    return group_maps


def _migrate_schedulers(state: "TrainState", tree: Mapping[str, Any], out: dict[str, Any],
                        report: MigrationReport,
                        group_maps: dict[int, tuple[list[int | None], int]]) -> None:
    """Schedulers: per-group lists follow the optimizers' new group order."""
    live_scheds = state._parts["scheduler"]
    stored_scheds = _per_name(live_scheds, tree.get("scheduler"))
    if stored_scheds is None or not group_maps:
        return
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
