"""Listing every global a checkpoint's pickles import, by walking opcodes: nothing is imported.

``scan`` covers torch zip archives (every pickle member, nested archives too), legacy torch files
and plain pickles, and folder formats file by file; formats without pickle are trivially safe.
"""
from __future__ import annotations

import io
import os
import pickletools
import zipfile
from dataclasses import dataclass, field
from typing import Any

from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.read.unpickler import GlobalRef, classify, py3_name

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
    from torchkeep.read.formats import detect

    if os.path.isdir(path):
        try:
            cls = detect(path)
            fmt = cls.format
            files = cls(path).files()
        except FormatError:
            raise
        if fmt == "dcp":
            return _scan_dcp(path, cls(path))
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
    _classify_into(rep)
    return rep


def _scan_dcp(path: str, reader: Any) -> ScanReport:
    """A DCP folder: its ``.metadata`` pickle and every torch.save blob packed back to back in
    the ``.distcp`` files (a zip scanner would see only the last one); the DCP reader walks them
    all with the restricted unpickler, which records each global it meets."""
    rep = ScanReport(path=path, format="dcp", safe=True, pickles=[os.path.basename(f) for f in reader.files()])
    try:
        reader.read_tree()
        rep.globals = list(reader.globals())
    except (CorruptCheckpointError, FormatError) as e:
        rep.errors.append(str(e))
    _classify_into(rep)
    return rep


def _classify_into(rep: ScanReport) -> None:
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


def _may_hold_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:4] == b"PK\x03\x04" or _is_pickle(head)


def _non_pickle_format(path: str, head: bytes) -> str:
    from torchkeep.read.formats import detect

    return detect(path).format
