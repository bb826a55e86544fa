"""Reading pickles without running them: the allowlist, the classification of globals and the
restricted unpickler (the pickle machine itself, shared with the scanner, is ``pickles.py``).

The unpickler resolves only an allowlist of globals. Each allowlisted callable is a
:class:`Builder` that checks its arguments and builds only data (tensor references, containers,
dtypes, numpy arrays of plain dtypes); none returns a callable or an attribute chosen by the file.
Every other global becomes a placeholder class; instances of it (:class:`Opaque`) record their
arguments and state, so the tensors inside a whole-model pickle or a malicious file can still be
listed, and nothing is imported. The result is then checked for nesting depth and size
(``limits.py``) so that no later walk over it recurses without bound or expands a shared DAG.
"""
from __future__ import annotations

import _compat_pickle
import collections
from dataclasses import dataclass
from typing import Any, Callable

from torchkeep import limits as _limits
from torchkeep.read.allowlist import ALLOWED as _ALLOWED, SAFE_DATA as _SAFE_DATA, SETTABLE as _SETTABLE
from torchkeep.read.allowlist import SAFE_UNSUPPORTED as _SAFE_UNSUPPORTED, Builder
from torchkeep.errors import CorruptCheckpointError
from torchkeep.read.pickles import CALL_OF_COMPUTED, PickleError, PickleMachine
from torchkeep.read.placeholders import (Opaque, StorageRef, StorageType, _placeholder, module_children,  # noqa: F401
                           storage_from_pid)

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


# --- the restricted unpickler ---------------------------------------------------------------

def _resolve(module: str, name: str) -> Any:
    module, name = py3_name(module, name)
    full = f"{module}.{name}"
    if full in _ALLOWED:
        return _ALLOWED[full]
    return _placeholder(module, name)


def _call(fn: Any, args: tuple, kwargs: dict) -> Any:
    """The only calls the restricted unpickler makes: Builders and placeholders."""
    if isinstance(fn, Builder) or (isinstance(fn, type) and issubclass(fn, Opaque)) or \
            isinstance(fn, Opaque):
        return fn(*args, **kwargs)
    raise PickleError(f"{fn!r} is not callable in a checkpoint")


def _build_state(inst: Any, state: Any) -> None:
    if isinstance(inst, Opaque):
        inst.__setstate__(state)
    elif isinstance(inst, _SETTABLE):
        inst.__setstate__(state)
    elif type(inst) is collections.OrderedDict and type(state) is dict and \
            all(type(k) is str for k in state):
        inst.__dict__.update(state)  # a state_dict's ``_metadata`` attribute
    else:
        raise PickleError(f"cannot set the state of a {type(inst).__name__}")


def _kids(obj: Any) -> list | None:
    t = type(obj)
    if t is dict or isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if t in (list, tuple, set, frozenset) or isinstance(obj, (list, tuple)):
        return list(obj)
    if isinstance(obj, Opaque):
        d = obj.__dict__
        return [d.get("args"), d.get("kwargs"), d.get("state"), d.get("items"), d.get("dict_items")]
    if _SETTABLE and isinstance(obj, _SETTABLE[0]) and obj.dtype.hasobject:
        return list(obj.ravel().tolist())
    return None


def check_graph(root: Any, *, path: str | None = None, member: str | None = None) -> None:
    """Refuse an unpickled object nested deeper than ``limits.depth`` or with more than
    ``limits.nodes`` objects once shared ones are counted per use (a memo "billion laughs"),
    walking it with an explicit stack. Cycles are allowed (the tree walkers handle them)."""
    lim = _limits.current()
    done: dict[int, tuple[int, int]] = {}
    active: set[int] = set()
    todo: list[tuple[Any, bool]] = [(root, False)]
    while todo:
        obj, post = todo.pop()
        oid = id(obj)
        if post:
            active.discard(oid)
            size, depth = 1, 0
            for k in _kids(obj) or ():
                r = done.get(id(k))
                if r is None:
                    size += 1
                else:
                    size += r[0]
                    depth = max(depth, r[1])
            depth += 1
            if depth > lim.depth:
                raise _limits.exceeded("depth", f"the pickle nests objects more than {lim.depth} deep",
                                       path=path, entry=member)
            if size > lim.nodes:
                raise _limits.exceeded("nodes", f"the pickle expands to more than {lim.nodes:,} objects",
                                       path=path, entry=member)
            done[oid] = (size, depth)
            continue
        if oid in done or oid in active:
            continue
        kids = _kids(obj)
        if kids is None:
            continue
        active.add(oid)
        todo.append((obj, True))
        todo.extend((k, False) for k in kids if id(k) not in done and id(k) not in active)


def restricted_walk(data: Any, start: int = 0, *, path: str = "", member: str = "",
                    persistent_load: Callable[[Any], Any] | None = None) -> tuple[Any, list[GlobalRef], int]:
    """Unpickle the pickle at ``start`` in ``data`` (bytes or mmap) with the allowlist: the
    object, the globals it imported and the offset just past it. Damage raises
    CorruptCheckpointError; input over a limit raises LimitExceededError."""
    m = PickleMachine(data, start, resolve=_resolve, persistent_load=persistent_load, call=_call,
                      build_state=_build_state, path=path or None, member=member or None)

    def call(fn: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(fn, Opaque):  # a placeholder instance called: what the scan reports too
            m.record(*CALL_OF_COMPUTED, m.pos)
        return _call(fn, args, kwargs)

    m.call = call
    res = m.run()
    seen = [global_ref(f.module, f.name, member) for f in res.found]
    if res.limit is not None:
        raise res.limit
    if res.error is not None:
        hint = "file truncated?" if "truncated" in res.error else "the file is damaged or not a checkpoint"
        raise CorruptCheckpointError(f"the pickle cannot be read: {res.error}", path=path,
                                     entry=member or None, hint=hint)
    check_graph(res.value, path=path or None, member=member or None)
    return res.value, seen, res.end


def global_ref(module: str, name: str, member: str = "") -> GlobalRef:
    module, name = py3_name(module, name)
    return GlobalRef(module, name, member, classify(module, name))


def restricted_loads(data: bytes, *, path: str = "", member: str = "",
                     persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle ``data`` without importing anything outside the allowlist."""
    obj, _ = restricted_load_with_globals(data, path=path, member=member,
                                          persistent_load=persistent_load)
    return obj


def restricted_load_with_globals(data: Any, *, path: str = "", member: str = "",
                                 persistent_load: Callable[[Any], Any] | None = None
                                 ) -> tuple[Any, list[GlobalRef]]:
    """Like :func:`restricted_loads` and also the globals the pickle imported."""
    if hasattr(data, "read"):
        data = data.read()
    obj, seen, _ = restricted_walk(data, path=path, member=member, persistent_load=persistent_load)
    return obj, seen


__all__ = ["Opaque", "GlobalRef", "Builder", "classify", "restricted_loads",
           "restricted_load_with_globals", "restricted_walk", "check_graph", "module_children",
           "StorageRef", "StorageType"]
