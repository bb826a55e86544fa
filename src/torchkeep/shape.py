"""Shape a model for fine-tuning: freeze / unfreeze, trainable parameters, optimizer parameter
groups, a per-module summary, and surgery on dotted module paths (remove, replace, truncate).

Selections are globs over parameter *and* module names (``'conv.*'``,
``'encoder.layer.[0-5].*'``; ``*`` crosses dots), module classes (``nn.BatchNorm2d``) or module
instances. Freezing with ``bn='eval'`` locks frozen normalization layers in eval mode so that a
later ``model.train()`` cannot set their running statistics moving again: the layer gets an
instance attribute ``train`` (a small picklable callable) that keeps it in eval mode; ``unfreeze``
deletes that attribute. Nothing about the state dict changes.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Union

from torch import nn

from torchkeep.errors import SurgeryError, closest
from torchkeep.read.keys import module_path

Selector = Union[str, type, nn.Module]

_NORM = nn.modules.batchnorm._NormBase


# ---------------------------------------------------------------------------- selection
class _Index:
    """Names, order and subtree extents of a model's modules and parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = list(model.named_modules())
        self.module_names = [n for n, _ in self.modules]
        self.position = {n: i for i, n in enumerate(self.module_names)}
        self.params = list(model.named_parameters())
        self.param_owner = {n: module_path(n) for n, _ in self.params}
        self.by_id = {id(m): n for n, m in self.modules}
        # Named modules come in pre-order, so a subtree is a contiguous run.
        self.subtree_end: dict[str, int] = {}
        for i, name in enumerate(self.module_names):
            j = i
            pre = name + "." if name else ""
            while j + 1 < len(self.module_names) and self.module_names[j + 1].startswith(pre):
                j += 1
            self.subtree_end[name] = j

    def under(self, names: Iterable[str]) -> set[str]:
        """The modules in the subtrees rooted at ``names``."""
        out: set[str] = set()
        for n in names:
            i = self.position[n]
            out.update(self.module_names[i:self.subtree_end[n] + 1])
        return out

    def hint(self, wanted: str) -> str:
        cands = closest(wanted, [n for n in self.module_names if n] + [n for n, _ in self.params])
        return f"did you mean {', '.join(cands)}?" if cands else "torchkeep.summary(model) lists the modules"

    def select_one(self, item: Selector) -> tuple[set[str], set[str]]:
        """(parameter names, module names) one selector picks; SurgeryError if none."""
        if isinstance(item, str):
            mods = {n for n in self.module_names if fnmatch.fnmatchcase(n, item)}
            params = {n for n, _ in self.params if fnmatch.fnmatchcase(n, item)}
            # A buffer name (a transfer report's 'bn.running_mean') is a valid name too; it
            # selects no parameter of its own.
            if not mods and not params and not any(
                    fnmatch.fnmatchcase(n, item) for n, _ in self.model.named_buffers()):
                raise SurgeryError(f"pattern {item!r} matches no parameter or module of "
                                   f"{type(self.model).__name__}", hint=self.hint(item))
        elif isinstance(item, type) and issubclass(item, nn.Module):
            mods = {n for n, m in self.modules if isinstance(m, item)}
            params = set()
            if not mods:
                raise SurgeryError(f"{type(self.model).__name__} has no {item.__name__} module")
        elif isinstance(item, nn.Module):
            name = self.by_id.get(id(item))
            if name is None:
                raise SurgeryError(f"the given {type(item).__name__} is not a submodule of "
                                   f"{type(self.model).__name__}")
            mods, params = {name}, set()
        else:
            raise TypeError(f"cannot select by {type(item).__name__}: expected a glob, a module "
                            "class or a module")
        mods = self.under(mods)
        params |= {n for n, owner in self.param_owner.items() if owner in mods}
        return params, mods

    def select_until(self, until: str) -> tuple[set[str], set[str]]:
        """Everything registered up to and including module ``until`` (its subtree)."""
        if until not in self.position:
            raise SurgeryError(f"no module {until!r} in {type(self.model).__name__}", hint=self.hint(until))
        end = self.subtree_end[until]
        mods = {n for i, n in enumerate(self.module_names) if self.subtree_end[n] <= end and i <= end}
        params = {n for n, owner in self.param_owner.items() if self.position.get(owner, end + 1) <= end}
        return params, mods

    def select(self, items: Iterable[Selector], until: str | None) -> tuple[set[str], set[str]]:
        items = list(items)
        if not items and until is None:
            return {n for n, _ in self.params}, set(self.module_names)
        params: set[str] = set()
        mods: set[str] = set()
        for item in items:
            p, m = self.select_one(item)
            params |= p
            mods |= m
        if until is not None:
            p, m = self.select_until(until)
            params |= p
            mods |= m
        return params, mods

    def norms(self, params: set[str], mods: set[str]) -> list[tuple[str, nn.Module]]:
        """Normalization layers that count as selected: picked as modules, or all of their
        own parameters picked."""
        out = []
        for name, m in self.modules:
            if not isinstance(m, _NORM):
                continue
            own = [_join(name, p) for p, _ in m.named_parameters(recurse=False)]
            if name in mods or (own and all(p in params for p in own)):
                out.append((name, m))
        return out


def _join(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


# ------------------------------------------------------------------------------ freezing
class EvalLock:
    """Stands in for a frozen norm layer's ``train`` method: whatever mode is asked for, the
    layer stays in eval mode, so ``model.train()`` leaves its running statistics alone.
    Picklable and deep-copyable (it only holds the module)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return type(self.module).train(self.module, False)

    def __repr__(self) -> str:
        return f"EvalLock({type(self.module).__name__})"


def is_eval_locked(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("train"), EvalLock)


def _lock(m: nn.Module) -> None:
    if not is_eval_locked(m):
        object.__setattr__(m, "train", EvalLock(m))
    type(m).train(m, False)


def _unlock(m: nn.Module, mode: bool) -> None:
    if is_eval_locked(m):
        del m.__dict__["train"]
    m.train(mode)


def freeze(model: nn.Module, *selectors: Selector, until: str | None = None,
           bn: str | None = "eval") -> list[str]:
    """Stop gradients for the selected parameters; returns their names.

    With no selectors and no ``until`` the whole model is frozen. ``until='fc.3'`` freezes
    every parameter registered up to and including module ``fc.3``. ``bn='eval'`` (default)
    also locks the frozen normalization layers in eval mode across later ``model.train()``
    calls; ``bn='keep'`` (or None) leaves their mode alone (their statistics keep moving).
    A glob that matches nothing raises :class:`SurgeryError` rather than freezing nothing.
    """
    if bn not in ("eval", "keep", None):
        raise ValueError(f"bn={bn!r}: expected 'eval' or 'keep'")
    idx = _Index(model)
    params, mods = idx.select(selectors, until)
    chosen = [n for n, p in idx.params if n in params]
    by_name = dict(idx.params)
    for n in chosen:
        by_name[n].requires_grad_(False)
    if bn == "eval":
        for _, m in idx.norms(params, mods):
            _lock(m)
    return chosen


def unfreeze(model: nn.Module, *selectors: Selector, until: str | None = None) -> list[str]:
    """Let gradients flow again to the selected parameters (all with no selectors) and release
    the eval lock of the selected normalization layers (they follow ``model.training`` again).
    Returns the names of the parameters made trainable."""
    idx = _Index(model)
    params, mods = idx.select(selectors, until)
    chosen = []
    for n, p in idx.params:
        if n in params and (p.is_floating_point() or p.is_complex()):
            p.requires_grad_(True)
            chosen.append(n)
    for _, m in idx.norms(params, mods):
        _unlock(m, model.training)
    return chosen


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients (each once, even if tied), in registration order."""
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: nn.Module, groups: Mapping[Selector, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer parameter groups from selectors: ``{'backbone.*': {'lr': 1e-5}, '*': {'lr': 1e-3}}``.

    Every trainable parameter lands in exactly one group, the first whose selector matches it;
    one that no selector matches is an error naming it. Frozen parameters are left out. Groups
    come back in the order given, empty ones included, so group indices stay predictable.
    """
    idx = _Index(model)
    selected = []
    for sel, opts in groups.items():
        if "params" in opts:
            raise ValueError(f"group {sel!r}: options must not contain 'params'")
        selected.append(idx.select_one(sel)[0])
    out: list[dict[str, Any]] = [{"params": [], **dict(opts)} for opts in groups.values()]
    unmatched = []
    for name, p in idx.params:
        if not p.requires_grad:
            continue
        for i, names in enumerate(selected):
            if name in names:
                out[i]["params"].append(p)
                break
        else:
            unmatched.append(name)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        raise SurgeryError(f"{len(unmatched)} trainable parameters match no group: {shown}",
                           hint="add a catch-all group such as '*': {...}, or freeze them")
    return out


# ------------------------------------------------------------------------------- summary
@dataclass
class ModuleCounts:
    """Element counts of one top-level module."""

    name: str
    type: str
    params: int = 0
    trainable: int = 0
    frozen: int = 0
    buffers: int = 0
    locked_norms: int = 0   # normalization layers held in eval mode by freeze(bn='eval')


@dataclass
class ModelSummary:
    """Parameter counts of a model by top-level module (tied parameters counted once)."""

    model: str
    rows: list[ModuleCounts] = field(default_factory=list)
    total: int = 0
    trainable: int = 0
    frozen: int = 0
    buffers: int = 0
    locked_norms: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        head = ("module", "type", "params", "trainable", "frozen", "buffers")
        show_locked = self.locked_norms > 0
        if show_locked:
            head += ("bn eval-locked",)

        def cells(r: ModuleCounts) -> tuple[str, ...]:
            c = (r.name, r.type, f"{r.params:,}", f"{r.trainable:,}", f"{r.frozen:,}", f"{r.buffers:,}")
            return c + ((str(r.locked_norms),) if show_locked else ())

        total = ModuleCounts("total", "", self.total, self.trainable, self.frozen, self.buffers,
                             self.locked_norms)
        table = [head] + [cells(r) for r in self.rows] + [cells(total)]
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        lines = []
        for k, r in enumerate(table):
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip())
            if k == 0 or k == len(table) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return f"{self.model}\n" + "\n".join(lines)


def summary(model: nn.Module) -> ModelSummary:
    """Total / trainable / frozen parameter elements (and buffers) per top-level module."""
    children = dict(model.named_children())
    rows: dict[str, ModuleCounts] = {n: ModuleCounts(n, type(m).__name__) for n, m in children.items()}
    root = ModuleCounts("(root)", type(model).__name__)

    def row(module: str) -> ModuleCounts:
        """The row of the top-level module that holds module path ``module``."""
        return rows.get(module.split(".", 1)[0], root) if module else root

    for name, p in model.named_parameters():
        r = row(module_path(name))
        r.params += p.numel()
        if p.requires_grad:
            r.trainable += p.numel()
        else:
            r.frozen += p.numel()
    for name, b in model.named_buffers():
        row(module_path(name)).buffers += b.numel()
    for name, m in model.named_modules():
        if is_eval_locked(m):
            row(name).locked_norms += 1
    out = ModelSummary(type(model).__name__)
    out.rows = ([root] if (root.params or root.buffers) else []) + list(rows.values())
    for r in out.rows:
        out.total += r.params
        out.trainable += r.trainable
        out.frozen += r.frozen
        out.buffers += r.buffers
        out.locked_norms += r.locked_norms
    return out


# ------------------------------------------------------------------------------- surgery
def _names_hint(model: nn.Module, path: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    cands = closest(path, names)
    if cands:
        return "closest existing paths: " + ", ".join(cands)
    return "existing paths: " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def _child_key(parent: nn.Module, seg: str) -> str | None:
    """The key in ``parent._modules`` that ``seg`` names: a name, or an index (negative too)
    into a Sequential / ModuleList."""
    if seg in parent._modules and parent._modules[seg] is not None:
        return seg
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and seg.lstrip("-").isdigit():
        keys = list(parent._modules)
        i = int(seg)
        if -len(keys) <= i < len(keys):
            return keys[i]
    return None


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, key in parent._modules, module) for a dotted path; SurgeryError if absent."""
    if not path:
        raise SurgeryError("the empty path names the model itself; name a submodule")
    parent = model
    segs = path.split(".")
    for k, seg in enumerate(segs):
        key = _child_key(parent, seg)
        if key is None:
            done = ".".join(segs[:k])
            where = f" (under {done!r})" if done else ""
            raise SurgeryError(f"no module at {path!r} in {type(model).__name__}: "
                               f"{seg!r} not found{where}", hint=_names_hint(model, path))
        if k == len(segs) - 1:
            return parent, key, parent._modules[key]
        parent = parent._modules[key]
    raise AssertionError("unreachable")


def _get(model: nn.Module, path: str) -> nn.Module:
    return model if not path else _resolve(model, path)[2]


def _numbered(container: nn.Module) -> bool:
    return all(k.isdigit() for k in container._modules)


def _delete(parent: nn.Module, key: str) -> None:
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and _numbered(parent):
        del parent[list(parent._modules).index(key)]   # PyTorch renumbers what follows
    else:
        delattr(parent, key)


def remove(model: nn.Module, path: str) -> nn.Module:
    """Delete the module at ``path`` and return it. In a numbered Sequential / ModuleList the
    following entries are renumbered (as ``del seq[i]`` does); an attribute submodule is
    deleted, so a ``forward`` that uses it fails; use :func:`replace` with ``nn.Identity()``
    to keep it callable."""
    parent, key, module = _resolve(model, path)
    _delete(parent, key)
    return module


def replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` (same name, same position) and return the module it replaces."""
    if not isinstance(new, nn.Module):
        raise SurgeryError(f"replacement for {path!r} must be an nn.Module, not {type(new).__name__}")
    parent, key, old = _resolve(model, path)
    setattr(parent, key, new)
    return old


def truncate(model: nn.Module, path: str, keep: int) -> list[nn.Module]:
    """Keep the first entries of the Sequential / ModuleList at ``path`` as ``container[:keep]``
    would (``keep=-2`` drops the last two) and return the removed modules."""
    container = _get(model, path)
    if not isinstance(container, (nn.Sequential, nn.ModuleList)):
        raise SurgeryError(f"{path or '<model>'!r} is a {type(container).__name__}; truncate needs a "
                           "Sequential or ModuleList")
    n = len(container)
    new_len = keep if keep >= 0 else n + keep
    if not 0 <= new_len <= n:
        raise SurgeryError(f"keep={keep} is out of range for {path or '<model>'!r} with {n} entries")
    keys = list(container._modules)
    removed = [container._modules[k] for k in keys[new_len:]]
    for k in reversed(keys[new_len:]):
        _delete(container, k)
    return removed
