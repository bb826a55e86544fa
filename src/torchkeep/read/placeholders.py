"""Placeholders for what a pickle names but torchkeep never imports, and torch's storage ids.

:class:`Opaque` instances stand for objects of classes that were not imported: they keep the
constructor arguments and state the pickle gave, so the tensors inside a whole-model pickle can
still be listed. :class:`StorageType`/:class:`StorageRef` are what a storage class and a
persistent id mean to the readers (a dtype; a key whose bytes the reader fetches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from torchkeep.errors import CorruptCheckpointError


class Opaque:
    """An instance of a class that was not imported: what the pickle said about it.

    ``args`` are the constructor arguments, ``state`` the BUILD state (usually the object's
    ``__dict__``), ``items``/``dict_items`` what was appended or set on it.
    """

    global_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[], dict_items={})
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def pickle_extend(self, items: list) -> None:  # APPEND(S) in the pickle machine
        self.items.extend(items)

    def pickle_setitem(self, key: Any, value: Any) -> None:  # SETITEM(S) in the pickle machine
        self.dict_items[key] = value

    def __call__(self, *args: Any, **kwargs: Any) -> "Opaque":
        # A placeholder instance used as a callable (e.g. the result of a getattr gadget).
        return _placeholder("?", f"call of {self.global_name}")(*args, **kwargs)

    def __reduce__(self):  # pragma: no cover - placeholders must never be re-pickled as real
        raise TypeError(f"{self.global_name} was not imported and cannot be pickled again")

    def __repr__(self) -> str:
        return f"<{self.global_name} (not imported)>"


_PLACEHOLDERS: dict[str, type] = {}


def _placeholder(module: str, name: str) -> type:
    full = f"{module}.{name}"
    cls = _PLACEHOLDERS.get(full)
    if cls is None:
        cls = type(name.replace(".", "_") or "global", (Opaque,),
                   {"global_name": full, "__module__": "torchkeep.placeholders"})
        _PLACEHOLDERS[full] = cls
    return cls


def module_children(obj: Any) -> dict[str, Any] | None:
    """The parameters, persistent buffers and submodules of a placeholder ``nn.Module``
    (as stored in its pickled ``__dict__``), in registration order; None if not a module."""
    if not isinstance(obj, Opaque):
        return None
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]
    if not isinstance(state, dict) or "_parameters" not in state or "_modules" not in state:
        return None
    out: dict[str, Any] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for k, v in (state.get("_parameters") or {}).items():
        if v is not None:
            out[k] = v
    for k, v in (state.get("_buffers") or {}).items():
        if v is not None and k not in skip:
            out[k] = v
    for k, v in (state.get("_modules") or {}).items():
        if v is not None:
            out[k] = v
    return out



@dataclass(frozen=True)
class StorageType:
    """What a pickled storage class (torch.FloatStorage, torch.UntypedStorage) means: a dtype."""

    dtype: torch.dtype
    untyped: bool = False


@dataclass
class StorageRef:
    """A storage named by a persistent id; the reader resolves its bytes."""

    reader: Any
    key: str
    dtype: torch.dtype
    numel: int
    location: str
    offset: int = 0  # in elements of dtype, for legacy storage views


def storage_from_pid(pid: Any, reader: Any, storages: dict[str, StorageRef], *, path: str,
                     fields: int) -> tuple[str, StorageRef | None, tuple]:
    """Interpret a torch persistent id ``('storage', type, key, location, numel, ...)``.

    Returns (typename, the storage, for 'storage' ids, shared through ``storages`` by key, and
    the fields after numel). ``fields`` is how many fields a 'storage' id must have."""
    if not isinstance(pid, tuple) or not pid:
        raise CorruptCheckpointError(f"malformed persistent id {pid!r}", path=path)
    typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage":
        return typename, None, pid[1:]
    if len(pid) < fields:
        raise CorruptCheckpointError(f"persistent id {pid!r} has {len(pid)} fields, expected {fields}",
                                     path=path)
    storage_type, key, location, numel = pid[1:5]
    if not isinstance(storage_type, StorageType):
        raise CorruptCheckpointError(f"storage {key!r} has unknown type {storage_type!r}", path=path)
    key = str(key)
    ref = storages.get(key)
    if ref is None:
        ref = StorageRef(reader, key, storage_type.dtype, int(numel), str(location))
        storages[key] = ref
    return typename, ref, pid[5:]



__all__ = ["Opaque", "module_children", "StorageType", "StorageRef", "storage_from_pid"]
