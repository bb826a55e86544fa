"""Carry the weights that fit into a changed model, and report every tensor's fate.

``transfer`` plans on names and shapes only (no tensor bytes are read), in this order:

a. exact name and shape;
b. user rules (ordered ``(regex, replacement)`` pairs that rewrite source names), then the one
   prefix mapping that pairs the most remaining names (``bert.encoder.x`` -> ``encoder.x``);
c. structural matching of what is left: modules aligned by order and shape signature,
   accepted only where the alignment is forced (:mod:`torchkeep.carry.matching`);
d. adapters for pairs whose shape or dtype differs (:mod:`torchkeep.carry.adapters`).

Then it reads just the source tensors it uses and copies them, under ``torch.no_grad()``, into
the target's existing parameters and buffers: the target keeps its device, dtype and Parameter
objects, so an optimizer built before stays valid. The report is :mod:`torchkeep.carry.report`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from torchkeep.carry import adapters as _adapt
from torchkeep.carry import matching
from torchkeep.carry.report import METHODS, TransferReport, _shape_str
from torchkeep.carry.roles import (_looks_sorted, _role_order, is_position_table, module_roles,
                                   order_roles)
from torchkeep.errors import TransferError
from torchkeep.read import keys

__all__ = ["MATCH_MODES", "METHODS", "ORDER_MODES", "RulesLike", "TransferReport", "is_position_table",
           "module_roles", "order_roles", "transfer"]

log = logging.getLogger(__name__)

MATCH_MODES = ("auto", "name", "exact", "structure")
ORDER_MODES = ("auto", "known", "unknown")

RulesLike = Iterable[tuple[str, str] | str] | Mapping[str, str] | None


# ----------------------------------------------------------------------------- endpoints
@dataclass(frozen=True)
class _Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Source:
    label: str
    specs: dict[str, _Spec]
    roles: dict[str, str]
    read: Callable[[list[str]], dict[str, torch.Tensor]]
    stripped: list[str] = field(default_factory=list)
    close: Callable[[], None] = lambda: None
    # For optimizer=/ema=: the whole source object (tensors read), and each weight's storage
    # identity (tied names share one), both only where the source has them.
    tree: Callable[[], Any] | None = None
    storage: dict[str, Any] = field(default_factory=dict)
    # Whether the names come in the writer's registration order (torch pickles, modules), so
    # that order is evidence for structural matching; False for sorted or unordered formats.
    ordered: bool = True


@dataclass
class _Target:
    label: str
    tensors: dict[str, torch.Tensor]
    roles: dict[str, str]
    ordered: bool = True
    module: Any = None   # the nn.Module itself, where the target is one (for its library's key mapping)

    @property
    def specs(self) -> dict[str, _Spec]:
        return {k: _Spec(tuple(v.shape), v.dtype) for k, v in self.tensors.items()}


def _swap_prefix(name: str, p: str, q: str) -> str | None:
    return q + name[len(p):] if name.startswith(p) else None


def _tensor_items(mapping: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in mapping.items() if isinstance(v, torch.Tensor)}


def _state_in_mapping(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict inside a loaded training checkpoint ({'model_state_dict': ..., 'epoch': 3})."""
    n_tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    if n_tensors and n_tensors * 2 >= len(obj):
        return obj
    from torchkeep.read.checkpoint import WRAPPER_KEYS
    for key in WRAPPER_KEYS:
        sub = obj.get(key)
        if isinstance(sub, nn.Module):
            return sub.state_dict()
        if isinstance(sub, Mapping) and any(isinstance(v, torch.Tensor) for v in sub.values()):
            return sub
    if n_tensors:
        return obj
    raise TransferError("the source mapping holds no tensors (and no state dict under "
                        f"{', '.join(repr(k) for k in WRAPPER_KEYS[:4])}, ...)",
                        hint="pass the model's state dict, a checkpoint path or a module")


def _from_mapping(state: Mapping[str, Any], label: str, roles: dict[str, str] | None = None) -> _Source:
    tensors = _tensor_items(state)
    skipped = len(state) - len(tensors)
    if skipped:
        log.debug("source %s: %d non-tensor entries ignored", label, skipped)
    mapping, stripped = keys.unwrap_names(list(tensors))
    clean = {mapping[k]: v for k, v in tensors.items()}
    specs = {k: _Spec(tuple(v.shape), v.dtype) for k, v in clean.items()}
    if roles is not None:
        roles = {mapping[k]: r for k, r in roles.items() if k in mapping}
    else:
        roles = order_roles(_role_order(list(specs)), {k: s.shape for k, s in specs.items()})
    storage = {}
    for k, v in clean.items():
        try:
            storage[k] = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        except (RuntimeError, NotImplementedError):  # meta or exotic tensors: no identity
            pass
    # A mapping keeps the order it was built in; sorted names (safetensors' load_file) say nothing.
    return _Source(label, specs, roles, lambda names: {n: clean[n] for n in names}, stripped,
                   storage=storage, ordered=not _looks_sorted(list(clean)))


def _from_checkpoint(ckpt: Any, label: str, owned: bool) -> _Source:
    refs = ckpt.state_refs()
    if not refs:
        raise TransferError("found no model weights to transfer from", path=ckpt.path,
                            hint="torchkeep inspect shows what the file holds")
    specs = {k: _Spec(tuple(r.shape), r.dtype) for k, r in refs.items()}
    roles = order_roles(_role_order(list(specs)), {k: s.shape for k, s in specs.items()})
    stripped = ckpt.prefixes

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        return ckpt.read({n: refs[n] for n in names}, "cpu")

    storage = {k: (r.storage, r.offset, tuple(r.shape)) for k, r in refs.items() if r.storage is not None}
    ordered = bool(getattr(ckpt, "order_known", False)) and not _looks_sorted(list(specs))
    return _Source(label, specs, roles, read, stripped, ckpt.close if owned else (lambda: None),
                   tree=lambda: ckpt.tree, storage=storage, ordered=ordered)


def _resolve_source(source: Any) -> _Source:
    if isinstance(source, (str, os.PathLike)):
        from torchkeep.read.checkpoint import open as _open
        return _from_checkpoint(_open(source), os.fspath(source), owned=True)
    if hasattr(source, "state_refs") and hasattr(source, "reader"):
        return _from_checkpoint(source, str(source.path), owned=False)
    if isinstance(source, nn.Module):
        return _from_mapping(source.state_dict(), type(source).__name__, module_roles(source))
    if isinstance(source, Mapping):
        src = _from_mapping(_state_in_mapping(source), "mapping")
        src.tree = lambda: source
        return src
    raise TransferError(f"cannot transfer from a {type(source).__name__}",
                        hint="pass a checkpoint path, a torchkeep Checkpoint, an nn.Module "
                             "or a mapping of names to tensors")


def _resolve_target(model: Any) -> _Target:
    if isinstance(model, nn.Module):
        sd = model.state_dict(keep_vars=True)
        tensors = {k: v for k, v in _tensor_items(sd).items() if not nn.parameter.is_lazy(v)}
        if len(tensors) < len(_tensor_items(sd)):
            log.warning("%s has uninitialized lazy parameters; they are left out of the transfer "
                        "(run one forward pass first)", type(model).__name__)
        return _Target(type(model).__name__, tensors, module_roles(model), module=model)
    if isinstance(model, MutableMapping):
        tensors = _tensor_items(model)
        roles = order_roles(list(tensors), {k: tuple(v.shape) for k, v in tensors.items()})
        return _Target("state dict", tensors, roles, ordered=not _looks_sorted(list(tensors)))
    raise TransferError(f"cannot transfer into a {type(model).__name__}",
                        hint="pass an nn.Module or a mutable mapping of names to tensors")


def _read_refs_in(obj: Any) -> Any:
    """``obj`` (a part of a checkpoint's tree) with its lazy tensor refs read onto the CPU."""
    from torchkeep.read import tree as _tree
    from torchkeep.read.checkpoint import _load_refs
    from torchkeep.read.formats.base import TensorRef

    found = {str(i): v for i, v in enumerate(v for _, v in _tree.walk(obj) if isinstance(v, TensorRef))}
    if not found:
        return obj
    loaded = _load_refs(found, "cpu")
    by_id = {id(v): loaded[k] for k, v in found.items()}
    return _tree.map_leaves(obj, lambda v: by_id.get(id(v), v))


# ----------------------------------------------------------------------------------- plan
_COPY = _adapt.Adaptation((), "", lambda src, dst: dst.copy_(src))

@dataclass
class _Plan:
    report: TransferReport
    actions: dict[str, tuple[str, _adapt.Adaptation]]  # target -> (source, how to write)


class _Planner:
    def __init__(self, src: _Source, tgt: _Target, enabled: frozenset[str],
                 renames: Mapping[str, str] | None = None) -> None:
        self.src, self.tgt, self.enabled = src, tgt, enabled
        self.renames = dict(renames or {})   # source -> name its target's library gives it
        self.S = src.specs
        self.T = tgt.specs
        self.claimed_src: set[str] = set()
        self.claimed_tgt: set[str] = set()
        self.loaded: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.adapted: dict[str, str] = {}
        self.actions: dict[str, tuple[str, _adapt.Adaptation]] = {}
        self.unused: dict[str, str] = {}
        self.why_missing: dict[str, str] = {}
        self.hints: dict[str, str] = {}
        self.partner: dict[str, str] = {}   # target -> the source paired with it (fitting or not)

    def why_not(self, s: str, t: str) -> str | None:
        """None when source ``s`` can be carried into target ``t`` (as is or adapted), else why."""
        a, b = self.S[s], self.T[t]
        if a == b:
            return None
        _, why = _adapt.plan(a.shape, a.dtype, b.shape, b.dtype, src_role=self.src.roles.get(s),
                             dst_role=self.tgt.roles.get(t), enabled=self.enabled, dst_name=t)
        return why

    def pair(self, s: str, t: str, reason: str) -> None:
        """``s`` and ``t`` are counterparts: load, adapt, or report why not."""
        self.claimed_src.add(s)
        self.claimed_tgt.add(t)
        self.partner[t] = s
        a, b = self.S[s], self.T[t]
        if a == b:  # the common case, without building any message
            self.loaded[t] = s
            self.reasons[t] = reason
            self.actions[t] = (s, _COPY)
            return
        ad, why = _adapt.plan(a.shape, a.dtype, b.shape, b.dtype, src_role=self.src.roles.get(s),
                              dst_role=self.tgt.roles.get(t), enabled=self.enabled, dst_name=t)
        if ad is None:
            self.unused[s] = why or "does not fit"
            self.why_missing[t] = (f"source {s} is {_shape_str(a.shape)}" if a.shape != b.shape else
                                   f"source {s} is {str(a.dtype).replace('torch.', '')}")
            return
        self.loaded[t] = s
        self.reasons[t] = reason
        self.actions[t] = (s, ad)
        if ad.how:
            self.adapted[t] = ad.how

    # a + b: names
    def by_name(self, rules: list, prefix: bool) -> None:
        cand: dict[str, str] = {}
        by_rule: dict[str, list[str]] = {}
        for s in self.S:
            new = self.renames.get(s, s)
            if new != s:
                by_rule[s] = []
            for pat, repl in rules:
                nxt = pat.sub(repl, new)
                if nxt != new:
                    by_rule.setdefault(s, []).append(pat.pattern)
                    new = nxt
            cand[s] = new
        for s in self.S:
            if s not in by_rule and s in self.T:
                self.pair(s, s, "exact")
        seen: dict[str, str] = {}
        for s, used in by_rule.items():
            c = cand[s]
            by = "rule " + ", ".join(f"'{p}'" for p in used) if used else "the library key mapping"
            if c in seen:
                self.claimed_src.add(s)
                self.unused[s] = f"{by} renamed it to {c!r}, as it did {seen[c]!r}"
                continue
            seen[c] = s
            if c in self.T and c not in self.claimed_tgt:
                self.pair(s, c, f"{by}: {s} -> {c}" if used else f"library key mapping: {s} -> {c}")
            elif c in self.T:
                self.claimed_src.add(s)
                self.unused[s] = (f"{by} renamed it to {c!r}, which is already paired "
                                  f"with {self.partner.get(c, c)!r}")
            else:
                self.hints[s] = f"{by} renamed it to {c!r}, which the target does not have"
        if not prefix:
            return
        left = {cand[s]: s for s in self.S if s not in self.claimed_src}
        targets = [t for t in self.T if t not in self.claimed_tgt]
        if not left or not targets:
            return
        tried: dict[tuple[str, str], str | None] = {}

        def fits(c: str, t: str) -> bool:
            if (c, t) not in tried:
                tried[(c, t)] = self.why_not(left[c], t)
            return tried[(c, t)] is None

        found = keys.align_prefixes(list(left), targets, fits=fits)
        if found is None:
            return
        p, q, mapping = found
        log.debug("prefix alignment %r -> %r pairs %d tensors", p, q, len(mapping))
        for c, t in mapping.items():
            self.pair(left[c], t, f"prefix '{p}' -> '{q}'")
        # Names the winning prefix pairs but whose shapes do not fit stay free for the
        # structural matcher; if nothing takes them, the report says what came close.
        for (c, t), why in tried.items():
            s = left[c]
            if why is not None and s not in self.claimed_src and t not in self.claimed_tgt \
                    and _swap_prefix(c, p, q) == t:
                self.hints.setdefault(s, f"prefix '{p}' -> '{q}' pairs it with {t}, but {why}")

    # c: structure
    def by_structure(self, ordered: bool) -> None:
        src_names = [s for s in self.S if s not in self.claimed_src]
        tgt_names = [t for t in self.T if t not in self.claimed_tgt]
        if not src_names or not tgt_names:
            return
        gs = matching.group_modules(src_names, {s: self.S[s].shape for s in src_names})
        gt = matching.group_modules(tgt_names, {t: self.T[t].shape for t in tgt_names})
        all_s = list(dict.fromkeys(keys.module_path(s) for s in self.S))
        all_t = list(dict.fromkeys(keys.module_path(t) for t in self.T))
        if ordered:
            result = matching.veto(matching.align(gs, gt), all_s, all_t)
            how = "by order and shape"
        else:
            result = matching.align_unordered(gs, gt, all_source=all_s, all_target=all_t)
            how = "by shape, names and indices (source order unknown)"
        for m in result.matches:
            for s, t in m.tensors.items():
                self.pair(s, t, m.reason)
        by_path = {g.path: g for g in gs}
        for path, targets in result.ambiguous.items():
            shown = ", ".join(p or "<root>" for p in targets[:4]) + (", ..." if len(targets) > 4 else "")
            rivals = result.rivals.get(path)
            if rivals:
                why = (f"ambiguous: module {path or '<root>'} fits {shown} best, which fits "
                       f"{', '.join(rivals[:3])} at least as well {how}")
            else:
                why = (f"ambiguous: module {path or '<root>'} fits {len(targets)} target modules "
                       f"equally {how} ({shown})")
            for s in by_path[path].tensors.values():
                self.claimed_src.add(s)
                self.unused[s] = why
        for path, (target, why) in result.contradicted.items():
            for s in by_path[path].tensors.values():
                if s not in self.claimed_src:
                    self.hints.setdefault(s, f"structure pairs it with module {target or '<root>'} "
                                             f"by shape, but {why}")

    def finish(self) -> _Plan:
        # Tied target tensors (one storage under two names) that were loaded under one name.
        ties: dict[tuple, list[str]] = {}
        for t, v in self.tgt.tensors.items():
            if v.numel() and not v.is_meta:
                key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype)
                ties.setdefault(key, []).append(t)
        for names in ties.values():
            done = [t for t in names if t in self.actions]
            if done:
                for t in names:
                    if t not in self.loaded:
                        self.loaded[t] = self.loaded[done[0]]
                        self.reasons[t] = f"tied to {done[0]} (same storage)"
                        self.why_missing.pop(t, None)
        used = {s for s, _ in self.actions.values()}
        for s in self.S:
            if s not in used and s not in self.unused:
                self.unused[s] = self.hints.get(s, "no counterpart in the target")
        order = {t: i for i, t in enumerate(self.T)}
        sorder = {s: i for i, s in enumerate(self.S)}
        loaded = dict(sorted(self.loaded.items(), key=lambda kv: order[kv[0]]))
        report = TransferReport(
            loaded=loaded,
            adapted={t: self.adapted[t] for t in loaded if t in self.adapted},
            missing=[t for t in self.T if t not in self.loaded],
            unused=dict(sorted(self.unused.items(), key=lambda kv: sorder[kv[0]])),
            reasons={t: self.reasons[t] for t in loaded},
            why_missing={t: w for t, w in self.why_missing.items() if t not in self.loaded},
            source=self.src.label, target=self.tgt.label, stripped=list(self.src.stripped),
            target_shapes={t: sp.shape for t, sp in self.T.items()},
            source_shapes={s: sp.shape for s, sp in self.S.items()},
        )
        return _Plan(report, dict(self.actions))


def _plan(src: _Source, tgt: _Target, rules: RulesLike, match: str, enabled: frozenset[str],
          order: str = "auto", library_keys: bool = True) -> _Plan:
    if match not in MATCH_MODES:
        raise ValueError(f"match={match!r}: expected one of {', '.join(MATCH_MODES)}")
    if order not in ORDER_MODES:
        raise ValueError(f"order={order!r}: expected one of {', '.join(ORDER_MODES)}")
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    elif isinstance(rules, str) or (isinstance(rules, tuple) and len(rules) == 2
                                    and all(isinstance(x, str) for x in rules)):
        rules = [rules]  # one rule given on its own
    compiled = keys.compile_rules(rules)
    renames, notes = {}, []
    if library_keys and tgt.module is not None:
        from torchkeep.carry.libkeys import library_renames
        renames, notes = library_renames(tgt.module, list(src.specs))
    p = _Planner(src, tgt, enabled, renames)
    if match != "structure":
        p.by_name(compiled, prefix=match in ("auto", "name"))
    if match in ("auto", "structure"):
        ordered = order == "known" or (order == "auto" and src.ordered and tgt.ordered)
        p.by_structure(ordered)
    plan = p.finish()
    plan.report.notes += notes
    return plan


# ---------------------------------------------------------------------------------- apply
def _speak_up(report: TransferReport, allow_empty: bool) -> None:
    """Warn when part of the target keeps its init; refuse a transfer that loads nothing."""
    if not report.loaded and report.target_shapes and not allow_empty and not report.dry_run:
        c = report.counts
        err = TransferError(
            f"transfer {report.source} -> {report.target} loaded nothing: none of the "
            f"{c['target']} target tensors found a counterpart among the {c['source']} source "
            f"tensors ({c['ambiguous']} ambiguous); nothing was changed",
            hint="run it with dry_run=True (CLI: without --out) to see every tensor's fate, add "
                 "rename rules, or pass allow_empty=True (CLI: --allow-empty) to accept it")
        err.report = report  # type: ignore[attr-defined]
        raise err
    text = report.warning()
    if text:
        log.warning("%s", text)


def _materialize(plan: _Plan, src: _Source, tgt: _Target) -> dict[str, torch.Tensor]:
    """The value each planned target tensor gets, without touching the target: the source tensor
    itself for a plain copy, a new tensor for an adapted one."""
    needed = list(dict.fromkeys(s for s, _ in plan.actions.values()))
    tensors = src.read(needed)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for t, (s, ad) in plan.actions.items():
            value = tensors[s]
            if ad is not _COPY and (ad.how or tuple(value.shape) != tuple(tgt.tensors[t].shape)):
                dst = tgt.tensors[t].detach().clone()
                ad.write(value.to(dst.device), dst)
                value = dst
            out[t] = value
    return out


def _target_param_names(model: Any, tgt: _Target) -> dict[int, str]:
    if isinstance(model, nn.Module):
        names: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)
        return names
    return {id(v): k for k, v in reversed(list(tgt.tensors.items()))}


def _plan_optimizer(optimizer: Any, model: Any, src: _Source, tgt: _Target, plan: _Plan,
                    reshaped: str, copy: bool) -> Any:
    from torchkeep.carry.migration import optimizer as migrate
    if src.tree is None:
        raise TransferError(f"the source ({src.label}) holds no optimizer state",
                            hint="pass a checkpoint that was saved with the optimizer's state")
    where, saved = migrate.find_optimizer_state(src.tree())
    saved = _read_refs_in(saved)
    weights = [(n, sp.shape, sp.dtype, src.storage.get(n)) for n, sp in src.specs.items()]
    names, how = migrate.saved_param_names(
        saved, weights=weights, clean=lambda n: migrate._strip_like(n, src.stripped))
    if where:
        how += f"; state from '{where}'"
    return migrate.plan_optimizer(optimizer, saved, names, plan.actions, _target_param_names(model, tgt),
                                  source_shapes={n: sp.shape for n, sp in src.specs.items()},
                                  why_missing=plan.report.why_missing, unused=plan.report.unused,
                                  reshaped=reshaped, copy=copy, names_from=how)


def _plan_ema(ema: Any, src: _Source, plan: _Plan) -> Any:
    from torchkeep.carry.migration import optimizer as migrate
    found = migrate.find_ema_state(src.tree()) if src.tree is not None else None
    if found is None:
        raise TransferError(f"the source ({src.label}) holds no EMA weights (looked under "
                            f"{', '.join(migrate.EMA_KEYS[:4])}, ...)",
                            hint="leave out ema=, or pass a checkpoint saved with them")
    key, tensors = found
    tensors = _read_refs_in(tensors)
    from torchkeep.carry.migration import ema as ema_state
    return ema_state.plan_ema(ema, tensors, plan.actions, plan.report.reasons, f"{src.label} '{key}'")


def _not_exact(report: TransferReport) -> TransferError:
    """The error of a strict transfer that is not exact (raised before anything changes)."""
    err = TransferError(
        f"transfer {report.source} -> {report.target} is not exact "
        f"({len(report.missing)} missing, {len(report.unused)} unused); nothing was changed:\n  "
        + "\n  ".join(report.problems()),
        hint="pass strict=False to load what fits, or add rename rules")
    err.report = report  # type: ignore[attr-defined]
    return err


def _apply(plan: "_Plan", src: Any, tgt: Any) -> None:
    """Read the source tensors the plan needs and write them (adapted) into the target."""
    meta = [t for t in plan.actions if tgt.tensors[t].device.type == "meta"]
    if meta:
        raise TransferError(f"{len(meta)} target tensors are on the meta device ({meta[0]}, ...); "
                            "nothing was changed",
                            hint="materialize the model first (model.to_empty(device=...)) "
                                 "or pass dry_run=True")
    if not plan.actions:
        return
    needed = list(dict.fromkeys(s for s, _ in plan.actions.values()))
    tensors = src.read(needed)
    with torch.no_grad():
        for t, (s, ad) in plan.actions.items():
            ad.write(tensors[s], tgt.tensors[t])
    plan.report.applied = True


def transfer(model: nn.Module | MutableMapping[str, torch.Tensor], source: Any, *,
             rules: RulesLike = None, match: str = "auto", adapt: bool | Iterable[str] = True,
             strict: bool = False, dry_run: bool = False, allow_empty: bool = False,
             order: str = "auto", library_keys: bool = True, optimizer: Any = None,
             ema: Any = None, reshaped: str = "adapt") -> TransferReport:
    """Copy the tensors of ``source`` that fit into ``model``, and report every tensor's fate.

    ``source``: a checkpoint path, a :class:`~torchkeep.Checkpoint`, an ``nn.Module`` or a
    mapping of names to tensors (a training checkpoint dict is searched for its state dict).
    Wrapper prefixes (``module.``, ``_orig_mod.``) are stripped from its names first.
    ``model``: an ``nn.Module`` or a mutable mapping of tensors, filled in place.
    ``rules``: ordered ``(regex, replacement)`` pairs (or ``'REGEX=REPL'`` strings) rewriting
    source names into target names. ``match``: ``'auto'`` (names, then structure), ``'name'``
    (exact, rules and prefix alignment), ``'exact'`` (exact and rules only) or ``'structure'``
    (order and shapes only). ``adapt``: True, False, or adapter names from
    :data:`torchkeep.carry.adapters.ADAPTERS`. ``strict``: raise :class:`TransferError` listing every
    missing and unused tensor before anything is read or changed. ``dry_run``: plan and report,
    change nothing.

    Loud by default: when a target tensor keeps its init, or more than
    :data:`~torchkeep.carry.report.UNUSED_WARN_SHARE` of the source's elements go unused, a
    WARNING gives the summary and the largest tensors left at init; when nothing at all would
    load, :class:`TransferError` is raised (``err.report`` holds the plan) unless
    ``allow_empty=True`` (a dry run only warns). ``order``: whether the source's name order is
    evidence for structural matching: ``'auto'`` (yes for torch pickles, torchkeep folders,
    modules and unsorted mappings; no for safetensors, sharded indexes, DCP and sorted names),
    ``'known'`` or ``'unknown'``. Without it, modules are paired only where shapes, name tokens and
    indices single one out; anything else is reported ambiguous, never guessed.
    ``library_keys``: when ``model`` is a transformers model that declares a checkpoint key
    mapping, apply it to the source's names before matching (the report's notes say so).

    ``optimizer``: an optimizer over ``model``'s parameters that receives the optimizer state
    saved with the source, by parameter name through the same plan (see :mod:`torchkeep.carry.migration.optimizer`;
    ``reshaped='adapt'`` adapts the state of a reshaped parameter like its weight, ``'reset'``
    starts it over); ``report.optimizer`` lists every parameter's fate. ``ema``: an EMA copy of
    ``model`` (module or mapping) that receives the EMA weights saved with the source (under
    ``ema``, ``model_ema``, ``state_dict_ema``, ...) through the same plan; ``report.ema`` says how.
    """
    enabled = _adapt.enabled_adapters(adapt)
    tgt = _resolve_target(model)
    src = _resolve_source(source)
    try:
        plan = _plan(src, tgt, rules, match, enabled, order, library_keys)
        report = plan.report
        report.dry_run = dry_run
        if strict and not report.ok:
            raise _not_exact(report)
        # The optimizer state and the EMA copy are planned (and read) before anything changes.
        opt_plan = ema_plan = None
        if optimizer is not None:
            # State read from a file is ours; state from a live mapping is cloned, not shared.
            owned = isinstance(source, (str, os.PathLike)) or hasattr(source, "state_refs")
            opt_plan = _plan_optimizer(optimizer, model, src, tgt, plan, reshaped, copy=not owned)
            report.optimizer = opt_plan.report
        if ema is not None:
            report.ema, ema_plan = _plan_ema(ema, src, plan)
        _speak_up(report, allow_empty)
        if dry_run:
            return report
        _apply(plan, src, tgt)
        if opt_plan is not None:
            from torchkeep.carry.migration import optimizer as migrate
            migrate.apply_optimizer(optimizer, opt_plan)
        if ema_plan is not None:
            from torchkeep.carry.migration import ema as ema_state
            ema_state.apply_ema(ema_plan)
            report.ema.applied = True
        log.debug("%s", report.headline())
        return report
    finally:
        src.close()
