"""Reading pickles without running them: the allowlist, the classification of globals and the
restricted unpickler (the opcode scanner that lists a file's globals is ``scanning.py``).

The unpickler resolves only an allowlist of globals (tensor and storage rebuild functions,
builtin containers, dtypes, numpy arrays as data). Every other global becomes a placeholder
class; instances of it (:class:`Opaque`) record their arguments and state, so the tensors inside
a whole-model pickle or a malicious file can still be listed, and nothing is imported.
"""
from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import io
import pickle
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.read.formats.base import TensorRef, ref_of

# --- classification -------------------------------------------------------------------------

# Modules whose globals can run commands, touch files or the network, or build arbitrary calls.
UNSAFE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "socket", "shutil", "importlib", "runpy", "pickle",
    "_pickle", "marshal", "types", "code", "codeop", "pty", "webbrowser", "ctypes",
    "multiprocessing", "threading", "_thread", "signal", "tempfile", "urllib", "http", "ftplib",
    "smtplib", "telnetlib", "asyncio", "functools", "operator", "_operator", "pdb", "bdb",
    "timeit", "trace", "cProfile", "profile", "platform", "getpass", "sqlite3", "zipimport",
    "pkgutil", "dill", "cloudpickle", "joblib", "requests", "httpx", "aiohttp", "paramiko",
    "torch.hub", "torch.serialization", "torch.jit", "torch._dynamo", "torch.utils.cpp_extension",
    "numpy.testing", "numpy.f2py", "numpy.distutils", "setuptools", "distutils", "pip",
    "yaml", "jinja2", "IPython", "commands", "popen2", "__builtin__",
})
UNSAFE_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals",
    "locals", "vars", "input", "breakpoint", "exit", "quit", "help", "memoryview", "apply",
    "execfile", "file", "reload", "__loader__", "__build_class__", "classmethod", "staticmethod",
    "property", "super", "type", "print",
})


@dataclass(frozen=True)
class GlobalRef:
    """A global a pickle imports, where it was found and how it is classified."""

    module: str
    name: str
    member: str = ""                # zip member or pickle within the file
    verdict: str = "unknown"        # 'safe' | 'unsafe' | 'unknown'

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __str__(self) -> str:
        return self.qualname


def py3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 spelling of a global written by a protocol-2 pickle ('__builtin__.set')."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def classify(module: str, name: str) -> str:
    """'safe' when the restricted unpickler allowlists it, 'unsafe' when it can run code or
    touch the system, 'unknown' for everything else (importing it would run its module)."""
    module, name = py3_name(module, name)
    if module == "?":
        return "unsafe"  # a name computed at load time cannot be checked
    full = f"{module}.{name}"
    if full in _ALLOWED or full in _SAFE_UNSUPPORTED or full in _SAFE_DATA:
        return "safe"
    if module in ("builtins", "__builtin__"):
        return "unsafe" if name in UNSAFE_BUILTINS or name.startswith("_") else "unknown"
    root = module.split(".")[0]
    if module in UNSAFE_MODULES or root in UNSAFE_MODULES:
        return "unsafe"
    if any(module.startswith(m + ".") for m in UNSAFE_MODULES):
        return "unsafe"
    return "unknown"


# --- placeholders ---------------------------------------------------------------------------

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


# --- the allowlist --------------------------------------------------------------------------

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


def _tensor_ref(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                dtype: torch.dtype | None = None) -> Any:
    if not isinstance(storage, StorageRef):
        return _placeholder("torch._utils", "_rebuild_tensor")(storage, storage_offset, size, stride)
    return TensorRef(shape=tuple(size), dtype=dtype or storage.dtype, reader=storage.reader,
                     key=storage.key, storage=storage.key, offset=storage_offset + storage.offset,
                     stride=tuple(stride), requires_grad=bool(requires_grad),
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


def _memory_tensor(t: torch.Tensor) -> Any:
    return ref_of(t)


def _rebuild_meta_tensor_no_storage(dtype, size, stride, requires_grad):
    return _memory_tensor(torch.empty_strided(size, stride, dtype=dtype, device="meta"))


def _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad):
    import numpy as np

    if not isinstance(data, np.ndarray) or data.dtype == object:
        return _placeholder("torch._utils", "_rebuild_device_tensor_from_numpy")(data, dtype, device)
    return _memory_tensor(torch.from_numpy(data.copy()).to(dtype))


def _reconstructor(cls, base, state):
    """copyreg._reconstructor for allowlisted types; placeholders stay placeholders."""
    if isinstance(cls, type) and issubclass(cls, Opaque):
        return cls(base, state) if state is not None else cls()
    if isinstance(base, type) and issubclass(base, Opaque):
        return _placeholder(getattr(cls, "__module__", "?"), getattr(cls, "__name__", "?"))()
    return copyreg._reconstructor(cls, base, state)


def _newobj(cls, *args):
    return cls.__new__(cls, *args)


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


def _build_allowed() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": _placeholder("collections", "defaultdict"),
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
        "torch._utils._rebuild_device_tensor_from_numpy": _rebuild_device_tensor_from_numpy,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch._tensor._rebuild_from_type": lambda func, type_, args, dict_: func(*args),
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.serialization._get_layout": lambda name: getattr(torch, name.split(".")[-1]),
        "copyreg._reconstructor": _reconstructor,
        "copy_reg._reconstructor": _reconstructor,
        "copyreg.__newobj__": _newobj,
        "_codecs.encode": __import__("codecs").encode,
        "builtins.complex": complex,
        "builtins.slice": slice,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": bytearray,
        "builtins.object": object,
        "builtins.dict": dict,
        "builtins.list": list,
        "builtins.tuple": tuple,
        "builtins.int": int,
        "builtins.float": float,
        "builtins.bool": bool,
        "builtins.str": str,
        "builtins.bytes": bytes,
        "builtins.range": range,
    }
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype):
            allowed[f"torch.{name}"] = obj
    for layout in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc",
                   "_mkldnn", "jagged"):
        if hasattr(torch, layout):
            allowed[f"torch.{layout}"] = getattr(torch, layout)
    for mf in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format"):
        allowed[f"torch.{mf}"] = getattr(torch, mf)
    allowed.update(_storage_types())
    try:
        import numpy as np
        for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[f"{core}._reconstruct"] = _np_reconstruct
            allowed[f"{core}.scalar"] = _np_scalar
        allowed["numpy.ndarray"] = np.ndarray
        allowed["numpy.dtype"] = np.dtype
        for name in dir(getattr(np, "dtypes", None) or ()):
            if name.endswith("DType"):
                allowed[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
        import numpy.random._pickle as nrp
        for name in ("__randomstate_ctor", "__bit_generator_ctor", "__generator_ctor"):
            if hasattr(nrp, name):
                allowed[f"numpy.random._pickle.{name}"] = getattr(nrp, name)
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    return allowed


def _np_reconstruct(subtype, shape, dtype):
    import numpy as np

    if subtype is not np.ndarray:
        return _placeholder("numpy", "ndarray subclass")(shape, dtype)
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_scalar(dtype, data=None):
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        return _placeholder("numpy.core.multiarray", "scalar")(dtype, data)
    return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else dtype.type()


# Globals that are part of torch's own serialization but that the lazy reader does not rebuild
# (sparse, quantized, nested and wrapper-subclass tensors): safe to import, left as placeholders.
_SAFE_UNSUPPORTED = frozenset({
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_nested_tensor", "torch._utils._rebuild_wrapper_subclass",
    "torch._utils._rebuild_xla_tensor", "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch.per_tensor_affine", "torch.per_channel_affine", "torch.per_tensor_symmetric",
    "torch.per_channel_symmetric", "torch.per_channel_affine_float_qparams",
})

# Classes that only hold data (constructing them and setting their state runs nothing of
# consequence): DCP's metadata records, paths, torchkeep's own frozen-BatchNorm marker. The reader
# still leaves them as placeholders and reads their fields as data; scan calls them safe.
_SAFE_DATA = frozenset({
    *(f"torch.distributed.checkpoint.metadata.{n}" for n in (
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath", "pathlib.PureWindowsPath",
    "torchkeep.shape.EvalLock",
})

_ALLOWED: dict[str, Any] = _build_allowed()


# --- quantized tensors as data (torch.ao quantized tensors, torchao subclasses) ---------------

def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, requires_grad=False,
                     backward_hooks=None):
    from torchkeep.read.formats.quantized import qtensor_ref

    ref = _tensor_ref(storage, storage_offset, size, stride, requires_grad)
    out = qtensor_ref(ref, quantizer_params, requires_grad) if isinstance(ref, TensorRef) else None
    if out is None:
        return _placeholder("torch._utils", "_rebuild_qtensor")(storage, storage_offset, size, stride,
                                                                quantizer_params)
    return out


def _rebuild_wrapper_subclass(cls, dtype, size, stride, storage_offset, layout, device,
                              requires_grad):
    from torchkeep.read.formats.quantized import WrapperShell

    name = getattr(cls, "global_name", None)
    if name is None or not isinstance(dtype, torch.dtype):
        return _placeholder("torch._utils", "_rebuild_wrapper_subclass")(cls, dtype, size)
    return WrapperShell(name, dtype, tuple(size), tuple(stride) if stride is not None else None,
                        int(storage_offset), bool(requires_grad))


def _quantized_rebuilds() -> dict[str, Any]:
    out: dict[str, Any] = {"torch._utils._rebuild_qtensor": _rebuild_qtensor,
                           "torch._utils._rebuild_wrapper_subclass": _rebuild_wrapper_subclass}
    for q in ("per_tensor_affine", "per_channel_affine", "per_tensor_symmetric",
              "per_channel_symmetric", "per_channel_affine_float_qparams"):
        out[f"torch.{q}"] = getattr(torch, q)
    return out


_ALLOWED.update(_quantized_rebuilds())


# --- the restricted unpickler ---------------------------------------------------------------

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles with the allowlist; records every global it meets in ``self.seen``."""

    def __init__(self, file: Any, *, member: str = "",
                 persistent_load: Callable[[Any], Any] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self.member = member
        self.seen: list[GlobalRef] = []
        self._pload = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        module, name = py3_name(module, name)
        full = f"{module}.{name}"
        self.seen.append(GlobalRef(module, name, self.member, classify(module, name)))
        if full in _ALLOWED:
            return _ALLOWED[full]
        return _placeholder(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._pload is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._pload(pid)


def restricted_loads(data: bytes, *, path: str = "", member: str = "",
                     persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle ``data`` without importing anything outside the allowlist."""
    obj, _ = restricted_load_with_globals(data, path=path, member=member,
                                          persistent_load=persistent_load)
    return obj


def restricted_load_with_globals(data: bytes | io.BufferedIOBase, *, path: str = "",
                                 member: str = "",
                                 persistent_load: Callable[[Any], Any] | None = None
                                 ) -> tuple[Any, list[GlobalRef]]:
    """Like :func:`restricted_loads` and also the globals the pickle imported."""
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    up = RestrictedUnpickler(f, member=member, persistent_load=persistent_load)
    try:
        obj = up.load()
    except (CorruptCheckpointError, FormatError):
        raise
    except MemoryError:
        raise CorruptCheckpointError("the pickle declares an object larger than memory (damaged?)",
                                     path=path, entry=member or None) from None
    except EOFError:
        raise CorruptCheckpointError("the pickle ends early (file truncated?)", path=path,
                                     entry=member or None) from None
    except RecursionError:
        raise CorruptCheckpointError("the pickle nests too deeply to read", path=path,
                                     entry=member or None) from None
    except Exception as e:  # the unpickler raises many types on damaged input
        raise CorruptCheckpointError(f"the pickle cannot be read: {type(e).__name__}: {e}",
                                     path=path, entry=member or None,
                                     hint="the file is damaged or not a checkpoint") from None
    return obj, up.seen


__all__ = ["Opaque", "GlobalRef", "classify", "restricted_loads", "restricted_load_with_globals", "RestrictedUnpickler",
           "module_children", "StorageRef", "StorageType"]
