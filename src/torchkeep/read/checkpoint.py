"""``Checkpoint``: one lazy, read-only view over any checkpoint format.

Listing names, shapes and dtypes reads headers and pickles only; tensor bytes are read when
asked for, and only those asked for.
"""
from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from torchkeep.errors import FormatError, UnsafeCheckpointError, closest
from torchkeep.read import keys, tree
from torchkeep.read.formats import detect, reader_class
from torchkeep.read.formats.base import Reader, TensorRef, load_grouped
from torchkeep.read.unpickler import Opaque, module_children

log = logging.getLogger(__name__)

# Keys under which training scripts commonly keep the model weights, most preferred first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network",
                "model_state", "weights", "params", "ema", "model_ema", "state_dict_ema",
                "ema_state_dict")


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, described without reading its bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    storage: str | None = None
    is_parameter: bool = False
    location: str | None = None
    ref: TensorRef | None = field(default=None, repr=False, compare=False)
    scheme: str | None = None        # how a quantized tensor stores its values; None: plain

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Summary:
    """What a checkpoint is and where its model weights were found."""

    path: str
    format: str
    kind: str | None = None          # 'lightning', 'whole-model', 'training-state', ...
    wrapper: str | None = None       # where the state dict sits in the tree ('' = the root)
    prefixes: list[str] = field(default_factory=list)  # stripped from the state dict's keys
    candidates: dict[str, int] = field(default_factory=dict)  # wrapper -> tensors, all seen
    n_tensors: int = 0               # in the whole checkpoint
    n_elements: int = 0
    nbytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)   # dtype -> elements
    classes: list[str] = field(default_factory=list)       # globals left as placeholders
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict
        return asdict(self)

    def __str__(self) -> str:
        kind = f" ({self.kind})" if self.kind else ""
        lines = [f"{self.path}: {self.format}{kind}, {self.n_tensors:,} tensors, "
                 f"{self.n_elements:,} elements, {self.nbytes:,} bytes"]
        if self.wrapper is not None:
            where = repr(self.wrapper) if self.wrapper else "the top level"
            pre = f", prefixes stripped: {', '.join(self.prefixes)}" if self.prefixes else ""
            lines.append(f"  model weights: {where}{pre}")
        else:
            lines.append("  model weights: none found")
        if self.dtypes:
            lines.append("  dtypes: " + ", ".join(f"{k} {v:,}" for k, v in self.dtypes.items()))
        if self.classes:
            lines.append(f"  classes not imported: {', '.join(self.classes)}")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def _children(obj: Any) -> Any:
    return module_children(obj) if isinstance(obj, Opaque) else None


def _tensor_count(obj: Any) -> int:
    """Tensors directly in ``obj`` if it looks like a state dict (mostly tensors), else 0."""
    if isinstance(obj, Opaque):
        kids = module_children(obj)
        if kids is None:
            return 0
        return sum(1 for _, v in tree.walk(kids, children=_children) if isinstance(v, TensorRef))
    if not isinstance(obj, Mapping) or not obj:
        return 0
    n = 0
    for k, v in obj.items():
        if isinstance(v, TensorRef) or _packed(v):
            n += 1
        elif isinstance(v, (Mapping, list, tuple)) and not str(k).endswith("_extra_state"):
            return 0  # a container of containers (a checkpoint, an optimizer state), not weights
    return n if n * 2 >= len(obj) else 0


def _packed(v: Any) -> bool:
    """A tuple of tensors stored as one state-dict value (quantized packed params)."""
    return isinstance(v, tuple) and bool(v) and all(isinstance(x, TensorRef) or x is None for x in v) \
        and any(isinstance(x, TensorRef) for x in v)


def _priority(path: str) -> int:
    last = path.rpartition(".")[2]
    if path == "":
        return -1
    return WRAPPER_KEYS.index(last) if last in WRAPPER_KEYS else len(WRAPPER_KEYS)


class Checkpoint:
    """A checkpoint opened with :func:`open`. Cheap to create; reads lazily; never runs code
    from the file unless opened with ``trust=True``."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.path = reader.path
        self.format = reader.format
        self._tree: Any = None
        self._tree_read = False
        self._summary: Summary | None = None
        self._state: tuple[str | None, dict[str, Any], list[str], dict[str, int]] | None = None

    # -- structure ---------------------------------------------------------------------
    @property
    def tree(self) -> Any:
        """The stored object, nested containers with :class:`TensorRef` leaves; classes that were
        not imported appear as :class:`Opaque` placeholders."""
        if not self._tree_read:
            self._tree = self.reader.read_tree()
            self._tree_read = True
        return self._tree

    @property
    def metadata(self) -> dict[str, Any]:
        self.tree
        return self.reader.metadata

    def flat(self) -> dict[str, Any]:
        """Every leaf by dotted name: tensors as TensorRef, other values as stored."""
        return dict(tree.walk(self.tree, children=_children))

    def entries(self) -> list[Entry]:
        """Every tensor, by dotted name, without reading tensor bytes."""
        out = []
        for name, v in tree.walk(self.tree, children=_children):
            if isinstance(v, TensorRef):
                out.append(Entry(name, tuple(v.shape), v.dtype, v.nbytes, v.storage,
                                 v.is_parameter, v.location, v, getattr(v, "scheme", None) or None))
        return out

    def __iter__(self):
        return iter(self.entries())

    # -- tensors -----------------------------------------------------------------------
    def tensors(self, names: Iterable[str] | None = None, device: str | torch.device = "cpu", *,
                mmap: bool = False) -> dict[str, torch.Tensor]:
        """Tensors by entry name; with ``names``, only those are read. ``mmap=True``: see
        :meth:`state_dict`."""
        refs = {e.name: e.ref for e in self.entries()}
        if names is not None:
            names = list(names)
            missing = [n for n in names if n not in refs]
            if missing:
                hint = closest(missing[0], refs)
                raise FormatError(f"no tensor named {missing[0]!r}" +
                                  (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""),
                                  path=self.path, hint=f"did you mean {', '.join(hint)}?" if hint else
                                  "torchkeep inspect lists the names")
            refs = {n: refs[n] for n in names}
        return _load_refs(refs, device, mmap)

    def _find_state(self) -> tuple[str | None, dict[str, Any], list[str], dict[str, int]]:
        if self._state is not None:
            return self._state
        root = self.tree
        fixed = getattr(self.reader, "weights_at", None)  # formats that know where weights are
        if isinstance(fixed, tuple) and isinstance(root, Mapping):  # several parts: part.name
            flat = {n: v for p in fixed for n, v in tree.walk(root.get(p, {}), p, children=_children)}
            self._state = (",".join(fixed), flat, [], {p: _tensor_count(root.get(p)) for p in fixed})
            return self._state
        if fixed is not None and isinstance(root, Mapping) and isinstance(root.get(fixed), Mapping):
            flat = {tree.join("", k): v for k, v in root[fixed].items()}
            self._state = (fixed, flat, [], {fixed: _tensor_count(root[fixed])})
            return self._state
        cands: list[tuple[str, Any]] = [("", root)]
        if isinstance(root, Mapping):
            for k, v in root.items():
                p1 = tree.join("", k)
                cands.append((p1, v))
                if isinstance(v, Mapping) and not _tensor_count(v):
                    cands.extend((tree.join(p1, k2), v2) for k2, v2 in v.items())
        counts = {p: n for p, v in cands if (n := _tensor_count(v))}
        if not counts:
            self._state = (None, {}, [], {})
            return self._state
        best = max(counts, key=lambda p: (counts[p], -_priority(p)))
        obj = tree.get_path(root, best) if best else root
        if isinstance(obj, Opaque):
            flat = {n: v for n, v in tree.walk(module_children(obj), children=_children)}
        else:
            flat = {tree.join("", k): v for k, v in obj.items()}
        flat, prefixes = keys.unwrap(flat)
        if self._kind() == "lightning":
            head = keys.common_first_segment(flat)
            if head is not None:
                flat = {keys.strip_prefix(k, head): v for k, v in flat.items()}
                prefixes.append(head + ".")
        self._state = (best, flat, prefixes, counts)
        return self._state

    @property
    def wrapper(self) -> str | None:
        """Where the model weights sit in the tree ('' = the top level; None = not found)."""
        return self._find_state()[0]

    @property
    def order_known(self) -> bool:
        """Whether the weights' names come in the order the writer registered them (torch
        pickles, torchkeep folders): only then is their order evidence for structural matching."""
        return bool(getattr(self.reader, "keeps_order", False))

    @property
    def prefixes(self) -> list[str]:
        """Wrapper prefixes stripped from the weights' names (``module.``, ``_orig_mod.``, ...)."""
        return list(self._find_state()[2])

    def read(self, refs: Mapping[str, TensorRef], device: str | torch.device = "cpu", *,
             mmap: bool = False) -> dict[str, torch.Tensor]:
        """Read the given refs (from :meth:`state_refs` or :meth:`entries`) in one pass,
        keeping shared storages shared."""
        return _load_refs(refs, device, mmap)

    def state_items(self) -> dict[str, Any]:
        """Everything in the model-weights mapping by clean name: TensorRefs, and the few
        non-tensor values a state dict may hold (``_extra_state``), without reading bytes."""
        return dict(self._find_state()[1])

    def state_refs(self) -> dict[str, TensorRef]:
        """The model weights as lazy refs, under the names a bare model would use."""
        return {k: v for k, v in self._find_state()[1].items() if isinstance(v, TensorRef)}

    def state_dict(self, device: str | torch.device = "cpu", *, mmap: bool = False,
                   dequantize: bool = False) -> dict[str, Any]:
        """The model weights, found inside common wrappers, with wrapper prefixes stripped.

        Tensors are read onto ``device`` whatever device the writer had them on. With
        ``mmap=True`` CPU tensors map the file copy-on-write instead of copying it (fastest,
        like ``torch.load(mmap=True)``); the file must then not be truncated in place while
        they are alive (an atomic replacement is fine). Quantized tensors come back as the writer
        saved them (torch quantized tensors, torchao tensors), as float with ``dequantize=True``.
        """
        wrapper, flat, _, _ = self._find_state()
        if wrapper is None:
            raise FormatError("found no model weights (no mapping of names to tensors)",
                              path=self.path, hint="torchkeep inspect shows what the file holds")
        opaque = {k: v for k, v in flat.items() if isinstance(v, Opaque)}
        if opaque:
            if not self.reader.trust:
                globs = sorted({o.global_name for o in opaque.values()})
                raise UnsafeCheckpointError(
                    f"entries {', '.join(sorted(opaque)[:5])} need globals that are not allowlisted: "
                    f"{', '.join(globs)}", globals=globs, path=self.path)
            return self._trusted_state_dict(device)
        refs = {k: v for k, v in flat.items() if isinstance(v, TensorRef)}
        packed = {f"{k}\0{i}": x for k, v in flat.items() if _packed(v)
                  for i, x in enumerate(v) if isinstance(x, TensorRef)}
        loaded = _load_refs({**refs, **packed}, device, mmap)
        out = {}
        for k, v in flat.items():
            if k in loaded:
                out[k] = loaded[k]
            elif _packed(v):
                out[k] = tuple(loaded.get(f"{k}\0{i}", x) for i, x in enumerate(v))
            else:
                out[k] = v
        if dequantize:
            from torchkeep.read.formats.quantized import dequantize as deq
            out = {k: deq(v) for k, v in out.items()}
        return out

    def _trusted_state_dict(self, device) -> dict[str, Any]:
        wrapper, _, _, _ = self._find_state()
        obj = self.reader.trusted_load(device)
        obj = tree.get_path(obj, wrapper) if wrapper else obj
        sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else dict(obj)
        sd, _ = keys.unwrap(sd)
        return sd

    def load(self, device: str | torch.device = "cpu") -> Any:
        """The whole object with tensors read, like ``torch.load``. Placeholders for classes
        that were not imported raise UnsafeCheckpointError unless opened with trust=True."""
        opaque = [(n, v) for n, v in tree.walk(self.tree) if isinstance(v, Opaque)]
        if opaque:
            if self.reader.trust:
                return self.reader.trusted_load(device)
            globs = sorted({v.global_name for _, v in opaque})
            raise UnsafeCheckpointError(
                f"loading the whole object needs globals that are not allowlisted: {', '.join(globs)}",
                globals=globs, path=self.path, entry=opaque[0][0] or None)
        refs = {n: v for n, v in tree.walk(self.tree) if isinstance(v, TensorRef)}
        loaded = _load_refs(refs, device)
        by_id = {id(refs[n]): t for n, t in loaded.items()}
        return tree.map_leaves(self.tree, lambda v: by_id.get(id(v), v))

    # -- description -------------------------------------------------------------------
    def _kind(self) -> str | None:
        root = self.tree
        if isinstance(root, Mapping) and any(
                k in root for k in ("pytorch-lightning_version", "lightning_version")):
            return "lightning"
        if isinstance(root, Opaque) and module_children(root) is not None:
            return "whole-model"
        return getattr(self.reader, "kind", None)

    @property
    def summary(self) -> Summary:
        if self._summary is None:
            s = Summary(path=self.path, format=self.format, kind=self._kind())
            for e in self.entries():
                s.n_tensors += 1
                s.n_elements += e.numel
                s.nbytes += e.nbytes
                d = str(e.dtype).replace("torch.", "")
                s.dtypes[d] = s.dtypes.get(d, 0) + e.numel
            wrapper, _, prefixes, counts = self._find_state()
            s.wrapper, s.prefixes, s.candidates = wrapper, list(prefixes), dict(counts)
            s.classes = _placeholder_classes(self.tree)
            s.metadata = dict(self.reader.metadata)
            if len(counts) > 1 and wrapper is not None and wrapper in counts:
                others = ", ".join(f"{p or '<root>'} ({n})" for p, n in counts.items() if p != wrapper)
                s.notes.append(f"state dict taken from '{wrapper or '<root>'}' "
                               f"({counts[wrapper]} tensors); also seen: {others}")
            self._summary = s
        return self._summary

    def globals(self) -> list:
        """Globals the file's pickles import (see :func:`torchkeep.scan`)."""
        return self.reader.globals()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, format={self.format!r})"

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _placeholder_classes(obj: Any) -> list[str]:
    """Names of every class left as a placeholder anywhere in ``obj`` (cycles tolerated)."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, Mapping):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, Opaque):
            found.add(o.global_name)
            stack.extend([o.args, o.kwargs, o.state, o.items, o.dict_items])
    return sorted(found)


def _load_refs(refs: Mapping[str, TensorRef], device, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read refs grouped by reader, so each reader can keep shared storages shared."""
    return dict(zip(refs, load_grouped(list(refs.values()), device, mmap=mmap)))


def open(path: str | os.PathLike, *, format: str | None = None, trust: bool = False) -> Checkpoint:
    """Open a checkpoint of any supported format, detected from its content.

    Nothing in the file is executed unless ``trust=True``.
    """
    p = os.fspath(path)
    cls = reader_class(format) if format else detect(p)
    return Checkpoint(cls(p, trust=trust))


# `open` shadows the builtin inside this module's namespace on purpose (torchkeep.open);
# keep the builtin reachable for code here.
_builtin_open = builtins.open
