"""Find optimizer and EMA state in a loaded checkpoint and name the parameters of a saved optimizer
state (recorded, named groups, or inferred from the model's order and shapes), the lookups that
:mod:`torchkeep.carry.migration.optimizer` and :func:`torchkeep.transfer` start from."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import nn

from torchkeep.errors import TransferError

__all__ = ["OPTIMIZER_KEYS", "EMA_KEYS", "BUFFER_LEAVES", "is_optimizer_state",
           "find_optimizer_state", "find_ema_state", "saved_param_names"]

# Keys under which training scripts keep the optimizer state, most preferred first.
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim", "opt",
                  "optimizers", "optimizer_states")
# Keys under which training scripts keep EMA weights.
EMA_KEYS = ("ema", "model_ema", "ema_model", "state_dict_ema", "ema_state_dict", "ema_state",
            "averaged_model", "swa_model")
# Leaf names of buffers that never sit in an optimizer (used when names must be inferred).
BUFFER_LEAVES = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_MAX_EMBED_CELLS = 20_000_000


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
                        hint="load the one you mean and call torchkeep.carry.migration.optimizer.migrate_optimizer")


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
                                 "source_names= to torchkeep.carry.migration.optimizer.migrate_optimizer")
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
                            "source_names= to torchkeep.carry.migration.optimizer.migrate_optimizer")
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
