"""Pure functions on nested checkpoint objects: flatten to dotted names and back."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator


def _key(k: Any) -> str:
    return k if isinstance(k, str) else str(k)


def join(prefix: str, key: Any) -> str:
    k = _key(key)
    return f"{prefix}.{k}" if prefix else k


def walk(obj: Any, prefix: str = "", *, children: Callable[[Any], Any] | None = None,
         _active: set[int] | None = None, _empty_ok: bool = True) -> Iterator[tuple[str, Any]]:
    """Yield (dotted name, leaf) for every leaf of dicts, lists and tuples.

    Empty containers are leaves too (an empty optimizer state is worth seeing). ``children(obj)``
    may return a mapping of named children for objects that are not plain containers (the reader
    uses it to descend into placeholder modules), or None for a leaf. Self-referencing objects
    (possible in pickles) are yielded once as a leaf where the cycle closes.
    """
    active = set() if _active is None else _active
    if isinstance(obj, (Mapping, list, tuple)) or children is not None:
        if id(obj) in active:
            yield prefix, obj
            return
    if isinstance(obj, Mapping):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        kids = children(obj) if children is not None else None
        if kids is None:
            yield prefix, obj
            return
        active.add(id(obj))
        yield from walk(kids, prefix, children=children, _active=active, _empty_ok=False)
        active.discard(id(obj))
        return
    if not obj:
        if prefix and _empty_ok:
            yield prefix, obj
        return
    active.add(id(obj))
    for k, v in items:
        yield from walk(v, join(prefix, k), children=children, _active=active)
    active.discard(id(obj))


def map_leaves(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """A copy of ``obj`` with ``fn`` applied to each leaf, container types kept."""
    if isinstance(obj, Mapping):
        out = type(obj)() if type(obj) is not dict else {}
        try:
            for k, v in obj.items():
                out[k] = map_leaves(v, fn)
        except TypeError:  # exotic mapping types that cannot be rebuilt empty
            out = {k: map_leaves(v, fn) for k, v in obj.items()}
        return out
    if isinstance(obj, list):
        return [map_leaves(v, fn) for v in obj]
    if isinstance(obj, tuple):
        vals = [map_leaves(v, fn) for v in obj]
        return type(obj)(*vals) if hasattr(obj, "_fields") else tuple(vals)
    return fn(obj)


def get_path(obj: Any, path: str) -> Any:
    """The sub-object at dotted ``path``. Keys may themselves contain dots (state-dict keys);
    the longest key that matches wins. Int keys and list indices match their str."""
    if not path:
        return obj
    if isinstance(obj, Mapping):
        best = None
        for k in obj:
            ks = _key(k)
            if (path == ks or path.startswith(ks + ".")) and (best is None or len(ks) > len(_key(best))):
                best = k
        if best is None:
            raise KeyError(path)
        rest = path[len(_key(best)) + 1:]
        return get_path(obj[best], rest)
    if isinstance(obj, (list, tuple)):
        head, _, rest = path.partition(".")
        if head.isdigit() and int(head) < len(obj):
            return get_path(obj[int(head)], rest)
    raise KeyError(path)
