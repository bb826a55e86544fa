"""A TrainState's model and optimizer in the canonical, rank-independent form of
``torch.distributed.checkpoint.state_dict`` (parameter names without wrapper prefixes, optimizer
state keyed by parameter name, DTensors where sharded), which :mod:`torchkeep.keep.sharded.checkpointing`
saves and restores whatever the wrapping and the number of ranks.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterator

import torch

from torchkeep.errors import StateError
from torchkeep.keep.sharded.ranks import _dtensor_cls, is_dtensor

if TYPE_CHECKING:  # pragma: no cover
    from torchkeep.keep.trainstate import TrainState

LAYOUT = "canonical"   # model/optimizer as get_state_dict gives them


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping) and not isinstance(value, torch.nn.Module):
        return dict(value)
    return {"": value}


def _path(part: str, name: str) -> str:
    return f"{part}.{name}" if name else part


def has_dtensors(state: Any) -> bool:
    """True when a model of ``state`` (a TrainState) has DTensor parameters or buffers."""
    if _dtensor_cls() is None:
        return False
    for m in _as_dict(getattr(state, "model", None)).values():
        if isinstance(m, torch.nn.Module):
            for t in (*m.parameters(), *m.buffers()):
                if is_dtensor(t):
                    return True
    return False


@contextlib.contextmanager
def _detached(state: "TrainState", *parts: str) -> Iterator[None]:
    """``state`` without ``parts`` for the duration (its own capture/restore then skip them)."""
    saved = {p: getattr(state, p) for p in parts}
    try:
        for p in parts:
            setattr(state, p, None)
        yield
    finally:
        for p, v in saved.items():
            setattr(state, p, v)


def _optimizer_owners(state: "TrainState") -> dict[str, tuple[str, torch.nn.Module, Any]]:
    """optimizer name -> (model name, model, optimizer): the model holding all its parameters."""
    models = {n: m for n, m in _as_dict(state.model).items() if isinstance(m, torch.nn.Module)}
    out = {}
    for oname, opt in _as_dict(state.optimizer).items():
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        for mname, m in models.items():
            if ids <= {id(p) for p in m.parameters()}:
                out[oname] = (mname, m, opt)
                break
        else:
            raise StateError("the optimizer's parameters are not all in one model of this TrainState",
                             entry=_path("optimizer", oname),
                             hint="pass the model(s) it optimizes as model= (a dict for several)")
    return out


def _optimizer_state_dict(model: torch.nn.Module, opt: Any, *, init: bool = False) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import _get_fqns, get_optimizer_state_dict

    if opt.state or init:  # init: for restoring, the state tensors DCP loads into must exist
        return get_optimizer_state_dict(model, opt)
    # Nothing stepped yet. get_optimizer_state_dict would make the state with a zero-gradient
    # step (Adam's step count would become 1 and the resumed run would differ): name the
    # parameters of each group ourselves instead.
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), sorted(_get_fqns(model, n))[0])
    groups = []
    for g in opt.state_dict()["param_groups"]:
        groups.append(dict(g))
    for g, live in zip(groups, opt.param_groups):
        g["params"] = [names[id(p)] for p in live["params"]]
        g.pop("param_names", None)
    return {"state": {}, "param_groups": groups}


def _canonical_parts(state: "TrainState", *, restoring: bool = False) -> dict[str, Any]:
    """``{'model': ..., 'optimizer': ...}`` as ``get_state_dict`` gives them (live tensors,
    DTensors where sharded), shaped like :meth:`TrainState.capture` (one object: no name level).
    ``restoring``: optimizers that have not stepped get their state tensors made (to load into)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    out: dict[str, Any] = {}
    models = _as_dict(state.model)
    if models:
        msd = {}
        for name, m in models.items():
            if not isinstance(m, torch.nn.Module):
                raise StateError(f"expected a torch.nn.Module, got {type(m).__name__}",
                                 entry=_path("model", name))
            msd[name] = get_model_state_dict(m)
        out["model"] = msd[""] if list(msd) == [""] else msd
    owners = _optimizer_owners(state)
    if owners:
        osd = {name: _optimizer_state_dict(m, opt, init=restoring) for name, (_, m, opt) in owners.items()}
        out["optimizer"] = osd[""] if list(osd) == [""] else osd
    return out


def capture(state: "TrainState") -> dict[str, Any]:
    """:meth:`TrainState.capture` with model and optimizer in the canonical, rank-independent
    form of ``torch.distributed.checkpoint.state_dict`` (live tensors, DTensors where sharded)."""
    with _detached(state, "model", "optimizer"):
        tree = state.capture()
    types_ = tree.setdefault("meta", {}).setdefault("types", {})
    for part in ("model", "optimizer"):
        for name, obj in _as_dict(getattr(state, part)).items():
            t = type(obj)
            types_[_path(part, name)] = f"{t.__module__}.{t.__qualname__}"
    tree["meta"]["layout"] = LAYOUT
    parts = _canonical_parts(state)
    return {**parts, **tree}
