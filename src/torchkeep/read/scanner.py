"""Listing every global a checkpoint's pickles import, by walking opcodes: nothing is imported.

``scan`` finds every pickle a file holds, whatever its name or container (``containers.py``:
torch zip archives as torch reads them, legacy and tar-era torch files, plain pickles, numpy
object arrays, 7z archives), walks each with the same pickle machine the restricted unpickler
runs (``pickles.py``), and classifies the globals. A folder is scanned file by file: every file
that holds a pickle is covered. A damaged pickle still reports the globals before the damage.
"""
from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from torchkeep.read import containers as C
from torchkeep.read import pickles
from torchkeep.errors import CorruptCheckpointError, FormatError, LimitExceededError
from torchkeep.read.unpickler import GlobalRef, global_ref

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
# Names of files that hold pickles in the wild (plus anything that starts like one).
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".npy", ".npz", ".7z",
                   ".joblib", ".tar", ".zip", ".mar", ".distcp", ".data", ".dat")
TEXT_SUFFIXES = (".json", ".txt", ".md", ".yaml", ".yml", ".py", ".csv", ".cfg", ".ini", ".toml",
                 ".safetensors", ".html", ".jinja", ".log", ".gguf", ".onnx", ".model")


def scan_pickle(data: bytes, member: str = "") -> tuple[list[GlobalRef], str | None]:
    """Every global one pickle imports, found by walking its opcodes (nothing is executed), and
    an error message if the pickle is damaged (globals found before the damage are kept)."""
    res = pickles.scan(data, member=member or None)
    err = res.error or (str(res.limit) if res.limit else None)
    return [global_ref(f.module, f.name, member) for f in res.found], err


@dataclass
class ScanReport:
    """What loading a checkpoint's pickles would import, found without importing anything.

    ``safe`` is True only when every global is on the allowlist, nothing is damaged and every
    pickle could be looked into: 'unknown' globals are not dangerous by name but loading them
    with torch.load would import and run their module. ``uninspected`` lists pickles that could
    not be read (encrypted members, 7z without py7zr): unsafe to load. ``code`` lists programs
    the loader would compile and run (TorchScript source): unsafe to load. ``notes`` say what is odd
    about a container even where it did not stop the scan.
    """

    path: str
    format: str
    safe: bool
    globals: list[GlobalRef] = field(default_factory=list)
    unsafe: list[GlobalRef] = field(default_factory=list)
    unknown: list[GlobalRef] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)
    uninspected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)
    limit: LimitExceededError | None = field(default=None, repr=False)

    @property
    def verdict(self) -> str:
        """'unsafe' (exit 1), 'damaged' (exit 2) or 'safe' (exit 0)."""
        if self.unsafe or self.unknown or self.uninspected or self.code:
            return "unsafe"
        return "damaged" if self.errors else "safe"

    def to_dict(self) -> dict[str, Any]:
        def g(lst):
            return [{"global": x.qualname, "member": x.member, "verdict": x.verdict} for x in lst]
        return {"path": self.path, "format": self.format, "safe": self.safe, "verdict": self.verdict,
                "globals": g(self.globals), "unsafe": g(self.unsafe), "unknown": g(self.unknown),
                "errors": self.errors, "pickles": self.pickles, "uninspected": self.uninspected,
                "notes": self.notes, "code": self.code}

    def __str__(self) -> str:
        lines = [f"{self.verdict}: {self.path} ({self.format}, {len(self.globals)} globals)"]
        lines += [f"  unsafe  {g.qualname} in {g.member}" for g in self.unsafe]
        lines += [f"  unknown {g.qualname} in {g.member}" for g in self.unknown]
        lines += [f"  code    {c}" for c in self.code]
        lines += [f"  not inspected: {u}" for u in self.uninspected]
        lines += [f"  damaged: {e}" for e in self.errors]
        return "\n".join(lines)


# --- walking the pickles of one blob ----------------------------------------------------------

def _walk(rep: ScanReport, data: Any, start: int, member: str) -> pickles.WalkResult:
    res = pickles.scan(data, start, path=rep.path, member=member)
    rep.pickles.append(member)
    rep.globals.extend(global_ref(f.module, f.name, member) for f in res.found)
    if res.limit is not None:
        rep.errors.append(f"{member}: {res.limit.detail}")
        rep.limit = rep.limit or res.limit
    elif res.error is not None:
        what = "damaged pickle" + (" (the globals before the damage would still be imported)"
                                   if res.found else "")
        rep.errors.append(f"{member}: {what}: {res.error}")
    return res


def _more(rep: ScanReport, data: Any, pos: int, member: str, n: int = 0) -> None:
    """Further pickles after a blob's last expected one (``pickle.load`` called again would run
    them; picklescan looks at them too): scanned while they parse."""
    while pos < len(data) and n < 64:
        probe = pickles.scan(data, pos, max_ops=4096)
        if probe.error is not None and not probe.found and probe.limit is None:
            return  # not a pickle: raw bytes after the last one
        res = _walk(rep, data, pos, f"{member}+{n + 1}")
        if res.end < 0:
            return
        pos, n = res.end, n + 1


def _legacy_value(data: Any, start: int) -> Any:
    from torchkeep.read.unpickler import restricted_walk

    try:
        return restricted_walk(data, start)[0]
    except Exception:  # not a plain value: the magic number check fails, as torch's would
        return None


def _scan_blob(rep: ScanReport, blob: C.Blob) -> None:
    data, name = blob.data, blob.name
    if blob.layout == "legacy":
        # torch.load on a non-zip file unpickles the first pickle (the magic number) with full
        # pickle semantics; only when it is the magic number does it go on to four more.
        res = _walk(rep, data, 0, f"{name}pickle 0" if name else "pickle 0")
        if res.end < 0:
            return
        if res.ops > 8 or _legacy_value(data, 0) != MAGIC_NUMBER:  # the magic is 3 opcodes
            _more(rep, data, res.end, name + "pickle 0")
            return
        pos = res.end
        for i, label in enumerate(("protocol", "sys info", "object", "storage keys")):
            res = _walk(rep, data, pos, f"{name}{label}")
            if res.end < 0:
                return
            pos = res.end
        return
    if blob.layout.startswith("tar:"):
        _scan_tar_member(rep, blob)
        return
    res = _walk(rep, data, blob.start, name)
    if res.end >= 0:
        _more(rep, data, res.end, name)


def _scan_tar_member(rep: ScanReport, blob: C.Blob) -> None:
    """A tar-era member: 'storages' and 'tensors' interleave pickles with raw records."""
    import struct

    data, name, kind = blob.data, blob.name, blob.layout[4:]
    res = _walk(rep, data, 0, name)
    if res.end < 0 or kind not in ("storages", "tensors"):
        if res.end >= 0:
            _more(rep, data, res.end, name)
        return
    count = _legacy_value(data, 0)
    pos = res.end
    try:
        for i in range(int(count) if isinstance(count, int) else 0):
            res = _walk(rep, data, pos, f"{name}[{i}]")
            if res.end < 0:
                return
            if kind == "storages":
                args = _legacy_value(data, pos)
                itemsize = args[2].dtype.itemsize
                (n,) = struct.unpack("<q", bytes(data[res.end:res.end + 8]))
                pos = res.end + 8 + n * itemsize
            else:
                (ndim,) = struct.unpack("<i", bytes(data[res.end:res.end + 4]))
                pos = res.end + 8 + 16 * ndim + 8
        _more(rep, data, pos, name)
    except Exception as e:  # a layout torchkeep cannot follow: the rest is not looked at
        rep.uninspected.append(f"{name} after byte {pos} (tar-era layout not followed: {type(e).__name__})")


# --- files and folders --------------------------------------------------------------------------

def _torch_view(path: str, found: C.Found) -> None:
    """The data.pkl torch's own reader returns, when it differs from every member scanned."""
    import torch

    from torchkeep import limits as _limits

    try:
        reader = torch._C.PyTorchFileReader(path)
        if not reader.has_record("data.pkl"):
            return
        if reader.get_record_size("data.pkl") > _limits.current().pickle_bytes:
            raise _limits.exceeded("pickle_bytes", "data.pkl as torch reads it", path=path)
        data = bytes(reader.get_record("data.pkl"))
    except RuntimeError as e:
        found.notes.append(f"torch's reader refuses this archive ({str(e).splitlines()[0][:200]})")
        return
    if any(bytes(b.data[b.start:]) == data for b in found.blobs if isinstance(b.data, bytes)):
        return
    found.notes.append("torch's reader sees a data.pkl that differs from the archive's members "
                       "(the archive is ambiguous); it is scanned as 'data.pkl (as torch reads it)'")
    found.blobs.append(C.Blob("data.pkl (as torch reads it)", data))


def _collect(path: str, budget: C.Budget, tmp: str) -> tuple[str, C.Found]:
    """The format of a single file and every pickle in it."""
    found = C.Found()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise FormatError("the file is empty", path=path)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    head = bytes(mm[:512])
    if head[:4] == C.ZIP_MAGIC:
        try:
            C.zip_pickles(mm, path, budget, found=found)
        except CorruptCheckpointError as e:
            # Python's zipfile refuses it; torch's reader may not: scan what torch would read.
            found.notes.append(f"{e.detail}; torch's own reader is tried as well")
            _torch_view(path, found)
            if not found.blobs:
                C.local_pickles(mm, path, budget, found)
                found.damaged = f"{e.detail}: torch.load cannot open it; the members were found " \
                                "from their local headers"
            if not found.blobs:
                raise
            return "torch-zip", found
        _torch_view(path, found)
        return "torch-zip", found
    if head[:6] == C.NPY_MAGIC:
        C.npy_pickle(mm, "", path, found)
        return "npy", found
    if head[:6] == C.SEVENZ_MAGIC:
        for f in C.sevenz_files(path, tmp, found, budget):
            _, inner = _collect(f, budget, tempfile.mkdtemp(dir=tmp))
            rel = os.path.relpath(f, tmp) + "!"
            for b in inner.blobs:
                b.name = rel + b.name
            found.blobs += inner.blobs
            found.notes += inner.notes
            found.uninspected += inner.uninspected
        return "7z", found
    if C.is_tar(head):
        C.tar_pickles(path, "", path, found, budget)
        return "torch-tar", found
    probe = pickles.scan(mm, 0, max_ops=4096)  # a few thousand valid opcodes make it a pickle
    if probe.found or probe.end >= 0 or probe.limit is not None:
        found.blobs.append(C.Blob("", mm, 0, layout="legacy"))
        return "pickle", found
    return "", found


def _scan_file(path: str, budget: C.Budget) -> ScanReport:
    with tempfile.TemporaryDirectory(prefix="torchkeep-scan-") as tmp:
        fmt, found = _collect(path, budget, tmp)
        if not fmt:
            from torchkeep.read.formats import detect

            return ScanReport(path=path, format=detect(path).format, safe=True)
        rep = ScanReport(path=path, format=fmt, safe=True, notes=list(found.notes),
                         uninspected=list(found.uninspected), code=list(found.code))
        if found.damaged:
            rep.errors.append(found.damaged)
        for blob in found.blobs:
            _scan_blob(rep, blob)
    _finish(rep)
    return rep


def _finish(rep: ScanReport) -> None:
    seen = set()
    rep.unsafe, rep.unknown = [], []
    for g in rep.globals:
        if (g.qualname, g.verdict) in seen:
            continue
        seen.add((g.qualname, g.verdict))
        if g.verdict == "unsafe":
            rep.unsafe.append(g)
        elif g.verdict == "unknown":
            rep.unknown.append(g)
    rep.errors += [n for n in rep.notes if "CRC mismatch" in n or "disagree" in n]
    rep.safe = rep.verdict == "safe"


def _may_hold_pickle(path: str) -> bool:
    """Whether a file in a folder is scanned: a name pickles go by, a container's magic, or
    content that walks as a pickle (text files by their name are not probed)."""
    low = path.lower()
    if low.endswith(PICKLE_SUFFIXES):
        return True
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] == C.ZIP_MAGIC or head[:6] in (C.NPY_MAGIC, C.SEVENZ_MAGIC) or C.is_tar(head) or \
            (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return True
    if low.endswith(TEXT_SUFFIXES) or not head or not pickles.looks_like_pickle(head):
        return False
    with open(path, "rb") as f:  # e.g. a protocol 0 pickle without a suffix
        probe = pickles.scan(f.read(1 << 20), max_ops=4096)
    return probe.end >= 0 or bool(probe.found)


def _scan_folder(path: str) -> ScanReport:
    from torchkeep.read.formats import detect

    try:
        cls = detect(path)
        fmt, reader = cls.format, cls(path)
    except FormatError:
        fmt, reader = "folder", None
    rep = ScanReport(path=path, format=fmt, safe=True)
    covered: set[str] = set()
    if fmt == "dcp":
        sub = _scan_dcp(path, reader)
        covered = {os.path.abspath(f) for f in reader.files()}
        _merge(rep, sub, "")
    budget = C.Budget()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(root, name)
            if os.path.abspath(full) in covered or os.path.islink(full) or not _may_hold_pickle(full):
                continue
            try:
                sub = _scan_file(full, budget)
            except LimitExceededError:
                raise
            except (FormatError, CorruptCheckpointError) as e:
                if full.lower().endswith((".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt")):
                    rep.errors.append(str(e))
                continue
            _merge(rep, sub, os.path.relpath(full, path))
    _finish(rep)
    return rep


def _merge(rep: ScanReport, sub: ScanReport, rel: str) -> None:
    tag = f"{rel}:" if rel else ""
    rep.globals += [GlobalRef(g.module, g.name, tag + g.member, g.verdict) for g in sub.globals]
    rep.errors += [f"{tag}{e}" for e in sub.errors]
    rep.pickles += [f"{tag}{p}" for p in sub.pickles]
    rep.uninspected += [f"{tag}{u}" for u in sub.uninspected]
    rep.code += [f"{tag}{c}" for c in sub.code]
    rep.notes += [f"{tag}{n}" for n in sub.notes]
    rep.limit = rep.limit or sub.limit


def scan(path: str | os.PathLike) -> ScanReport:
    """List every global the pickles in ``path`` import, each classified safe/unsafe/unknown.

    Covers every pickle a file holds whatever its name or container, and every such file in a
    folder; formats without pickle (safetensors) are trivially safe. Never imports or executes
    anything from the file. Input over a limit (``torchkeep.limits``) raises LimitExceededError
    unless an unsafe global was already found (then the report says unsafe and names the limit).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError("no such file or folder", path=path)
    rep = _scan_folder(path) if os.path.isdir(path) else _scan_file(path, C.Budget())
    if rep.limit is not None and rep.verdict != "unsafe":
        raise rep.limit
    return rep


def _scan_dcp(path: str, reader: Any) -> ScanReport:
    """A DCP folder: its ``.metadata`` pickle and every torch.save blob packed back to back in
    the ``.distcp`` files; the DCP reader walks them all with the restricted unpickler (the same
    pickle machine), which records each global it meets."""
    rep = ScanReport(path=path, format="dcp", safe=True, pickles=[os.path.basename(f) for f in reader.files()])
    try:
        reader.read_tree()
        rep.globals = list(reader.globals())
    except (CorruptCheckpointError, FormatError) as e:
        rep.errors.append(str(e))
    _finish(rep)
    return rep
