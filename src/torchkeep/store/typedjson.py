"""Typed JSON for training state: every value comes back with its Python type, tensors go to a
side table (written as safetensors, never into the JSON), and nothing is pickled unless asked.

A plain JSON value stands for itself (str, bool, int, finite float, list, dict with str keys).
Everything else is an object with the tag key ``"__t"``: tuples, dicts with other keys, non-finite
floats, dtypes, devices, bytes, sets, numpy values, generators, tensors (a reference into the
side table) and, only with ``allow_pickle=True``, pickled objects. An object that cannot be
stored this way raises :class:`~torchkeep.errors.StateError` naming its path in the state, e.g.
``scheduler.lr_lambdas[0]``.
"""
from __future__ import annotations

import base64
import collections
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from torchkeep.errors import StateError

TAG = "__t"

_DTYPES: dict[str, torch.dtype] = {
    str(d).replace("torch.", ""): d for d in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
        torch.uint16, torch.uint32, torch.uint64,
        torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    d = _DTYPES.get(name) or getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise StateError(f"unknown dtype {name!r}")
    return d


def child(path: str, key: Any) -> str:
    """The display path of ``key`` inside ``path``: ``a.b`` for string keys, ``a[0]`` otherwise."""
    if isinstance(key, str):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


@dataclass
class Encoded:
    """The JSON-able tree and the tensors it refers to, by key."""

    tree: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class PickledValue:
    """A value stored with pickle (``allow_pickle=True``), kept as bytes until asked for."""

    def __init__(self, data: bytes, type_name: str) -> None:
        self.data = data
        self.type_name = type_name

    def load(self) -> Any:
        return pickle.loads(self.data)  # noqa: S301 - only reached with allow_pickle=True

    def __repr__(self) -> str:
        return f"<pickled {self.type_name} ({len(self.data)} bytes)>"


def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


class _Encoder:
    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.tensors: dict[str, torch.Tensor] = {}

    def tensor_key(self, path: str) -> str:
        key, n = path or "tensor", 1
        while key in self.tensors:
            n += 1
            key = f"{path}#{n}"
        return key

    def add_tensor(self, t: torch.Tensor, path: str) -> str:
        if t.layout != torch.strided or t.is_quantized or t.is_meta:
            raise StateError(f"cannot store a {t.layout} tensor{' (quantized)' if t.is_quantized else ''}"
                             f"{' on the meta device' if t.is_meta else ''}", entry=path,
                             hint="convert it to a dense tensor (t.to_dense()) before saving")
        if t.dtype not in _DTYPES.values():
            raise StateError(f"cannot store a tensor of dtype {t.dtype}", entry=path)
        key = self.tensor_key(path)
        self.tensors[key] = t.detach()
        return key

    def encode(self, obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if type(obj) is int:
            return obj
        if type(obj) is float:
            if math.isfinite(obj):
                return obj
            return {TAG: "float", "v": repr(obj)}
        if isinstance(obj, torch.Tensor):
            out = {TAG: "tensor", "key": self.add_tensor(obj, path)}
            if isinstance(obj, torch.nn.Parameter):
                out["param"] = True
                out["requires_grad"] = obj.requires_grad
            return out
        np = _numpy()
        if np is not None:
            if isinstance(obj, np.ndarray):
                if obj.dtype == object:
                    return self.fallback(obj, path, "a numpy array of Python objects")
                return {TAG: "ndarray", "key": self.add_tensor(torch.from_numpy(obj.copy()), path)}
            if isinstance(obj, np.generic):
                if isinstance(obj, (np.bool_, np.integer, np.floating)):
                    return {TAG: "np", "dtype": obj.dtype.name, "v": self.encode(obj.item(), path)}
                return self.fallback(obj, path, f"a numpy {obj.dtype} scalar")
            if isinstance(obj, np.random.Generator):
                return {TAG: "np.Generator", "bit_generator": type(obj.bit_generator).__name__,
                        "state": self.encode(obj.bit_generator.state, child(path, "state"))}
        if isinstance(obj, bool):  # bool subclasses (np.bool_ handled above)
            return bool(obj)
        if isinstance(obj, int):  # int subclasses other than bool (IntEnum would land here)
            if type(obj).__module__ == "builtins":
                return int(obj)
            return self.fallback(obj, path, f"an instance of {_type_name(obj)}")
        if isinstance(obj, float):
            return self.fallback(obj, path, f"an instance of {_type_name(obj)}")
        if isinstance(obj, torch.dtype):
            return {TAG: "dtype", "v": dtype_name(obj)}
        if isinstance(obj, torch.device):
            return {TAG: "device", "v": str(obj)}
        if isinstance(obj, torch.Size):
            return {TAG: "size", "v": list(obj)}
        if isinstance(obj, torch.Generator):
            return {TAG: "generator", "device": str(obj.device),
                    "state": {TAG: "tensor", "key": self.add_tensor(obj.get_state(), child(path, "state"))}}
        if isinstance(obj, (bytes, bytearray)):
            return {TAG: "bytes" if isinstance(obj, bytes) else "bytearray",
                    "v": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, complex):
            return {TAG: "complex", "v": [self.encode(obj.real, path), self.encode(obj.imag, path)]}
        if type(obj) is tuple:
            return {TAG: "tuple", "v": [self.encode(v, child(path, i)) for i, v in enumerate(obj)]}
        if type(obj) is list:
            return [self.encode(v, child(path, i)) for i, v in enumerate(obj)]
        if type(obj) in (set, frozenset):
            items = sorted(obj, key=repr)
            return {TAG: type(obj).__name__, "v": [self.encode(v, child(path, i)) for i, v in enumerate(items)]}
        if type(obj) in (dict, collections.OrderedDict):  # both come back as dict (ordered)
            keys = list(obj.keys())
            if all(type(k) is str for k in keys) and TAG not in obj:
                return {k: self.encode(obj[k], child(path, k)) for k in keys}
            items = [[self.encode(k, child(path, f"<key {k!r}>")), self.encode(v, child(path, k))]
                     for k, v in obj.items()]
            return {TAG: "dict", "v": items}
        what = "a function" if callable(obj) and not isinstance(obj, type) else f"an instance of {_type_name(obj)}"
        return self.fallback(obj, path, what)

    def fallback(self, obj: Any, path: str, what: str) -> Any:
        if not self.allow_pickle:
            raise StateError(f"cannot store {what} as typed JSON", entry=path or "<root>",
                             hint="store plain numbers, strings, lists, dicts and tensors, "
                                  "or pass trust=True to TrainState to pickle it")
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # pickle raises many types (PicklingError, AttributeError, TypeError)
            raise StateError(f"cannot pickle {what}: {e}", entry=path or "<root>",
                             hint="pickle stores functions by name only: define it with `def` at "
                                  "module level (not a lambda or a local function)") from e
        return {TAG: "pickle", "type": _type_name(obj), "v": base64.b64encode(data).decode("ascii")}


def encode(obj: Any, *, allow_pickle: bool = False, path: str = "") -> Encoded:
    """``obj`` as a JSON-able tree plus the tensors it refers to (not copied)."""
    enc = _Encoder(allow_pickle)
    tree = enc.encode(obj, path)
    return Encoded(tree, enc.tensors)


def decode(tree: Any, tensor: Callable[[str, Mapping[str, Any]], Any], *,
           pickled: Callable[[PickledValue, str], Any] | None = None, path: str = "") -> Any:
    """Rebuild the object of :func:`encode`.

    ``tensor(key, tag)`` returns what stands for the tensor ``key`` (a tensor, or a lazy
    reference when only listing). ``pickled(value, path)`` decides what to do with a pickled
    value; by default it raises StateError, so a checkpoint never runs code unless the caller
    opted in.
    """
    def unpickle_refused(value: PickledValue, p: str) -> Any:
        raise StateError(f"holds a pickled {value.type_name}", entry=p or "<root>",
                         hint="pass trust=True to unpickle it (runs code from the checkpoint)")

    return _decode(tree, tensor, pickled or unpickle_refused, path)


def _decode(obj: Any, tensor, pickled, path: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensor, pickled, child(path, i)) for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    tag = obj.get(TAG)
    if tag is None:
        return {k: _decode(v, tensor, pickled, child(path, k)) for k, v in obj.items()}
    if tag == "tensor":
        t = tensor(obj["key"], obj)
        if obj.get("param") and isinstance(t, torch.Tensor):
            t = torch.nn.Parameter(t, requires_grad=obj.get("requires_grad", True))
        return t
    if tag == "float":
        return float(obj["v"])
    if tag == "tuple":
        return tuple(_decode(v, tensor, pickled, child(path, i)) for i, v in enumerate(obj["v"]))
    if tag == "dict":
        return {_decode(k, tensor, pickled, path): _decode(v, tensor, pickled, path) for k, v in obj["v"]}
    if tag == "dtype":
        return dtype_from_name(obj["v"])
    if tag == "device":
        return torch.device(obj["v"])
    if tag == "size":
        return torch.Size(obj["v"])
    if tag in ("bytes", "bytearray"):
        data = base64.b64decode(obj["v"])
        return data if tag == "bytes" else bytearray(data)
    if tag == "complex":
        return complex(*(_decode(v, tensor, pickled, path) for v in obj["v"]))
    if tag in ("set", "frozenset"):
        items = [_decode(v, tensor, pickled, child(path, i)) for i, v in enumerate(obj["v"])]
        return set(items) if tag == "set" else frozenset(items)
    if tag == "ndarray":
        t = tensor(obj["key"], obj)
        return t.numpy() if isinstance(t, torch.Tensor) else t
    if tag == "np":
        np = _numpy_required(path)
        return np.dtype(obj["dtype"]).type(_decode(obj["v"], tensor, pickled, path))
    if tag == "np.Generator":
        np = _numpy_required(path)
        bitgen = getattr(np.random, obj["bit_generator"])()
        bitgen.state = _decode(obj["state"], tensor, pickled, child(path, "state"))
        return np.random.Generator(bitgen)
    if tag == "generator":
        state = _decode(obj["state"], tensor, pickled, child(path, "state"))
        if not isinstance(state, torch.Tensor):
            return {"generator": obj["device"], "state": state}
        g = torch.Generator(device=obj["device"]) if obj["device"] != "cpu" else torch.Generator()
        g.set_state(state)
        return g
    if tag == "pickle":
        return pickled(PickledValue(base64.b64decode(obj["v"]), obj.get("type", "?")), path)
    raise StateError(f"unknown type tag {tag!r}", entry=path or "<root>",
                     hint="written by a newer torchkeep?")


def _numpy():
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a dependency, kept optional here
        return None
    return numpy


def _numpy_required(path: str):
    np = _numpy()
    if np is None:  # pragma: no cover
        raise StateError("needs numpy to restore", entry=path)
    return np
