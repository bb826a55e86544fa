"""``TrainState``: everything a training run needs to continue bit for bit after a restart.

It captures module state dicts, optimizer state (with each parameter's name and shape, checked on
restore because torch matches optimizer state by position only), LR schedulers (nested ones of
SequentialLR and ChainedScheduler included), GradScaler, the global RNGs, epoch / global step /
position in the epoch with the generator states the epoch started from, and user extras.
:meth:`TrainState.batches` iterates the DataLoader so that a restored state continues the
interrupted epoch with exactly the batches that were left (see :mod:`torchkeep.keep.progress`).
"""
from __future__ import annotations

import collections
import logging
import types
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch

from torchkeep.errors import StateError
from torchkeep.keep import progress as _progress
from torchkeep.keep import rng as _rng

log = logging.getLogger(__name__)

PARTS = ("model", "optimizer", "scheduler", "scaler")


def _qualname(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _as_dict(value: Any, part: str) -> dict[str, Any]:
    """A component given as one object is stored under the name '' (path ``part``)."""
    if value is None:
        return {}
    if isinstance(value, Mapping) and not isinstance(value, torch.nn.Module):
        for k in value:
            if not isinstance(k, str) or not k:
                raise StateError(f"names of several {part}s must be non-empty strings, got {k!r}",
                                 entry=part)
        return dict(value)
    return {"": value}


def _path(part: str, name: str) -> str:
    return f"{part}.{name}" if name else part


def pickle_opt_in(trust: Any, allow_pickle: Any, where: str) -> Any:
    """``trust``, or the deprecated ``allow_pickle`` (with a DeprecationWarning) when given.

    A bool for most callers; the Lightning plugin also takes a collection of top-level keys,
    which is passed through as given.
    """
    if allow_pickle is None:
        return trust
    warnings.warn(f"{where}(allow_pickle=...) is deprecated; use trust=... (the same opt-in "
                  f"torchkeep.open and the CLI's --trust use)", DeprecationWarning, stacklevel=3)
    if trust is not False or isinstance(allow_pickle, (bool, int)):
        return bool(allow_pickle) or trust
    return allow_pickle


class TrainState:
    """The state of a training run: pass the objects, get ``capture()`` / ``restore()``.

    ``model``, ``optimizer``, ``scheduler``, ``scaler`` and ``dataloader`` are each one object or a
    dict of several (``model={'gen': g, 'disc': d}``). ``extras`` is a dict of JSON-able values
    and tensors that :meth:`restore` updates in place. With several dataloaders, the first one
    drives ``epoch`` and ``step``. Objects that cannot be stored as typed JSON (a LambdaLR's
    lambda, custom classes) raise StateError naming their path unless ``trust=True`` (the one
    name of the pickle opt-in across torchkeep; ``allow_pickle`` is its deprecated alias).
    """

    def __init__(self, model: Any = None, optimizer: Any = None, scheduler: Any = None,
                 scaler: Any = None, dataloader: Any = None, extras: dict[str, Any] | None = None,
                 *, trust: bool = False, rng: bool = True, allow_pickle: bool | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.dataloader = dataloader
        self.extras: dict[str, Any] = extras if extras is not None else {}
        self.trust = pickle_opt_in(trust, allow_pickle, "TrainState")
        self.capture_rng = rng
        self.step = 0
        self.max_steps: int | None = None   # the budget of the latest batches(max_steps=...)
        self._epoch = 0
        self._loaders = _as_dict(dataloader, "dataloader")
        for name, dl in self._loaders.items():
            if not isinstance(dl, torch.utils.data.DataLoader):
                raise StateError(f"expected a torch.utils.data.DataLoader, got {type(dl).__name__}",
                                 entry=_path("dataloader", name))
        self._main = next(iter(self._loaders), None)
        self._progress = {name: _progress.LoaderProgress() for name in self._loaders}
        # -- torchkeep.keep.doctor.live: called once by the next batches() (before its iterator is built);
        # a restore sets it to check the run at its first batch against the checkpoint ----------
        self.before_first_batch: Callable[[TrainState, str], None] | None = None
        # ------------------------------------------------------------------------------------------

    @property
    def allow_pickle(self) -> bool:
        """Deprecated name of :attr:`trust`."""
        return self.trust

    @property
    def _parts(self) -> dict[str, dict[str, Any]]:
        return {p: _as_dict(getattr(self, p), p) for p in PARTS}

    # -- counters -----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Completed epochs of the (first) dataloader; a plain counter without one."""
        return self._progress[self._main].epoch if self._main is not None else self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        if self._main is not None:
            p = self._progress[self._main]
            if p.epoch != value:
                p.epoch, p.position, p.epoch_start = int(value), 0, None
        else:
            self._epoch = int(value)

    @property
    def position(self) -> int:
        """Batches of the current epoch handed out by :meth:`batches` (0 without a dataloader)."""
        return self._progress[self._main].position if self._main is not None else 0

    def progress(self, loader: str | None = None) -> _progress.LoaderProgress:
        return self._progress[self._loader_name(loader)]

    def _loader_name(self, loader: str | None) -> str:
        if not self._loaders:
            raise StateError("this TrainState has no dataloader", entry="dataloader")
        if loader is None:
            if len(self._loaders) > 1:
                raise StateError(f"several dataloaders ({', '.join(self._loaders)}): name one",
                                 entry="dataloader")
            return self._main  # type: ignore[return-value]
        if loader not in self._loaders:
            raise StateError(f"no dataloader named {loader!r}", entry="dataloader",
                             hint=f"known: {', '.join(self._loaders)}")
        return loader

    # -- data ---------------------------------------------------------------------------
    def batches(self, loader: str | None = None, *, max_steps: int | None = None) -> Iterator[Any]:
        """One epoch of the dataloader, counting each batch as consumed when it is handed out;
        with ``max_steps``, epoch after epoch until :attr:`step` reaches ``max_steps``.

        Save after applying a batch (the state then includes it; ``CheckpointManager.step_done``
        saves when the policy says so). At the end of an epoch the epoch counter advances;
        leaving the loop early (``break``, or reaching ``max_steps`` inside an epoch) does not,
        and the next call continues the same epoch. After :meth:`restore`, the interrupted epoch
        continues with the remaining batches in the original order; skipped batches are never
        loaded.
        """
        name = self._loader_name(loader)
        if max_steps is not None:
            if name != self._main:
                raise StateError(f"max_steps counts the steps of the first dataloader "
                                 f"({self._main!r}), not of {name!r}", entry=_path("dataloader", name))
            if int(max_steps) < 0:
                raise ValueError(f"max_steps must be >= 0, got {max_steps}")
            self.max_steps = int(max_steps)
        # -- torchkeep.keep.doctor.live --------------------------------------------------------------------
        hook, self.before_first_batch = self.before_first_batch, None
        if hook is not None:
            hook(self, name)
        # ------------------------------------------------------------------------------------------
        p = self._progress[name]
        if max_steps is not None:
            return self._until(name, p, int(max_steps))
        it = _progress.begin_epoch(self._loaders[name], p, name)
        return self._iterate(name, p, it)

    def _until(self, name: str, p: _progress.LoaderProgress, max_steps: int) -> Iterator[Any]:
        """Epochs of the main dataloader until ``max_steps``; stopping inside an epoch leaves its
        position for the next call (or the next run) to continue from."""
        while self.step < max_steps:
            fresh, handed = p.position == 0, 0
            epoch = self._iterate(name, p, _progress.begin_epoch(self._loaders[name], p, name))
            for batch in epoch:
                handed += 1
                yield batch
                if self.step >= max_steps:
                    epoch.close()   # the epoch is not over: its position stays
                    return
            if fresh and not handed:
                raise StateError(f"the dataloader yielded no batches in epoch {p.epoch - 1}; "
                                 f"step {self.step} of {max_steps}", entry=_path("dataloader", name),
                                 hint="check the dataset is not empty (and drop_last with a "
                                      "dataset smaller than one batch)")

    def _iterate(self, name: str, p: _progress.LoaderProgress, it: Iterator[Any]) -> Iterator[Any]:
        main = name == self._main
        for batch in it:
            p.position += 1
            if main:
                self.step += 1
            yield batch
        p.epoch += 1
        p.position = 0
        p.epoch_start = None

    # -- capture ------------------------------------------------------------------------
    def _param_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for mname, m in self._parts["model"].items():
            if not isinstance(m, torch.nn.Module):
                continue
            for n, prm in m.named_parameters():
                names.setdefault(id(prm), f"{mname}.{n}" if mname else n)
        return names

    def capture(self) -> dict[str, Any]:
        """The state as nested containers of plain values and tensors (live tensors, not copies).

        Raises StateError naming the path of anything that cannot be stored without pickle
        (unless ``trust``), e.g. ``scheduler.lr_lambdas[0]``.
        """
        tree: dict[str, Any] = {}
        types_: dict[str, str] = {}
        versions: dict[str, Any] = {}
        names = self._param_names()
        parts = self._parts
        for part in PARTS:
            items = parts[part]
            if not items:
                continue
            out = {}
            for name, obj in items.items():
                path = _path(part, name)
                types_[path] = _qualname(obj)
                if part == "model":
                    sd = obj.state_dict()
                    meta = getattr(sd, "_metadata", None)
                    if meta:
                        versions[path] = {k: dict(v) for k, v in meta.items()}
                    out[name] = dict(sd)
                elif part == "optimizer":
                    out[name] = self._capture_optimizer(obj, names)
                elif part == "scheduler":
                    out[name] = self._capture_scheduler(obj, path)
                else:
                    out[name] = obj.state_dict()
            tree[part] = out[""] if list(out) == [""] else out
        if self.capture_rng:
            tree["rng"] = _rng.capture()
        tree["progress"] = self._capture_progress()
        if self.extras:
            tree["extras"] = dict(self.extras)
        tree["meta"] = {"types": types_, "module_versions": versions}
        return tree

    def _capture_optimizer(self, opt: Any, names: dict[int, str]) -> dict[str, Any]:
        sd = opt.state_dict()
        params = [p for g in opt.param_groups for p in g["params"]]
        return {**sd, "param_names": [names.get(id(p)) for p in params],
                "param_shapes": [list(p.shape) for p in params]}

    def _capture_scheduler(self, s: Any, path: str) -> dict[str, Any]:
        sd = s.state_dict()
        subs = getattr(s, "_schedulers", None)
        if isinstance(subs, (list, tuple)) and "_schedulers" in sd:
            sd["_schedulers"] = [self._capture_scheduler(c, f"{path}._schedulers[{i}]")
                                 for i, c in enumerate(subs)]
        fns = getattr(s, "lr_lambdas", None)
        if isinstance(fns, (list, tuple)):
            stored = list(sd.get("lr_lambdas") or [None] * len(fns))
            for i, fn in enumerate(fns):
                if isinstance(fn, types.FunctionType):
                    if not self.allow_pickle:
                        raise StateError(
                            f"{type(s).__name__} holds a function ({fn.__qualname__}); functions are "
                            f"code and cannot be stored as data", entry=f"{path}.lr_lambdas[{i}]",
                            hint="use a built-in scheduler (LinearLR, CosineAnnealingLR, OneCycleLR, "
                                 "SequentialLR), or pass trust=True with a module-level function")
                    stored[i] = fn
            sd["lr_lambdas"] = stored
        return sd

    def _capture_progress(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "position": self.position}
        loaders = {name: {"epoch": p.epoch, "position": p.position, "epoch_start": p.epoch_start,
                          "generators": _progress.generator_states(self._loaders[name])}
                   for name, p in self._progress.items()}
        if list(loaders) == [""]:
            out["loader"] = loaders[""]        # one dataloader: no name level
        elif loaders:
            out["loaders"] = loaders
        return out

    # -- restore ------------------------------------------------------------------------
    def restore(self, tree: Mapping[str, Any], *, strict: bool = True) -> None:
        """Load a captured state (tensors already read) into the objects.

        With ``strict`` (the default) every component of the state must be in the checkpoint and
        the other way round; names and shapes of optimizer parameters must match. Nothing is
        half-applied on a mismatch found up front (missing parts, optimizer names); errors from
        torch's own ``load_state_dict`` are raised as StateError naming the component.
        """
        types_ = (tree.get("meta") or {}).get("types", {})
        versions = (tree.get("meta") or {}).get("module_versions", {})
        plan = []
        parts = self._parts
        for part in PARTS:
            items = parts[part]
            stored = tree.get(part)
            if not items and stored is None:
                continue
            if not items:
                self._mismatch(strict, f"the checkpoint holds {_a(part)} but this TrainState has none", part)
                continue
            if stored is None:
                self._mismatch(strict, f"this TrainState has {_a(part)} but the checkpoint holds none", part)
                continue
            stored = {"": stored} if list(items) == [""] else stored
            if set(stored) != set(items):
                raise StateError(f"the checkpoint holds {part}s {sorted(stored)}, this TrainState "
                                 f"has {sorted(items)}", entry=part)
            for name, obj in items.items():
                path = _path(part, name)
                want = types_.get(path)
                if want and want != _qualname(obj) and part != "model":
                    raise StateError(f"the checkpoint holds a {want.rsplit('.', 1)[-1]}, this state "
                                     f"has a {type(obj).__name__}", entry=path)
                if part == "optimizer":
                    self._check_optimizer(obj, stored[name], path)
                plan.append((part, name, obj, stored[name], path))
        for part, name, obj, sd, path in plan:
            if part == "model":
                self._restore_module(obj, sd, versions.get(path), path)
            elif part == "optimizer":
                sd = {k: v for k, v in sd.items() if k not in ("param_names", "param_shapes")}
                self._load(obj, sd, path)
            elif part == "scheduler":
                self._restore_scheduler(obj, sd, path)
            else:
                self._load(obj, sd, path)
        self._restore_progress(tree.get("progress") or {}, strict)
        if "extras" in tree:
            self._restore_extras(tree["extras"])
        if self.capture_rng and "rng" in tree:
            _rng.restore(tree["rng"])

    @staticmethod
    def _mismatch(strict: bool, message: str, part: str) -> None:
        if strict:
            raise StateError(message, entry=part, hint="pass strict=False to restore the rest")
        log.warning("%s: %s (skipped)", part, message)

    @staticmethod
    def _load(obj: Any, sd: Any, path: str) -> None:
        try:
            obj.load_state_dict(sd)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise StateError(f"load_state_dict failed: {e}", entry=path) from e

    def _restore_module(self, module: Any, sd: Mapping[str, Any], versions: Any, path: str) -> None:
        sd = collections.OrderedDict(sd)
        if versions:
            sd._metadata = collections.OrderedDict(versions)  # type: ignore[attr-defined]
        try:
            module.load_state_dict(sd)
        except RuntimeError as e:
            raise StateError(f"does not match the checkpoint: {str(e).strip()}", entry=path) from e

    def _check_optimizer(self, opt: Any, sd: Mapping[str, Any], path: str) -> None:
        names = self._param_names()
        params = [p for g in opt.param_groups for p in g["params"]]
        saved_names = list(sd.get("param_names") or [None] * len(params))
        saved_shapes = sd.get("param_shapes")
        groups = sd.get("param_groups", [])
        if len(groups) != len(opt.param_groups):
            raise StateError(f"the checkpoint has {len(groups)} parameter groups, the optimizer "
                             f"{len(opt.param_groups)}", entry=path)
        if saved_shapes is None:
            return
        for gi, (g, sg) in enumerate(zip(opt.param_groups, groups)):
            if len(g["params"]) != len(sg["params"]):
                raise StateError(
                    f"parameter group {gi} has {len(g['params'])} parameters, the checkpoint's "
                    f"{len(sg['params'])}", entry=path,
                    hint=_name_diff([names.get(id(p)) for p in params], saved_names))
        for i, prm in enumerate(params):
            now_name, now_shape = names.get(id(prm)), list(prm.shape)
            old_name, old_shape = saved_names[i], list(saved_shapes[i])
            if (old_name and now_name and old_name != now_name) or old_shape != now_shape:
                raise StateError(
                    f"parameter {i}: the checkpoint has {old_name or '?'!r} of shape {old_shape}, "
                    f"the optimizer now has {now_name or '?'!r} of shape {now_shape}",
                    entry=f"{path}.{now_name or old_name or i}",
                    hint="build the optimizer over the same parameters in the same order as the "
                         "checkpointed run")

    def _restore_scheduler(self, s: Any, sd: Mapping[str, Any], path: str) -> None:
        sd = dict(sd)
        subs = getattr(s, "_schedulers", None)
        nested = sd.pop("_schedulers", None)
        if isinstance(subs, (list, tuple)) and nested is not None:
            if len(nested) != len(subs):
                raise StateError(f"the checkpoint holds {len(nested)} schedulers, this one "
                                 f"{len(subs)}", entry=f"{path}._schedulers")
            for i, (c, csd) in enumerate(zip(subs, nested)):
                self._restore_scheduler(c, csd, f"{path}._schedulers[{i}]")
            sd["_schedulers"] = [c.state_dict() for c in subs]
        fns = getattr(s, "lr_lambdas", None)
        if isinstance(fns, list) and "lr_lambdas" in sd:
            stored = list(sd["lr_lambdas"])
            for i, v in enumerate(stored):
                if callable(v):
                    fns[i] = v
                    stored[i] = None
            sd["lr_lambdas"] = stored
        self._load(s, sd, path)

    def _restore_progress(self, prog: Mapping[str, Any], strict: bool) -> None:
        self.step = int(prog.get("step", 0))
        loaders = prog.get("loaders") or ({"": prog["loader"]} if "loader" in prog else {})
        if not self._loaders:
            self._epoch = int(prog.get("epoch", 0))
            return
        for name, dl in self._loaders.items():
            p = self._progress[name]
            stored = loaders.get(name)
            if stored is None:
                if loaders:
                    self._mismatch(strict, f"the checkpoint holds no progress for dataloader "
                                           f"{name!r} (it has {sorted(loaders)})", _path("dataloader", name))
                p.epoch = int(prog.get("epoch", 0)) if name == self._main else 0
                p.position, p.epoch_start = 0, None
                continue
            p.epoch = int(stored.get("epoch", 0))
            p.position = int(stored.get("position", 0))
            p.epoch_start = stored.get("epoch_start")
            _progress.set_generator_states(dl, stored.get("generators") or {}, strict=strict)

    def _restore_extras(self, stored: Mapping[str, Any]) -> None:
        for k, v in stored.items():
            cur = self.extras.get(k)
            if isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor) and cur.shape == v.shape \
                    and cur.dtype == v.dtype:
                with torch.no_grad():
                    cur.copy_(v)
            elif isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor):
                self.extras[k] = v.to(cur.device)
            elif isinstance(cur, torch.Generator) and isinstance(v, torch.Generator):
                cur.set_state(v.get_state())
            else:
                self.extras[k] = v

    def __repr__(self) -> str:
        comps = self._parts
        parts = [f"{p}={', '.join(n or type(o).__name__ for n, o in comps[p].items())}"
                 for p in PARTS if comps[p]]
        if self._loaders:
            parts.append(f"dataloader={', '.join(n or 'DataLoader' for n in self._loaders)}")
        return f"TrainState({', '.join(parts)}; epoch={self.epoch}, step={self.step})"


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _name_diff(now: list[str | None], saved: list[str | None]) -> str:
    a = [n for n in now if n]
    b = [n for n in saved if n]
    extra = [n for n in a if n not in b]
    missing = [n for n in b if n not in a]
    bits = []
    if extra:
        bits.append(f"new: {', '.join(extra[:3])}")
    if missing:
        bits.append(f"gone: {', '.join(missing[:3])}")
    return "; ".join(bits) or "the parameters differ"
