"""Reading pickles without running them: a restricted unpickler and a pickle scanner.

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
import pickletools
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from .errors import CorruptCheckpointError, FormatError
from .formats.base import TensorRef, ref_of

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
    if full in _ALLOWED or full in _SAFE_UNSUPPORTED or full in _OWN_CLASSES:
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

# torchkeep's own marker classes that may sit inside a pickled model (a frozen BatchNorm's eval
# lock): harmless data, still left as placeholders by the reader.
_OWN_CLASSES = frozenset({"torchkeep.modeling.EvalLock"})

_ALLOWED: dict[str, Any] = _build_allowed()


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


# --- the scanner ----------------------------------------------------------------------------

_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                         "BINSTRING", "SHORT_BINSTRING"})
_MARK = object()


def scan_pickle(data: bytes, member: str = "") -> tuple[list[GlobalRef], str | None]:
    """Every global a pickle imports, found by walking its opcodes (nothing is executed).

    Follows the stack so that ``STACK_GLOBAL`` names built from memoized strings resolve;
    a name that is computed at load time is reported as ``?.?`` (unsafe). Returns the globals
    and an error message if the pickle is damaged (globals found before the damage are kept).
    """
    found: list[GlobalRef] = []
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def record(module: Any, name: Any) -> None:
        if isinstance(module, str) and isinstance(name, str):
            module, name = py3_name(module, name)
            found.append(GlobalRef(module, name, member, classify(module, name)))
        else:
            found.append(GlobalRef("?", "?", member, "unsafe"))

    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, gname = str(arg).partition(" ")
                record(module, gname)
            if name == "STACK_GLOBAL":
                gname = stack.pop() if stack else None
                module = stack.pop() if stack else None
                record(module, gname)
                stack.append(None)
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1] if stack else None
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg))
                continue
            if name == "DUP":
                stack.append(stack[-1] if stack else None)
                continue
            if name == "MARK":
                stack.append(_MARK)
                continue
            before = op.stack_before
            if pickletools.markobject in before:
                n_below = before.index(pickletools.markobject)
                while stack and stack.pop() is not _MARK:
                    pass
                del stack[len(stack) - min(n_below, len(stack)):]
            else:
                del stack[len(stack) - min(len(before), len(stack)):]
            if name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else None)
            else:
                stack.extend([None] * len(op.stack_after))
    except Exception as e:  # damaged pickle: keep what was found
        return found, f"{type(e).__name__}: {e}"
    return found, None


@dataclass
class ScanReport:
    """What importing a checkpoint's pickles would pull in, without importing anything.

    ``safe`` is True only when every global is on the allowlist: 'unknown' globals are not
    dangerous by name but loading them with torch.load would import and run their module.
    """

    path: str
    format: str
    safe: bool
    globals: list[GlobalRef] = field(default_factory=list)
    unsafe: list[GlobalRef] = field(default_factory=list)
    unknown: list[GlobalRef] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def g(lst):
            return [{"global": x.qualname, "member": x.member, "verdict": x.verdict} for x in lst]
        return {"path": self.path, "format": self.format, "safe": self.safe,
                "globals": g(self.globals), "unsafe": g(self.unsafe), "unknown": g(self.unknown),
                "errors": self.errors, "pickles": self.pickles}


def _is_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5


def _pickles_in_zip(source: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, bytes]]:
    """Every pickle in a zip archive, and in zip archives stored inside it (3 levels deep)."""
    out = []
    with zipfile.ZipFile(source) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            with zf.open(info) as m:
                head = m.read(4)
            name = prefix + info.filename
            if head[:4] == b"PK\x03\x04" and depth < 3:
                out.extend(_pickles_in_zip(io.BytesIO(zf.read(info)), name + "!", depth + 1))
            elif "/data/" in info.filename and not info.filename.endswith(".pkl"):
                continue  # raw tensor bytes that may happen to start like a pickle
            elif info.filename.endswith(".pkl") or _is_pickle(head):
                out.append((name, zf.read(info)))
    return out


def _pickles_in_stream(path: str) -> list[tuple[str, bytes]]:
    """Consecutive pickles at the start of a legacy torch file (magic, version, sys info,
    the object, the storage keys); the raw storage bytes after them are not pickles."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    for i in range(5):
        if not _is_pickle(data[pos:pos + 2]) and i > 0:
            break
        try:
            end = None
            for op, _arg, p in pickletools.genops(io.BytesIO(data[pos:])):
                if op.name == "STOP":
                    end = p + 1
                    break
        except Exception:
            out.append((f"pickle {i}", data[pos:]))
            break
        if end is None:
            out.append((f"pickle {i}", data[pos:]))
            break
        out.append((f"pickle {i}", data[pos:pos + end]))
        pos += end
    return out


def scan(path: str) -> ScanReport:
    """List every global the pickles in ``path`` import, each classified safe/unsafe/unknown.

    Works on torch zip archives (every pickle member, nested ones included), legacy torch
    files, plain pickles, DCP folders and sharded folders (each file), and formats without
    pickle (safetensors: trivially safe). Never imports or executes anything from the file.
    """
    import os

    from .formats import detect

    if os.path.isdir(path):
        try:
            cls = detect(path)
            fmt = cls.format
            files = cls(path).files()
        except FormatError:
            raise
        # Files without a pickle inside (JSON manifests, safetensors shards) import nothing.
        reports = [scan(f) for f in files if os.path.isfile(f) and _may_hold_pickle(f)]
        rep = ScanReport(path=path, format=fmt, safe=all(r.safe for r in reports))
        for r in reports:
            rep.globals += r.globals
            rep.unsafe += r.unsafe
            rep.unknown += r.unknown
            rep.errors += [f"{r.path}: {e}" for e in r.errors]
            rep.pickles += [f"{os.path.basename(r.path)}:{p}" for p in r.pickles]
        rep.safe = rep.safe and not rep.errors
        return rep
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise FormatError("the file is empty", path=path)
    if head[:4] == b"PK\x03\x04":
        fmt = "torch-zip"
        try:
            pickles = _pickles_in_zip(path)
        except zipfile.BadZipFile as e:
            raise CorruptCheckpointError(f"zip archive is damaged: {e}", path=path,
                                         hint="was the write interrupted?") from None
    elif _is_pickle(head):
        fmt = "pickle"
        pickles = _pickles_in_stream(path)
    else:
        fmt = _non_pickle_format(path, head)
        return ScanReport(path=path, format=fmt, safe=True)
    rep = ScanReport(path=path, format=fmt, safe=True)
    for member, data in pickles:
        found, err = scan_pickle(data, member)
        rep.pickles.append(member)
        rep.globals.extend(found)
        if err:
            rep.errors.append(f"{member}: damaged pickle ({err})")
    seen = set()
    for g in rep.globals:
        if (g.qualname, g.verdict) in seen:
            continue
        seen.add((g.qualname, g.verdict))
        if g.verdict == "unsafe":
            rep.unsafe.append(g)
        elif g.verdict == "unknown":
            rep.unknown.append(g)
    rep.safe = not rep.unsafe and not rep.unknown and not rep.errors
    return rep


def _may_hold_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:4] == b"PK\x03\x04" or _is_pickle(head)


def _non_pickle_format(path: str, head: bytes) -> str:
    from .formats import detect

    return detect(path).format


__all__ = ["Opaque", "GlobalRef", "ScanReport", "scan", "scan_pickle", "classify",
           "restricted_loads", "restricted_load_with_globals", "RestrictedUnpickler",
           "module_children", "StorageRef", "StorageType"]
