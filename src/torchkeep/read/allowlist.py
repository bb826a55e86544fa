"""The allowlist: every global the restricted unpickler resolves, and what each one builds.

Each allowlisted callable is a :class:`Builder` that checks its arguments and builds only data
(tensor references, containers, dtypes, numpy arrays of plain dtypes, numpy RNG states). None
returns a callable, a module attribute or anything the file chooses by name: lookup helpers of
torch and numpy (``torch.serialization._get_layout``, numpy's bit-generator constructors) are
replaced by fixed tables. Classes the pickle only names as values (``torch.Tensor`` as the type
to rebuild as) are :class:`TypeMarker` data. ``tests/test_safety.py`` calls every entry with
hostile arguments to hold this.
"""
from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from torchkeep import limits as _limits
from torchkeep.read.formats.base import TensorRef, ref_of
from torchkeep.read.pickles import PickleError
from torchkeep.read.placeholders import Opaque, StorageRef, StorageType, _placeholder

class Builder:
    """An allowlisted callable: checks its arguments and builds data, nothing else.

    The pickle machine calls only Builders and placeholder classes, so a file cannot reach any
    other function through an allowlisted name (e.g. a lookup helper returning ``torch.save``)."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
        self.qualname, self.fn = qualname, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<allowlisted {self.qualname}>"


@dataclass(frozen=True)
class TypeMarker:
    """A class the pickle names only as a value (``torch.Tensor`` as the type to rebuild as,
    ``numpy.ndarray`` as the subtype): data, not callable."""

    qualname: str


_TENSOR = TypeMarker("torch.Tensor")
_PARAMETER = TypeMarker("torch.nn.parameter.Parameter")
_NDARRAY = TypeMarker("numpy.ndarray")
_MAX_DIMS = 64
_INT_ONLY = {int}
_TEXT_CODECS = frozenset({"latin1", "latin-1", "utf-8", "utf8", "ascii"})
_MATERIAL = (list, tuple, dict, set, frozenset, str, bytes, bytearray)


def _arg_error(what: str) -> PickleError:
    return PickleError(f"allowlisted call with unexpected arguments: {what}")


def _ints(seq: Any, what: str) -> tuple[int, ...]:
    """A short tuple of ints (a size or stride) from the file, checked."""
    if not isinstance(seq, (tuple, list)) or len(seq) > _MAX_DIMS or \
            not set(map(type, seq)) <= _INT_ONLY:
        raise _arg_error(f"{what} must be at most {_MAX_DIMS} ints, got {type(seq).__name__}")
    return tuple(seq)


def _material(x: Any, what: str) -> Any:
    """An argument that constructors iterate: only containers the pickle already built (a
    ``range`` or other lazy iterable could expand to any size)."""
    if not isinstance(x, _MATERIAL):
        raise _arg_error(f"{what} takes a built container, got {type(x).__name__}")
    return x


def _small_count(n: Any, what: str) -> int:
    lim = _limits.current().container
    if type(n) is not int or not 0 <= n <= lim:
        raise _arg_error(f"{what}({n!r}): a size must be an int in [0, {lim:,}]")
    return n


def _scalar(x: Any, what: str) -> Any:
    if x is not None and type(x) not in (int, float, bool, str, bytes, complex):
        raise _arg_error(f"{what} takes a number or text, got {type(x).__name__}")
    return x


def _tensor_ref(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                dtype: torch.dtype | None = None) -> Any:
    if not isinstance(storage, StorageRef):
        return _placeholder("torch._utils", "_rebuild_tensor")(storage, storage_offset, size, stride)
    if type(storage_offset) is not int or storage_offset < 0:
        raise _arg_error(f"storage offset {storage_offset!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise _arg_error(f"dtype {dtype!r}")
    return TensorRef(shape=_ints(size, "size"), dtype=dtype or storage.dtype, reader=storage.reader,
                     key=storage.key, storage=storage.key, offset=storage_offset + storage.offset,
                     stride=_ints(stride, "stride"), requires_grad=bool(requires_grad),
                     location=storage.location)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_ref(storage, storage_offset, size, stride, False)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _tensor_ref(storage, storage_offset, size, stride, requires_grad)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    return _tensor_ref(storage, storage_offset, size, stride, requires_grad, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if isinstance(data, TensorRef):
        data.is_parameter = True
        data.requires_grad = bool(requires_grad)
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # ``func`` comes from the file: only the tensor rebuild Builders may be called here.
    if not (isinstance(func, Builder) and func.qualname in _TENSOR_BUILDERS) and \
            not (isinstance(func, type) and issubclass(func, Opaque)):
        raise _arg_error(f"_rebuild_from_type_v2 with function {func!r}")
    if type(args) is not tuple:
        raise _arg_error("_rebuild_from_type_v2 arguments must be a tuple")
    obj = func(*args)
    if type(obj).__name__ == "WrapperShell":  # a torchao tensor: see _rebuild_wrapper_subclass
        from torchkeep.read.formats.quantized import torchao_ref

        ref = torchao_ref(obj, state)
        if ref is not None:
            return ref
        obj = _placeholder("torch._utils", "_rebuild_wrapper_subclass")(obj)
    if isinstance(new_type, type) and issubclass(new_type, Opaque):
        wrapped = new_type(obj)
        wrapped.__setstate__(state)
        return wrapped
    return obj


def _rebuild_from_type(func, new_type, args, dict_):
    return _rebuild_from_type_v2(func, new_type, args, dict_)


def _rebuild_meta_tensor_no_storage(dtype, size, stride, requires_grad):
    if not isinstance(dtype, torch.dtype):
        raise _arg_error(f"dtype {dtype!r}")
    t = torch.empty_strided(_ints(size, "size"), _ints(stride, "stride"), dtype=dtype, device="meta")
    return ref_of(t)


def _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad):
    import numpy as np

    if not isinstance(data, np.ndarray) or data.dtype.hasobject or not isinstance(dtype, torch.dtype):
        return _placeholder("torch._utils", "_rebuild_device_tensor_from_numpy")(data, dtype, device)
    return ref_of(torch.from_numpy(data.copy()).to(dtype))


def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, requires_grad=False,
                     backward_hooks=None):
    """torch.ao quantized tensors as data (issue 15): the integer storage and its qparams."""
    from torchkeep.read.formats.quantized import qtensor_ref

    ref = _tensor_ref(storage, storage_offset, size, stride, requires_grad)
    out = qtensor_ref(ref, quantizer_params, requires_grad) if isinstance(ref, TensorRef) else None
    if out is None:
        return _placeholder("torch._utils", "_rebuild_qtensor")(storage, storage_offset, size, stride,
                                                                quantizer_params)
    return out


def _rebuild_wrapper_subclass(cls, dtype, size, stride, storage_offset, layout, device,
                              requires_grad):
    """A torchao tensor subclass's shell (issue 15); its inner tensors come with its state."""
    from torchkeep.read.formats.quantized import WrapperShell

    name = getattr(cls, "global_name", None)
    if name is None or not isinstance(dtype, torch.dtype) or type(storage_offset) is not int:
        return _placeholder("torch._utils", "_rebuild_wrapper_subclass")(cls, dtype, size)
    return WrapperShell(name, dtype, _ints(size, "size"),
                        _ints(stride, "stride") if stride is not None else None,
                        storage_offset, bool(requires_grad))


def _reconstructor(cls, base, state):
    """copyreg._reconstructor: only placeholder classes (user classes pickled by protocol 0/1)."""
    if isinstance(cls, type) and issubclass(cls, Opaque):
        return cls(base, state) if state is not None else cls()
    raise _arg_error(f"copyreg._reconstructor of {cls!r}")


def _newobj(cls, *args):
    if isinstance(cls, type) and issubclass(cls, Opaque) or isinstance(cls, Builder):
        return cls(*args)
    raise _arg_error(f"copyreg.__newobj__ of {cls!r}")


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # How protocol 2 pickles bytes: ``_codecs.encode(text, 'latin1')``; no codec lookup by name.
    if type(obj) is not str or encoding not in _TEXT_CODECS or errors != "strict":
        raise _arg_error(f"_codecs.encode(..., {encoding!r})")
    return obj.encode(encoding)


def _bytes_like(kind: type) -> Callable[..., Any]:
    def make(source: Any = b"", encoding: Any = None, errors: Any = "strict") -> Any:
        if type(source) is int:
            return kind(_small_count(source, kind.__name__))
        if type(source) is str:
            if encoding not in _TEXT_CODECS or errors != "strict":
                raise _arg_error(f"{kind.__name__}(text, {encoding!r})")
            return kind(source, encoding)
        return kind(_material(source, kind.__name__))
    return make


def _collection(kind: type) -> Callable[..., Any]:
    def make(*args: Any, **kwargs: Any) -> Any:
        if len(args) > 1:
            raise _arg_error(f"{kind.__name__} with {len(args)} arguments")
        for v in kwargs.values():
            _scalar(v, kind.__name__) if not isinstance(v, _MATERIAL) else None
        return kind(*(_material(a, kind.__name__) for a in args), **kwargs)
    return make


def _scalar_type(kind: type) -> Callable[..., Any]:
    def make(*args: Any) -> Any:
        if len(args) > 2:
            raise _arg_error(f"{kind.__name__} with {len(args)} arguments")
        return kind(*(_scalar(a, kind.__name__) for a in args))
    return make


def _str(*args: Any) -> str:
    if len(args) == 2 and type(args[0]) is bytes and args[1] in _TEXT_CODECS:
        return str(args[0], args[1])
    if len(args) > 1:
        raise _arg_error(f"str with {len(args)} arguments")
    return str(_scalar(args[0], "str")) if args else ""


def _range(*args: Any) -> range:
    if not 1 <= len(args) <= 3 or not all(type(a) is int for a in args):
        raise _arg_error("range takes 1 to 3 ints")
    return range(*args)


def _slice(*args: Any) -> slice:
    if not 1 <= len(args) <= 3:
        raise _arg_error("slice takes 1 to 3 arguments")
    return slice(*(_scalar(a, "slice") for a in args))


def _object(*args: Any) -> object:
    if args:
        raise _arg_error("object() takes no arguments")
    return object()


def _size(seq: Any = ()) -> torch.Size:
    return torch.Size(_ints(seq, "torch.Size"))


def _device(kind: Any, index: Any = None) -> torch.device:
    if not (type(kind) is str and len(kind) <= 64 or type(kind) is int) or \
            not (index is None or type(index) is int):
        raise _arg_error(f"torch.device({kind!r}, {index!r})")
    return torch.device(kind) if index is None else torch.device(kind, index)


_LAYOUTS = {str(v): v for v in (getattr(torch, n, None) for n in (
    "strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn",
    "jagged")) if isinstance(v, torch.layout)}


def _get_layout(name: Any) -> torch.layout:
    """torch.serialization._get_layout as a fixed table (torch's own resolves any attribute)."""
    if type(name) is not str or name not in _LAYOUTS:
        raise _arg_error(f"unknown layout {name!r}")
    return _LAYOUTS[name]


def _storage_types() -> dict[str, StorageType]:
    out = {}
    for name in dir(torch):
        if name.endswith("Storage") and name not in ("Storage", "TypedStorage", "UntypedStorage"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dtype = getattr(torch, name).dtype
            except Exception:  # pragma: no cover - exotic storage classes
                continue
            if isinstance(dtype, torch.dtype):
                out[f"torch.{name}"] = StorageType(dtype)
    out["torch.UntypedStorage"] = StorageType(torch.uint8, untyped=True)
    out["torch.storage.UntypedStorage"] = StorageType(torch.uint8, untyped=True)
    out["torch.storage._LegacyStorage"] = StorageType(torch.uint8, untyped=True)
    return out


_TENSOR_BUILDERS = frozenset({
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state", "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_device_tensor_from_numpy", "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_wrapper_subclass",
})


def _build_allowed() -> dict[str, Any]:
    """Name -> Builder (callables) or plain value (dtypes, layouts, storage types, markers)."""
    fns: dict[str, Callable[..., Any]] = {
        "collections.OrderedDict": _collection(collections.OrderedDict),
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
        "torch._utils._rebuild_device_tensor_from_numpy": _rebuild_device_tensor_from_numpy,
        "torch._utils._rebuild_qtensor": _rebuild_qtensor,
        "torch._utils._rebuild_wrapper_subclass": _rebuild_wrapper_subclass,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch._tensor._rebuild_from_type": _rebuild_from_type,
        "torch.Size": _size,
        "torch.device": _device,
        "torch.serialization._get_layout": _get_layout,
        "copyreg._reconstructor": _reconstructor,
        "copy_reg._reconstructor": _reconstructor,
        "copyreg.__newobj__": _newobj,
        "_codecs.encode": _codecs_encode,
        "builtins.complex": _scalar_type(complex),
        "builtins.int": _scalar_type(int),
        "builtins.float": _scalar_type(float),
        "builtins.bool": _scalar_type(bool),
        "builtins.str": _str,
        "builtins.slice": _slice,
        "builtins.range": _range,
        "builtins.object": _object,
        "builtins.bytes": _bytes_like(bytes),
        "builtins.bytearray": _bytes_like(bytearray),
        **{f"builtins.{t.__name__}": _collection(t) for t in (set, frozenset, dict, list, tuple)},
    }
    allowed: dict[str, Any] = {name: Builder(name, fn) for name, fn in fns.items()}
    allowed["collections.defaultdict"] = _placeholder("collections", "defaultdict")
    allowed["torch.Tensor"] = _TENSOR
    allowed["torch.nn.parameter.Parameter"] = _PARAMETER
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            allowed[f"torch.{name}"] = obj
    allowed.update(_storage_types())
    allowed.update(_numpy_allowed())
    return allowed


def _numpy_allowed() -> dict[str, Any]:
    """numpy arrays of plain dtypes, scalars and random generator states, as data."""
    try:
        import numpy as np
        import numpy.random as npr
    except ImportError:  # pragma: no cover - numpy is optional
        return {}
    bitgens = {"MT19937": npr.MT19937, "PCG64": npr.PCG64, "PCG64DXSM": npr.PCG64DXSM,
               "Philox": npr.Philox, "SFC64": npr.SFC64}

    def reconstruct(subtype, shape, dtype):
        # numpy pickles arrays as _reconstruct(ndarray, (0,), b'b') + BUILD(state).
        if subtype is not _NDARRAY:
            return _placeholder("numpy", "ndarray subclass")(shape, dtype)
        shape = _ints(shape, "shape")
        if any(s < 0 for s in shape) or np.prod(shape, dtype=np.int64) > 16 or \
                type(dtype) not in (bytes, str) or len(dtype) > 8:
            raise _arg_error(f"numpy _reconstruct({shape}, {dtype!r})")
        return np.ndarray.__new__(np.ndarray, shape, np.dtype(dtype))

    def scalar(dtype, data=None):
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            return _placeholder("numpy.core.multiarray", "scalar")(dtype, data)
        if data is None:
            return dtype.type()
        if type(data) is not bytes or len(data) != dtype.itemsize:
            raise _arg_error("numpy scalar data does not match its dtype")
        return np.frombuffer(data, dtype=dtype, count=1)[0]

    def dtype_(obj, align=False, copy=False):
        if type(obj) is not str or len(obj) > 16:
            raise _arg_error(f"numpy.dtype({obj!r})")
        return np.dtype(obj, align=bool(align), copy=bool(copy))

    classes = {f"numpy.random._{n.lower().replace('dxsm', '')}.{n}": n for n in bitgens}

    def bitgen(name="MT19937"):
        if isinstance(name, TypeMarker):  # newer numpy passes the class (marked in the table)
            name = classes.get(name.qualname)
        if type(name) is not str or name not in bitgens:
            raise _arg_error(f"unknown numpy bit generator {name!r}")
        return bitgens[name]()

    def from_name(make):
        def ctor(bit_generator_name="MT19937", bit_generator_ctor=None):
            # numpy's own helper calls whatever ``bit_generator_ctor`` the file passes; here the
            # generator is only ever looked up in the fixed table above.
            if isinstance(bit_generator_name, npr.BitGenerator):
                return make(bit_generator_name)
            return make(bitgen(bit_generator_name))
        return ctor

    out: dict[str, Any] = {}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{core}._reconstruct"] = Builder(f"{core}._reconstruct", reconstruct)
        out[f"{core}.scalar"] = Builder(f"{core}.scalar", scalar)
    out["numpy.ndarray"] = _NDARRAY
    out["numpy.dtype"] = Builder("numpy.dtype", dtype_)
    for name in dir(getattr(np, "dtypes", None) or ()):
        if name.endswith("DType"):
            out[f"numpy.dtypes.{name}"] = TypeMarker(f"numpy.dtypes.{name}")
    for qualname in classes:
        out[qualname] = TypeMarker(qualname)
    p = "numpy.random._pickle."
    out[p + "__bit_generator_ctor"] = Builder(p + "__bit_generator_ctor", bitgen)
    out[p + "__generator_ctor"] = Builder(p + "__generator_ctor", from_name(npr.Generator))
    out[p + "__randomstate_ctor"] = Builder(p + "__randomstate_ctor", from_name(npr.RandomState))
    return out


def _settable_types() -> tuple[type, ...]:
    """Types whose own ``__setstate__`` reads plain data (BUILD on them is allowed)."""
    try:
        import numpy as np
        import numpy.random as npr
    except ImportError:  # pragma: no cover
        return ()
    return (np.ndarray, np.dtype, npr.BitGenerator, npr.RandomState, npr.Generator)


# Globals that are part of torch's own serialization but that the lazy reader does not rebuild
# (sparse, quantized, nested and wrapper-subclass tensors): safe to import, left as placeholders.
SAFE_UNSUPPORTED = frozenset({
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_nested_tensor", "torch._utils._rebuild_wrapper_subclass",
    "torch._utils._rebuild_xla_tensor", "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch.per_tensor_affine", "torch.per_channel_affine", "torch.per_tensor_symmetric",
    "torch.per_channel_symmetric", "torch.per_channel_affine_float_qparams",
})

# Classes that only hold data (constructing them and setting their state runs nothing of
# consequence): DCP's metadata records, paths, torchkeep's own frozen-BatchNorm marker. The reader
# still leaves them as placeholders and reads their fields as data; scan calls them safe.
SAFE_DATA = frozenset({
    *(f"torch.distributed.checkpoint.metadata.{n}" for n in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath", "pathlib.PureWindowsPath",
    "torchkeep.shape.EvalLock",
    # What other projects' own loaders accept as data (read here as placeholders, never imported):
    "argparse.Namespace",             # timm's train.py saves its parsed arguments as 'args'
    "torch.torch_version.TorchVersion",  # a str subclass; in torch.load's weights_only allowlist
})

ALLOWED: dict[str, Any] = _build_allowed()


SETTABLE = _settable_types()



__all__ = ["ALLOWED", "SAFE_UNSUPPORTED", "SAFE_DATA", "SETTABLE", "Builder", "TypeMarker"]
