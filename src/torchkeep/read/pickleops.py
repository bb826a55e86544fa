"""The opcodes of the pickle machine (``pickles.py``), protocols 0 to 5, and the markers a scan
pushes instead of values. Each opcode is a function of the machine and its own offset; they
follow CPython's C unpickler (marks on a separate stack, C's error cases kept as errors)."""
from __future__ import annotations

import codecs
import struct
from typing import Any, Callable

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


# ---- opcode implementations ------------------------------------------------------------
def _stop(m: Any, pos: int) -> None:  # handled in the loop
    pass


def _mark(m: Any, pos: int) -> None:
    m.marks.append(len(m.stack))


def _pop_op(m: Any, pos: int) -> None:
    fence = m.marks[-1] if m.marks else 0
    if len(m.stack) > fence:
        m.stack.pop()
    elif m.marks and m.marks[-1] == len(m.stack):
        m.marks.pop()  # C pickle: POP with a mark on top removes the mark
    else:
        raise PickleError("unpickling stack underflow")


def _pop_mark_op(m: Any, pos: int) -> None:
    m._pop_mark()


def _dup(m: Any, pos: int) -> None:
    m._push(m._top())


def _proto(m: Any, pos: int) -> None:
    p = m._read(1)[0]
    if p > 5:
        raise PickleError(f"unsupported pickle protocol: {p}")
    m.proto = p


def _frame(m: Any, pos: int) -> None:
    (n,) = struct.unpack("<Q", m._read(8))
    # The C unpickler only reads the frame ahead; opcodes may cross its end. Same here: the
    # frame must exist, its boundary means nothing.
    if m.pos + n > len(m.data):
        raise PickleError("pickle data was truncated (frame longer than the data)")


def _value(v: Any) -> Callable[[Any, int], None]:
    def op(m: Any, pos: int) -> None:
        m._push(v if m.build else ANY)
    return op


def _int_text(m: Any, pos: int) -> None:
    line = m._readline()
    if line == b"00":
        v: Any = False
    elif line == b"01":
        v = True
    else:
        v = int(line, 0) if line[:2] in (b"0x", b"0X") else int(line)
    m._push(v if m.build else ANY)


def _long_text(m: Any, pos: int) -> None:
    line = m._readline()
    if line.endswith(b"L"):
        line = line[:-1]
    v = int(line)
    m._push(v if m.build else ANY)


def _float_text(m: Any, pos: int) -> None:
    v = float(m._readline())
    m._push(v if m.build else ANY)


def _fixed(fmt: str) -> Callable[[Any, int], None]:
    s = struct.Struct(fmt)

    size, unpack = s.size, s.unpack_from

    def op(m: Any, pos: int) -> None:
        p = m.pos
        if p + size > m.end_limit:
            m._read(size)  # raises the right error
        m.pos = p + size
        m.stack.append(unpack(m.data, p)[0] if m.build else ANY)
    return op


def _long_n(width: int) -> Callable[[Any, int], None]:
    fmt = "<B" if width == 1 else "<i"

    def op(m: Any, pos: int) -> None:
        (n,) = struct.unpack(fmt, m._read(width))
        if n < 0:
            raise PickleError("LONG pickle has negative byte count")
        raw = m._read(n)
        m._push(int.from_bytes(raw, "little", signed=True) if m.build else ANY)
    return op


def _string_text(m: Any, pos: int) -> None:
    line = m._readline().rstrip(b"\r")
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        raise PickleError("the STRING opcode argument must be quoted")
    raw = codecs.escape_decode(line[1:-1])[0]
    m._push(_decode_str(m, raw))


def _decode_str(m: Any, raw: bytes) -> Any:
    # Python 2 str: decoded with the loader's encoding, as torch.load does (utf-8).
    if m.encoding == "bytes":
        return raw if m.build else ANY
    return raw.decode(m.encoding, "strict")


def _sized(width: int, kind: str) -> Callable[[Any, int], None]:
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width]
    signed4 = kind == "binstring"

    def op(m: Any, pos: int) -> None:
        (n,) = struct.unpack("<i" if signed4 else fmt, m._read(width))
        if n < 0:
            raise PickleError("negative byte count")
        if not m.build and kind in ("bytes", "bytearray"):
            m._skip(n)  # a scan needs no payload bytes (a numpy array's data, say)
            m.stack.append(ANY)
            return
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


def _unicode_text(m: Any, pos: int) -> None:
    m._push(m._readline().decode("raw-unicode-escape"))


def _empty(factory: Callable[[], Any]) -> Callable[[Any, int], None]:
    def op(m: Any, pos: int) -> None:
        m._push(factory() if m.build else ANY)
    return op


def _tuple_n(n: int) -> Callable[[Any, int], None]:
    def op(m: Any, pos: int) -> None:
        items = [m._pop() for _ in range(n)][::-1]
        m._push(tuple(items) if m.build else ANY)
    return op


def _tuple(m: Any, pos: int) -> None:
    items = m._pop_mark()
    m._container_check(len(items))
    m._push(tuple(items) if m.build else ANY)


def _list(m: Any, pos: int) -> None:
    items = m._pop_mark()
    m._container_check(len(items))
    m._push(items if m.build else ANY)


def _dict(m: Any, pos: int) -> None:
    items = m._pop_mark()
    m._container_check(len(items) // 2)
    if len(items) % 2:
        raise PickleError("odd number of items for DICT")
    m._push(dict(zip(items[::2], items[1::2])) if m.build else ANY)


def _frozenset(m: Any, pos: int) -> None:
    items = m._pop_mark()
    m._container_check(len(items))
    m._push(frozenset(items) if m.build else ANY)


def _append(m: Any, pos: int) -> None:
    v = m._pop()
    target = m._top()
    if m.build:
        _extend(m, target, [v])


def _appends(m: Any, pos: int) -> None:
    items = m._pop_mark()
    target = m._top()
    if m.build:
        _extend(m, target, items)


def _extend(m: Any, target: Any, items: list) -> None:
    if type(target) is list:
        target.extend(items)
        m._container_check(len(target))
        return
    ext = getattr(type(target), "pickle_extend", None)  # placeholders record what was appended
    if ext is None:
        raise PickleError(f"APPEND to a {type(target).__name__} is not supported")
    ext(target, items)


def _setitem(m: Any, pos: int) -> None:
    v = m._pop()
    k = m._pop()
    target = m._top()
    if m.build:
        _set_items(m, target, [k, v])


def _setitems(m: Any, pos: int) -> None:
    items = m._pop_mark()
    target = m._top()
    if len(items) % 2:
        raise PickleError("odd number of items for SETITEMS")
    if m.build:
        _set_items(m, target, items)


def _set_items(m: Any, target: Any, items: list) -> None:
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


def _additems(m: Any, pos: int) -> None:
    items = m._pop_mark()
    target = m._top()
    if m.build:
        if type(target) is not set:
            raise PickleError(f"ADDITEMS on a {type(target).__name__} is not supported")
        target.update(items)
        m._container_check(len(target))


def _global_op(m: Any, pos: int) -> None:
    m._push(m._text_global(pos))


def _stack_global(m: Any, pos: int) -> None:
    name = m._pop()
    module = m._pop()
    m._push(m._global(module, name, pos))


def _ext(width: int) -> Callable[[Any, int], None]:
    fmt = {1: "<B", 2: "<H", 4: "<i"}[width]

    def op(m: Any, pos: int) -> None:
        (code,) = struct.unpack(fmt, m._read(width))
        # What an extension code names depends on the loading process's copyreg registry: the
        # file cannot be judged, so it counts as a computed (unsafe) global.
        m.record("?", f"extension code {code}", pos)
        if m.build:
            raise PickleError(f"extension code {code} is not supported (resolved by the loader's registry)")
        m._push(ANY)
    return op


def _reduce(m: Any, pos: int) -> None:
    args = m._pop()
    fn = m._pop()
    if not m.build:
        m._callee(fn, pos)
        m._push(ANY)
        return
    if type(args) is not tuple:
        raise PickleError("REDUCE arguments must be a tuple")
    m._push(m.call(fn, args, {}))


def _newobj(m: Any, pos: int) -> None:
    args = m._pop()
    cls = m._pop()
    if not m.build:
        m._callee(cls, pos)
        m._push(ANY)
        return
    if type(args) is not tuple:
        raise PickleError("NEWOBJ arguments must be a tuple")
    m._push(m.call(cls, args, {}))


def _newobj_ex(m: Any, pos: int) -> None:
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


def _inst(m: Any, pos: int) -> None:
    cls = m._text_global(pos)
    args = m._pop_mark()
    m._push(m.call(cls, tuple(args), {}) if m.build else ANY)


def _obj(m: Any, pos: int) -> None:
    args = m._pop_mark()
    if not args:
        raise PickleError("OBJ without a class")
    cls = args.pop(0)
    m._callee(cls, pos)
    m._push(m.call(cls, tuple(args), {}) if m.build else ANY)


def _build(m: Any, pos: int) -> None:
    state = m._pop()
    inst = m._top()
    if m.build:
        if m.build_state is None:
            raise PickleError("BUILD is not supported here")
        m.build_state(inst, state)


def _persid_text(m: Any, pos: int) -> None:
    pid = m._readline().decode("ascii")
    _persistent(m, pid)


def _binpersid(m: Any, pos: int) -> None:
    _persistent(m, m._pop())


def _persistent(m: Any, pid: Any) -> None:
    if not m.build:
        m._push(ANY)
        return
    if m.pload is None:
        raise PickleError("A load persistent id instruction was encountered, but no persistent_load is set")
    m._push(m.pload(pid))


def _memo_put(m: Any, idx: int) -> None:
    if idx < 0:
        raise PickleError("negative PUT argument")
    if idx >= m.lim.memo:  # C pickle sizes its memo array by the largest index
        raise m._over("memo", f"the pickle stores a memo entry at index {idx:,}")
    if idx not in m.memo and len(m.memo) >= m.lim.memo:
        raise m._over("memo", f"the pickle memoizes more than {m.lim.memo:,} objects")
    m.memo[idx] = m._top()


def _put_text(m: Any, pos: int) -> None:
    _memo_put(m, int(m._readline()))


def _binput(m: Any, pos: int) -> None:
    _memo_put(m, m._read(1)[0])


def _long_binput(m: Any, pos: int) -> None:
    # Hot in torch pickles: inlined fast path for an index already in the memo's range.
    p = m.pos
    if p + 4 <= m.end_limit and m.stack and len(m.memo) < m.lim.memo:
        m.pos = p + 4
        fence = m.marks[-1] if m.marks else 0
        idx = _U32(m.data, p)[0]
        if len(m.stack) > fence and idx < m.lim.memo:
            m.memo[idx] = m.stack[-1]
            return
        m.pos = p
    _memo_put(m, struct.unpack("<I", m._read(4))[0])


def _memoize(m: Any, pos: int) -> None:
    _memo_put(m, len(m.memo))


def _memo_get(m: Any, idx: int) -> None:
    try:
        m.stack.append(m.memo[idx])
    except KeyError:
        raise PickleError(f"Memo value not found at index {idx}") from None


def _get_text(m: Any, pos: int) -> None:
    _memo_get(m, int(m._readline()))


def _binget(m: Any, pos: int) -> None:
    _memo_get(m, m._read(1)[0])


def _long_binget(m: Any, pos: int) -> None:
    p = m.pos
    if p + 4 <= m.end_limit:
        m.pos = p + 4
        _memo_get(m, _U32(m.data, p)[0])
        return
    _memo_get(m, struct.unpack("<I", m._read(4))[0])


_U32 = struct.Struct("<I").unpack_from


def _next_buffer(m: Any, pos: int) -> None:
    raise PickleError("pickle stream refers to out-of-band data but no buffers were given")


def _readonly_buffer(m: Any, pos: int) -> None:
    v = m._pop()
    if m.build and isinstance(v, bytearray):
        v = bytes(v)
    m._push(v)


_DISPATCH: dict[int, Callable[[Any, int], None]] = {ord(k): v for k, v in {
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
TABLE: list[Callable[[Any, int], None] | None] = [_DISPATCH.get(i) for i in range(256)]


__all__ = ["PickleError", "ANY", "GLOBAL", "CALL_OF_COMPUTED", "TABLE", "PROTO_BYTE"]
