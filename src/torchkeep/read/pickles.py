"""One pickle machine for every dialect, used both to scan and to unpickle.

:class:`PickleMachine` executes pickle opcodes (protocols 0 to 5) with an explicit stack, the
way CPython's C unpickler does: marks as a separate stack, frames as read-ahead hints only,
memo by index, ``GLOBAL``/``INST`` text names, ``STACK_GLOBAL`` names from the stack, extension
codes (the opcodes themselves are ``pickleops.py``). It runs in two modes over the same opcode loop, so what is scanned is exactly what would
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

from dataclasses import dataclass, field
from typing import Any, Callable

from torchkeep.errors import LimitExceededError
from torchkeep import limits as _limits
from torchkeep.read.pickleops import (ANY, CALL_OF_COMPUTED, GLOBAL, PROTO_BYTE, TABLE,  # noqa: F401
                                      PickleError, _stop)


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

    def _skip(self, n: int) -> None:
        """Advance past ``n`` bytes without copying them (same bounds as :meth:`_read`)."""
        p = self.pos
        if p + n > self.end_limit:
            self._read(n)  # raises the right error
        self.pos = p + n

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

    def record(self, module: str, name: str, pos: int) -> None:
        self.found.append(Found(module, name, pos))

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
        table = TABLE
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
