"""One pickle machine for every dialect, used both to scan and to unpickle.

:class:`PickleMachine` executes pickle opcodes (protocols 0 to 5) with an explicit stack, the
way CPython's C unpickler does: marks as a separate stack, frames as read-ahead hints only,
memo by index, ``GLOBAL``/``INST`` text names, ``STACK_GLOBAL`` names from the stack, extension
codes. It runs in two modes over the same opcode loop, so what is scanned is exactly what would
be loaded:

- **scan** (``resolve=None``): every global is recorded and becomes an inert marker; strings are
  kept (they can name a ``STACK_GLOBAL``), every other value is a marker, nothing is built or
  called. A name computed at load time (the result of a call) is reported as ``?.?``.
- **build** (``resolve`` given): globals are resolved by the caller (the allowlist in
  ``unpickler.py``); the only calls made are to what ``resolve`` returned.

Work is bounded by :mod:`torchkeep.limits` (pickle bytes, opcodes, memo, container sizes).
A pickle that breaks after some opcodes still reports every global seen before the break.
"""
from __future__ import annotations

import codecs
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from torchkeep.read import limits as _limits
from torchkeep.errors import LimitExceededError

# Opcode bytes (pickle.py's names).
MARK, STOP, POP, POP_MARK, DUP = b"(", b".", b"0", b"1", b"2"
PROTO_BYTE = 0x80


class PickleError(Exception):
    """The opcode stream is malformed (raised inside the machine, reported as damage)."""


class _Marker:
    """A value the scan does not track (anything but a string)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<value>"


ANY = _Marker()


class _GlobalMarker(_Marker):
    """What a global becomes in a scan: calling it is judged by its name."""

    __slots__ = ()


GLOBAL = _GlobalMarker()
CALL_OF_COMPUTED = ("?", "call of a value computed at load time")


@dataclass
class Found:
    """A global the pickle imports: module, name, and the byte offset of the opcode."""

    module: str
    name: str
    pos: int


@dataclass
class WalkResult:
    """What one pickle did: the value (build mode), its globals, where it ended, what broke."""

    value: Any = None
    found: list[Found] = field(default_factory=list)
    end: int = -1                 # offset just past STOP, -1 when it never got there
    error: str | None = None      # the pickle is damaged here (globals before it are kept)
    limit: LimitExceededError | None = None
    ops: int = 0


_COMPUTED = ("?", "?")


class PickleMachine:
    """Runs one pickle starting at ``start`` in ``data`` (bytes, memoryview or mmap)."""

    def __init__(self, data: Any, start: int = 0, *, resolve: Callable[[str, str], Any] | None = None,
                 persistent_load: Callable[[Any], Any] | None = None,
                 call: Callable[[Any, tuple, dict], Any] | None = None,
                 build_state: Callable[[Any, Any], None] | None = None,
                 encoding: str = "utf-8", path: str | None = None, member: str | None = None,
                 max_ops: int = 0) -> None:
        self.data = data
        self.pos = start
        self.start = start
        self.build = resolve is not None
        self.resolve = resolve
        self.pload = persistent_load
        self.call = call or _plain_call
        self.build_state = build_state
        self.encoding = encoding
        self.path, self.member = path, member
        self.lim = _limits.current()
        self.end_limit = min(len(data), start + self.lim.pickle_bytes)
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.found: list[Found] = []
        self.proto = 0
        self.max_ops = max_ops  # a lower cap than the limit, for probing (0: the limit)

    # -- reading -----------------------------------------------------------------------
    def _read(self, n: int) -> bytes:
        p = self.pos
        if n < 0:
            raise PickleError("negative length")
        if p + n > self.end_limit:
            if self.end_limit < len(self.data) and p + n <= len(self.data):
                raise self._over("pickle_bytes", f"the pickle is longer than {self.lim.pickle_bytes:,} bytes")
            raise PickleError("pickle data was truncated")
        self.pos = p + n
        return bytes(self.data[p:p + n])

    def _readline(self) -> bytes:
        p = self.pos
        chunk = bytes(self.data[p:min(self.end_limit, p + (1 << 16))])
        i = chunk.find(b"\n")
        if i < 0:
            if len(chunk) >= (1 << 16):
                raise PickleError("text argument longer than 64 KiB")
            raise PickleError("pickle data was truncated")
        self.pos = p + i + 1
        return chunk[:i]

    def _over(self, name: str, what: str) -> LimitExceededError:
        return _limits.exceeded(name, what, path=self.path, entry=self.member)

    # -- stack -------------------------------------------------------------------------
    def _pop(self) -> Any:
        fence = self.marks[-1] if self.marks else 0
        if len(self.stack) <= fence:
            raise PickleError("unpickling stack underflow")
        return self.stack.pop()

    def _top(self) -> Any:
        fence = self.marks[-1] if self.marks else 0
        if len(self.stack) <= fence:
            raise PickleError("unpickling stack underflow")
        return self.stack[-1]

    def _pop_mark(self) -> list[Any]:
        if not self.marks:
            raise PickleError("could not find MARK")
        k = self.marks.pop()
        items = self.stack[k:]
        del self.stack[k:]
        return items

    def _push(self, v: Any) -> None:
        self.stack.append(v)  # its size is checked in the loop

    # -- globals -----------------------------------------------------------------------
    def _global(self, module: Any, name: Any, pos: int) -> Any:
        if type(module) is not str or type(name) is not str:
            self.found.append(Found(*_COMPUTED, pos))
            if self.build:
                raise PickleError("STACK_GLOBAL requires str")
            return ANY
        self.found.append(Found(module, name, pos))
        return self.resolve(module, name) if self.build else GLOBAL

    def _callee(self, fn: Any, pos: int) -> None:
        """In a scan, a call of anything but a global (the result of another call, e.g. a
        lookup helper's answer) cannot be judged by name: reported as unsafe."""
        if not self.build and fn is not GLOBAL:
            self.found.append(Found(*CALL_OF_COMPUTED, pos))

    def _text_global(self, pos: int) -> Any:
        module = self._readline().decode("utf-8")
        name = self._readline().decode("utf-8")
        return self._global(module, name, pos)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> WalkResult:
        res = WalkResult()
        try:
            res.value = self._loop(res)
            res.end = self.pos
        except LimitExceededError as e:
            res.limit = e
        except RecursionError:  # pragma: no cover - the machine does not recurse
            res.error = "nesting too deep"
        except MemoryError:
            res.error = "an object larger than memory"
        except Exception as e:  # every malformed stream, whatever the opcode raised
            res.error = f"{type(e).__name__}: {e}" if not isinstance(e, PickleError) else str(e)
            res.error += f" (at byte {self.pos - self.start})"
        res.found = self.found
        return res

    def _loop(self, res: WalkResult) -> Any:
        table = _TABLE
        data = self.data
        stack = self.stack
        max_ops = min(self.lim.pickle_ops, self.max_ops) if self.max_ops else self.lim.pickle_ops
        max_stack = self.lim.container
        end = self.end_limit
        ops = 0
        while True:
            pos = self.pos
            if pos >= end:
                if end < len(data):
                    raise self._over("pickle_bytes", f"the pickle is longer than {self.lim.pickle_bytes:,} bytes")
                raise PickleError("pickle data was truncated (no STOP opcode)")
            self.pos = pos + 1
            ops += 1
            if ops > max_ops:
                res.ops = ops
                raise self._over("pickle_ops", f"the pickle runs more than {max_ops:,} opcodes")
            if not ops & 0xFFFF and len(stack) > max_stack:  # it grows by <= 1 item per opcode
                raise self._over("container", f"the pickle stack holds more than {max_stack:,} items")
            fn = table[data[pos]]  # bytes, mmap and memoryview('B') all index to int
            if fn is None:
                raise PickleError(f"invalid load key {bytes([data[pos]])!r}")
            if fn is _stop:
                res.ops = ops
                return self._pop()
            fn(self, pos)

    # -- building helpers ----------------------------------------------------------------
    def _container_check(self, n: int) -> None:
        if n > self.lim.container:
            raise self._over("container", f"a container holds more than {self.lim.container:,} items")


def _plain_call(fn: Any, args: tuple, kwargs: dict) -> Any:
    return fn(*args, **kwargs)


# ---- opcode implementations ------------------------------------------------------------
def _stop(m: PickleMachine, pos: int) -> None:  # handled in the loop
    pass


def _mark(m: PickleMachine, pos: int) -> None:
    m.marks.append(len(m.stack))


def _pop_op(m: PickleMachine, pos: int) -> None:
    fence = m.marks[-1] if m.marks else 0
    if len(m.stack) > fence:
        m.stack.pop()
    elif m.marks and m.marks[-1] == len(m.stack):
        m.marks.pop()  # C pickle: POP with a mark on top removes the mark
    else:
        raise PickleError("unpickling stack underflow")


def _pop_mark_op(m: PickleMachine, pos: int) -> None:
    m._pop_mark()


def _dup(m: PickleMachine, pos: int) -> None:
    m._push(m._top())


def _proto(m: PickleMachine, pos: int) -> None:
    p = m._read(1)[0]
    if p > 5:
        raise PickleError(f"unsupported pickle protocol: {p}")
    m.proto = p


def _frame(m: PickleMachine, pos: int) -> None:
    (n,) = struct.unpack("<Q", m._read(8))
    # The C unpickler only reads the frame ahead; opcodes may cross its end. Same here: the
    # frame must exist, its boundary means nothing.
    if m.pos + n > len(m.data):
        raise PickleError("pickle data was truncated (frame longer than the data)")


def _value(v: Any) -> Callable[[PickleMachine, int], None]:
    def op(m: PickleMachine, pos: int) -> None:
        m._push(v if m.build else ANY)
    return op


def _int_text(m: PickleMachine, pos: int) -> None:
    line = m._readline()
    if line == b"00":
        v: Any = False
    elif line == b"01":
        v = True
    else:
        v = int(line, 0) if line[:2] in (b"0x", b"0X") else int(line)
    m._push(v if m.build else ANY)


def _long_text(m: PickleMachine, pos: int) -> None:
    line = m._readline()
    if line.endswith(b"L"):
        line = line[:-1]
    v = int(line)
    m._push(v if m.build else ANY)


def _float_text(m: PickleMachine, pos: int) -> None:
    v = float(m._readline())
    m._push(v if m.build else ANY)


def _fixed(fmt: str) -> Callable[[PickleMachine, int], None]:
    s = struct.Struct(fmt)

    def op(m: PickleMachine, pos: int) -> None:
        (v,) = s.unpack(m._read(s.size))
        m._push(v if m.build else ANY)
    return op


def _long_n(width: int) -> Callable[[PickleMachine, int], None]:
    fmt = "<B" if width == 1 else "<i"

    def op(m: PickleMachine, pos: int) -> None:
        (n,) = struct.unpack(fmt, m._read(width))
        if n < 0:
            raise PickleError("LONG pickle has negative byte count")
        raw = m._read(n)
        m._push(int.from_bytes(raw, "little", signed=True) if m.build else ANY)
    return op


def _string_text(m: PickleMachine, pos: int) -> None:
    line = m._readline().rstrip(b"\r")
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        raise PickleError("the STRING opcode argument must be quoted")
    raw = codecs.escape_decode(line[1:-1])[0]
    m._push(_decode_str(m, raw))


def _decode_str(m: PickleMachine, raw: bytes) -> Any:
    # Python 2 str: decoded with the loader's encoding, as torch.load does (utf-8).
    if m.encoding == "bytes":
        return raw if m.build else ANY
    return raw.decode(m.encoding, "strict")


def _sized(width: int, kind: str) -> Callable[[PickleMachine, int], None]:
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width]
    signed4 = kind == "binstring"

    def op(m: PickleMachine, pos: int) -> None:
        (n,) = struct.unpack("<i" if signed4 else fmt, m._read(width))
        if n < 0:
            raise PickleError("negative byte count")
        raw = m._read(n)
        if kind == "unicode":
            m._push(raw.decode("utf-8", "surrogatepass"))
        elif kind in ("binstring", "shortbinstring"):
            m._push(_decode_str(m, raw))
        elif kind == "bytearray":
            m._push(bytearray(raw) if m.build else ANY)
        else:
            m._push(raw if m.build else ANY)
    return op


def _unicode_text(m: PickleMachine, pos: int) -> None:
    m._push(m._readline().decode("raw-unicode-escape"))


def _empty(factory: Callable[[], Any]) -> Callable[[PickleMachine, int], None]:
    def op(m: PickleMachine, pos: int) -> None:
        m._push(factory() if m.build else ANY)
    return op


def _tuple_n(n: int) -> Callable[[PickleMachine, int], None]:
    def op(m: PickleMachine, pos: int) -> None:
        items = [m._pop() for _ in range(n)][::-1]
        m._push(tuple(items) if m.build else ANY)
    return op


def _tuple(m: PickleMachine, pos: int) -> None:
    items = m._pop_mark()
    m._container_check(len(items))
    m._push(tuple(items) if m.build else ANY)


def _list(m: PickleMachine, pos: int) -> None:
    items = m._pop_mark()
    m._container_check(len(items))
    m._push(items if m.build else ANY)


def _dict(m: PickleMachine, pos: int) -> None:
    items = m._pop_mark()
    m._container_check(len(items) // 2)
    if len(items) % 2:
        raise PickleError("odd number of items for DICT")
    m._push(dict(zip(items[::2], items[1::2])) if m.build else ANY)


def _frozenset(m: PickleMachine, pos: int) -> None:
    items = m._pop_mark()
    m._container_check(len(items))
    m._push(frozenset(items) if m.build else ANY)


def _append(m: PickleMachine, pos: int) -> None:
    v = m._pop()
    target = m._top()
    if m.build:
        _extend(m, target, [v])


def _appends(m: PickleMachine, pos: int) -> None:
    items = m._pop_mark()
    target = m._top()
    if m.build:
        _extend(m, target, items)


def _extend(m: PickleMachine, target: Any, items: list) -> None:
    if type(target) is list:
        target.extend(items)
        m._container_check(len(target))
        return
    ext = getattr(type(target), "pickle_extend", None)  # placeholders record what was appended
    if ext is None:
        raise PickleError(f"APPEND to a {type(target).__name__} is not supported")
    ext(target, items)


def _setitem(m: PickleMachine, pos: int) -> None:
    v = m._pop()
    k = m._pop()
    target = m._top()
    if m.build:
        _set_items(m, target, [k, v])


def _setitems(m: PickleMachine, pos: int) -> None:
    items = m._pop_mark()
    target = m._top()
    if len(items) % 2:
        raise PickleError("odd number of items for SETITEMS")
    if m.build:
        _set_items(m, target, items)


def _set_items(m: PickleMachine, target: Any, items: list) -> None:
    if isinstance(target, dict):
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
        m._container_check(len(target))
        return
    setter = getattr(type(target), "pickle_setitem", None)
    if setter is None:
        raise PickleError(f"SETITEM on a {type(target).__name__} is not supported")
    for i in range(0, len(items), 2):
        setter(target, items[i], items[i + 1])


def _additems(m: PickleMachine, pos: int) -> None:
    items = m._pop_mark()
    target = m._top()
    if m.build:
        if type(target) is not set:
            raise PickleError(f"ADDITEMS on a {type(target).__name__} is not supported")
        target.update(items)
        m._container_check(len(target))


def _global_op(m: PickleMachine, pos: int) -> None:
    m._push(m._text_global(pos))


def _stack_global(m: PickleMachine, pos: int) -> None:
    name = m._pop()
    module = m._pop()
    m._push(m._global(module, name, pos))


def _ext(width: int) -> Callable[[PickleMachine, int], None]:
    fmt = {1: "<B", 2: "<H", 4: "<i"}[width]

    def op(m: PickleMachine, pos: int) -> None:
        (code,) = struct.unpack(fmt, m._read(width))
        # What an extension code names depends on the loading process's copyreg registry: the
        # file cannot be judged, so it counts as a computed (unsafe) global.
        m.found.append(Found("?", f"extension code {code}", pos))
        if m.build:
            raise PickleError(f"extension code {code} is not supported (resolved by the loader's registry)")
        m._push(ANY)
    return op


def _reduce(m: PickleMachine, pos: int) -> None:
    args = m._pop()
    fn = m._pop()
    if not m.build:
        m._callee(fn, pos)
        m._push(ANY)
        return
    if type(args) is not tuple:
        raise PickleError("REDUCE arguments must be a tuple")
    m._push(m.call(fn, args, {}))


def _newobj(m: PickleMachine, pos: int) -> None:
    args = m._pop()
    cls = m._pop()
    if not m.build:
        m._callee(cls, pos)
        m._push(ANY)
        return
    if type(args) is not tuple:
        raise PickleError("NEWOBJ arguments must be a tuple")
    m._push(m.call(cls, args, {}))


def _newobj_ex(m: PickleMachine, pos: int) -> None:
    kwargs = m._pop()
    args = m._pop()
    cls = m._pop()
    if not m.build:
        m._callee(cls, pos)
        m._push(ANY)
        return
    if type(args) is not tuple or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
        raise PickleError("NEWOBJ_EX arguments must be a tuple and a dict of str keys")
    m._push(m.call(cls, args, kwargs))


def _inst(m: PickleMachine, pos: int) -> None:
    cls = m._text_global(pos)
    args = m._pop_mark()
    m._push(m.call(cls, tuple(args), {}) if m.build else ANY)


def _obj(m: PickleMachine, pos: int) -> None:
    args = m._pop_mark()
    if not args:
        raise PickleError("OBJ without a class")
    cls = args.pop(0)
    m._callee(cls, pos)
    m._push(m.call(cls, tuple(args), {}) if m.build else ANY)


def _build(m: PickleMachine, pos: int) -> None:
    state = m._pop()
    inst = m._top()
    if m.build:
        if m.build_state is None:
            raise PickleError("BUILD is not supported here")
        m.build_state(inst, state)


def _persid_text(m: PickleMachine, pos: int) -> None:
    pid = m._readline().decode("ascii")
    _persistent(m, pid)


def _binpersid(m: PickleMachine, pos: int) -> None:
    _persistent(m, m._pop())


def _persistent(m: PickleMachine, pid: Any) -> None:
    if not m.build:
        m._push(ANY)
        return
    if m.pload is None:
        raise PickleError("A load persistent id instruction was encountered, but no persistent_load is set")
    m._push(m.pload(pid))


def _memo_put(m: PickleMachine, idx: int) -> None:
    if idx < 0:
        raise PickleError("negative PUT argument")
    if idx not in m.memo and len(m.memo) >= m.lim.memo:
        raise m._over("memo", f"the pickle memoizes more than {m.lim.memo:,} objects")
    m.memo[idx] = m._top()


def _put_text(m: PickleMachine, pos: int) -> None:
    _memo_put(m, int(m._readline()))


def _binput(m: PickleMachine, pos: int) -> None:
    _memo_put(m, m._read(1)[0])


def _long_binput(m: PickleMachine, pos: int) -> None:
    _memo_put(m, struct.unpack("<I", m._read(4))[0])


def _memoize(m: PickleMachine, pos: int) -> None:
    _memo_put(m, len(m.memo))


def _memo_get(m: PickleMachine, idx: int) -> None:
    try:
        m._push(m.memo[idx])
    except KeyError:
        raise PickleError(f"Memo value not found at index {idx}") from None


def _get_text(m: PickleMachine, pos: int) -> None:
    _memo_get(m, int(m._readline()))


def _binget(m: PickleMachine, pos: int) -> None:
    _memo_get(m, m._read(1)[0])


def _long_binget(m: PickleMachine, pos: int) -> None:
    _memo_get(m, struct.unpack("<I", m._read(4))[0])


def _next_buffer(m: PickleMachine, pos: int) -> None:
    raise PickleError("pickle stream refers to out-of-band data but no buffers were given")


def _readonly_buffer(m: PickleMachine, pos: int) -> None:
    v = m._pop()
    if m.build and isinstance(v, bytearray):
        v = bytes(v)
    m._push(v)


_DISPATCH: dict[int, Callable[[PickleMachine, int], None]] = {ord(k): v for k, v in {
    "(": _mark, ".": _stop, "0": _pop_op, "1": _pop_mark_op, "2": _dup,
    "F": _float_text, "I": _int_text, "J": _fixed("<i"), "K": _fixed("<B"), "L": _long_text,
    "M": _fixed("<H"), "N": _value(None), "P": _persid_text, "Q": _binpersid, "R": _reduce,
    "S": _string_text, "T": _sized(4, "binstring"), "U": _sized(1, "shortbinstring"),
    "V": _unicode_text, "X": _sized(4, "unicode"), "a": _append, "b": _build, "c": _global_op,
    "d": _dict, "}": _empty(dict), "e": _appends, "g": _get_text, "h": _binget, "i": _inst,
    "j": _long_binget, "l": _list, "]": _empty(list), "o": _obj, "p": _put_text, "q": _binput,
    "r": _long_binput, "s": _setitem, "t": _tuple, ")": _empty(tuple), "u": _setitems,
    "G": _fixed(">d"),
    "\x80": _proto, "\x81": _newobj, "\x82": _ext(1), "\x83": _ext(2), "\x84": _ext(4),
    "\x85": _tuple_n(1), "\x86": _tuple_n(2), "\x87": _tuple_n(3), "\x88": _value(True),
    "\x89": _value(False), "\x8a": _long_n(1), "\x8b": _long_n(4),
    "B": _sized(4, "bytes"), "C": _sized(1, "bytes"),
    "\x8c": _sized(1, "unicode"), "\x8d": _sized(8, "unicode"), "\x8e": _sized(8, "bytes"),
    "\x8f": _empty(set), "\x90": _additems, "\x91": _frozenset, "\x92": _newobj_ex,
    "\x93": _stack_global, "\x94": _memoize, "\x95": _frame,
    "\x96": _sized(8, "bytearray"), "\x97": _next_buffer, "\x98": _readonly_buffer,
}.items()}
_TABLE: list[Callable[[PickleMachine, int], None] | None] = [_DISPATCH.get(i) for i in range(256)]


def scan(data: Any, start: int = 0, *, path: str | None = None, member: str | None = None,
         max_ops: int = 0) -> WalkResult:
    """Walk one pickle without building or importing anything: its globals and where it ends
    (``max_ops`` stops a probe early: ``res.ops`` then says how far it got)."""
    return PickleMachine(data, start, path=path, member=member, max_ops=max_ops).run()


def looks_like_pickle(head: bytes) -> bool:
    """True when ``head`` starts the way pickles of protocol 2+ do (0x80, version 2..5), or
    with the opcodes protocol 0/1 pickles and torch's legacy files start with."""
    if len(head) >= 2 and head[0] == PROTO_BYTE and 1 <= head[1] <= 5:
        return True
    return head[:1] in (b"(", b"}", b"]", b"c", b")")


__all__ = ["PickleMachine", "WalkResult", "Found", "PickleError", "scan", "looks_like_pickle", "ANY"]
