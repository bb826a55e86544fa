"""Finding every pickle a file holds, whatever wraps it, the way the loaders that would run it
read it: zip archives member by member as torch's reader (miniz) does, numpy ``.npy``/``.npz``
object arrays, tar-era torch files, legacy torch streams, 7z archives (with py7zr).

Each pickle comes back as a :class:`Blob` (its bytes and a member name) together with notes on
anything odd about the container (duplicate names, headers that disagree, flag bits, bad CRCs).
Decompression is bounded by :mod:`torchkeep.limits`.
"""
from __future__ import annotations

import ast
import io
import os
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from torchkeep import limits as _limits
from torchkeep.errors import CorruptCheckpointError, FormatError

ZIP_MAGIC = b"PK\x03\x04"
NPY_MAGIC = b"\x93NUMPY"
SEVENZ_MAGIC = b"7z\xbc\xaf\x27\x1c"
_LOCAL = struct.Struct("<4s5H3L2H")
_FLAG_NAMES = {0x1: "encrypted", 0x20: "compressed patch data", 0x40: "strong encryption"}


@dataclass
class Blob:
    """One pickle to scan: ``data`` from byte ``start``; ``layout`` says how many pickles follow
    ('one', 'legacy' stream, 'tar:<member>')."""

    name: str
    data: Any
    start: int = 0
    layout: str = "one"


@dataclass
class Found:
    """Pickles in a file, notes on its container, and members that could not be looked into."""

    blobs: list[Blob] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    uninspected: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)   # programs the loader compiles and runs
    damaged: str | None = None    # the container itself is broken (its pickles may still be found)


class Budget:
    """Decompressed bytes left for one scan (``limits.decompressed``)."""

    def __init__(self) -> None:
        self.left = _limits.current().decompressed

    def take(self, n: int, path: str) -> None:
        self.left -= n
        if self.left < 0:
            raise _limits.exceeded("decompressed", "the archives decompress to more bytes than allowed",
                                   path=path)


def is_tar(data: bytes) -> bool:
    return len(data) >= 262 and data[257:262] == b"ustar"


# --- zip, as miniz reads it -------------------------------------------------------------------

def _member_bytes(raw: Any, info: zipfile.ZipInfo, zf: zipfile.ZipFile, path: str, budget: Budget,
                  found: Found, name: str, head_only: bool = False) -> bytes | None:
    """A member's bytes: data offset from the local header's name and extra lengths, sizes and
    method from the central directory (what miniz does); CRC not enforced (torch does not)."""
    lim = _limits.current()
    off = info.header_offset
    hdr = bytes(raw[off:off + _LOCAL.size])
    if len(hdr) < _LOCAL.size or hdr[:4] != ZIP_MAGIC:
        found.notes.append(f"{name}: no local header at byte {off} (torch cannot read this member)")
        return None
    fields = _LOCAL.unpack(hdr)
    lflags, lmethod, nlen, xlen = fields[2], fields[3], fields[9], fields[10]
    lname = bytes(raw[off + _LOCAL.size:off + _LOCAL.size + nlen])
    if not head_only:
        if lname.decode("utf-8", "replace") != info.filename and lname.decode("cp437", "replace") != info.filename:
            found.notes.append(f"{name}: the local header names it {lname!r}: the archive's two "
                               "directories disagree (torch reads the central one)")
        if lmethod != info.compress_type or lflags != info.flag_bits:
            found.notes.append(f"{name}: local header and central directory disagree on method/flags")
    bad = [v for k, v in _FLAG_NAMES.items() if info.flag_bits & k]
    if bad and not head_only:
        found.notes.append(f"{name}: flag bits {info.flag_bits:#x} ({', '.join(bad)}); torch.load "
                           "refuses such members")
    start = off + _LOCAL.size + nlen + xlen
    if not head_only and info.file_size > lim.pickle_bytes:  # judged before inflating anything
        raise _limits.exceeded("pickle_bytes", f"member {name} declares {info.file_size:,} bytes", path=path)
    if not head_only and info.file_size > max(1 << 20, lim.ratio * max(1, info.compress_size)):
        raise _limits.exceeded("ratio", f"member {name} declares {info.file_size:,} bytes from "
                               f"{info.compress_size:,} compressed", path=path)
    comp = bytes(raw[start:start + info.compress_size]) if not head_only else \
        bytes(raw[start:start + min(info.compress_size, 4096)])
    if info.compress_type == zipfile.ZIP_STORED:
        out = comp if not head_only else comp[:64]
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        d = zlib.decompressobj(-15)
        cap = 64 if head_only else min(lim.pickle_bytes, info.file_size) + 1  # miniz stops there too
        try:
            out = d.decompress(comp, cap)
        except zlib.error as e:
            found.notes.append(f"{name}: cannot be inflated ({e})")
            return None
        if not head_only:
            if len(out) > lim.pickle_bytes:
                raise _limits.exceeded("pickle_bytes", f"member {name} inflates past the limit", path=path)
            if len(out) > max(1 << 20, lim.ratio * max(1, info.compress_size)):
                raise _limits.exceeded("ratio", f"member {name} inflates {len(out) // max(1, info.compress_size)}x",
                                       path=path)
    else:  # bz2/lzma: torch cannot read them, numpy's np.load (zipfile) can
        try:
            with zf.open(info) as f:
                out = f.read(64 if head_only else lim.pickle_bytes + 1)
        except Exception as e:  # encrypted, unsupported, damaged
            found.notes.append(f"{name}: cannot be decompressed ({type(e).__name__}: {e})")
            return None
        if len(out) > lim.pickle_bytes:
            raise _limits.exceeded("pickle_bytes", f"member {name} decompresses past the limit", path=path)
    if not head_only:
        budget.take(len(out), path)
        if zlib.crc32(out) != info.CRC:
            found.notes.append(f"{name}: CRC mismatch (damaged); torch.load does not check CRCs "
                               "and would still run this pickle")
    return out


def zip_pickles(raw: Any, path: str, budget: Budget, prefix: str = "", depth: int = 0,
                found: Found | None = None) -> Found:
    """Every pickle in a zip archive (and in zips, .npy files and tars stored in it)."""
    found = found if found is not None else Found()
    lim = _limits.current()
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw) if isinstance(raw, (bytes, bytearray)) else _MapFile(raw))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"zip archive {prefix or ''}is damaged: {e}", path=path,
                                     hint="was the write interrupted?") from None
    infos = zf.infolist()
    if len(infos) > lim.members:
        raise _limits.exceeded("members", f"the archive has {len(infos):,} members", path=path)
    seen: dict[str, str] = {}
    for info in infos:
        low = info.filename.lower()
        if low in seen:
            kind = "twice" if seen[low] == info.filename else f"also as {seen[low]!r} (differing in case)"
            found.notes.append(f"{prefix}{info.filename}: the archive holds this name {kind}; torch "
                               "matches names ignoring case and may read either, both are scanned")
        seen.setdefault(low, info.filename)
    for info in infos:
        if info.is_dir():
            continue
        name = prefix + info.filename
        if _program(info.filename, name, found):
            continue
        head = _member_bytes(raw, info, zf, path, budget, found, name, head_only=True) or b""
        is_storage = "/data/" in "/" + info.filename and not info.filename.endswith(".pkl")
        nested = head[:4] == ZIP_MAGIC or head[:6] == NPY_MAGIC or head[:6] == SEVENZ_MAGIC
        from torchkeep.read.pickles import looks_like_pickle

        wanted = info.filename.endswith((".pkl", ".pickle", ".npy")) or nested or \
            (looks_like_pickle(head) and not is_storage)
        if info.flag_bits & 0x41 and info.filename.endswith((".pkl", ".pickle", ".npy")):
            found.uninspected.append(f"{name} (encrypted)")
        if not wanted or (is_storage and not nested):
            continue
        data = _member_bytes(raw, info, zf, path, budget, found, name)
        if data is None:
            if info.filename.endswith((".pkl", ".pickle")) or looks_like_pickle(head):
                found.uninspected.append(name)
            continue
        _dispatch(data, name, path, budget, depth, found)
    return found


def _program(member: str, name: str, found: Found) -> bool:
    """Record a member that holds a program rather than a pickle; True when it is TorchScript
    source (never probed as a pickle: its text can start like a protocol-0 one)."""
    inside = "/" + member
    if "/code/" in inside and member.endswith(".py"):
        found.code.append(f"{name} (TorchScript source: torch.jit.load compiles and runs it)")
        return True
    if "/models/" in inside and member.endswith(".json") and "/data/" not in inside:
        found.notes.append(f"{name}: an exported program (torch.export): torch.export.load rebuilds "
                           "its graph, resolving the operators it names; running the program "
                           "calls them")
    return False


def local_pickles(raw: Any, path: str, budget: Budget, found: Found) -> None:
    """A zip without a readable central directory (a write cut short): its members found by
    walking the local headers from the start, as a streaming unzip would, and their pickles
    kept (the globals of a damaged archive are still worth reporting)."""
    from torchkeep.read.pickles import looks_like_pickle

    lim = _limits.current()
    pos, count = 0, 0
    while bytes(raw[pos:pos + 4]) == ZIP_MAGIC and count < lim.members:
        fields = _LOCAL.unpack(bytes(raw[pos:pos + _LOCAL.size]).ljust(_LOCAL.size, b"\0"))
        method, csize, usize, nlen, xlen = fields[3], fields[7], fields[8], fields[9], fields[10]
        name = bytes(raw[pos + _LOCAL.size:pos + _LOCAL.size + nlen]).decode("utf-8", "replace")
        start = pos + _LOCAL.size + nlen + xlen
        if fields[2] & 0x8 and csize == 0:  # sizes in a data descriptor after the data
            csize = _descriptor_size(raw, start, lim.pickle_bytes)
            usize = csize if method == zipfile.ZIP_STORED else lim.pickle_bytes
        comp = bytes(raw[start:start + min(csize, lim.pickle_bytes)])
        if method == zipfile.ZIP_DEFLATED:
            try:
                data = zlib.decompressobj(-15).decompress(comp, min(usize, lim.pickle_bytes) + 1)
            except zlib.error:
                data = b""
        else:
            data = comp
        budget.take(len(data), path)
        is_storage = "/data/" in "/" + name and not name.endswith(".pkl")
        if not is_storage and (name.endswith((".pkl", ".pickle")) or looks_like_pickle(data[:8])):
            found.blobs.append(Blob(f"{name} (from its local header)", data))
        pos, count = start + csize + (16 if fields[2] & 0x8 else 0), count + 1


def _descriptor_size(raw: Any, start: int, limit: int) -> int:
    """The size of member data that ends at a data descriptor whose size field matches; the
    rest of the file (up to ``limit``) when none does (the file was cut inside the member)."""
    q = start
    while True:
        q = raw.find(b"PK\x07\x08", q, min(len(raw), start + limit + 1))
        if q < 0:
            return min(len(raw) - start, limit)
        if struct.unpack("<I", bytes(raw[q + 8:q + 12]).ljust(4, b"\0"))[0] == q - start:
            return q - start
        q += 4


def _dispatch(data: bytes, name: str, path: str, budget: Budget, depth: int, found: Found) -> None:
    if data[:4] == ZIP_MAGIC:
        if depth >= 3:
            found.uninspected.append(f"{name} (archive nested more than 3 deep)")
        else:
            zip_pickles(data, path, budget, name + "!", depth + 1, found)
    elif data[:6] == NPY_MAGIC:
        npy_pickle(data, name, path, found)
    elif data[:6] == SEVENZ_MAGIC:
        found.uninspected.append(f"{name} (7z archive inside an archive)")
    elif is_tar(data):
        tar_pickles(io.BytesIO(data), name + "!", path, found, budget)
    else:
        found.blobs.append(Blob(name, data))


class _MapFile(io.RawIOBase):
    """A read-only file object over a bytes-like buffer (an mmap), for zipfile."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else (self.pos + off if whence == 1 else len(self.buf) + off)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        chunk = self.buf[self.pos:self.pos + len(b)]
        b[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


# --- numpy ----------------------------------------------------------------------------------

def npy_pickle(data: Any, name: str, path: str, found: Found) -> None:
    """A ``.npy`` whose dtype holds objects is a pickle after its header (np.load with
    allow_pickle=True runs it); plain dtypes are raw bytes."""
    try:
        major = data[6]
        if major == 1:
            (hlen,) = struct.unpack("<H", bytes(data[8:10]))
            hstart = 10
        else:
            (hlen,) = struct.unpack("<I", bytes(data[8:12]))
            hstart = 12
        if hlen > 1 << 16:
            raise ValueError(f"header of {hlen} bytes")
        header = ast.literal_eval(bytes(data[hstart:hstart + hlen]).decode("latin1"))
        descr = header["descr"]
        import numpy as np

        has_object = np.dtype(descr).hasobject if not isinstance(descr, str) or len(descr) < 64 else True
    except Exception as e:  # damaged header: np.load refuses it too
        found.notes.append(f"{name}: numpy header cannot be read ({type(e).__name__})")
        return
    if has_object:
        found.blobs.append(Blob(name, data, hstart + hlen))


# --- tar-era torch files ---------------------------------------------------------------------

def tar_pickles(source: Any, prefix: str, path: str, found: Found, budget: Budget) -> None:
    """Each member of a tar (torch < 0.4 wrote 'sys_info', 'pickle', 'storages', 'tensors'),
    as a stream of pickles the way torch's legacy tar loader reads them."""
    lim = _limits.current()
    try:
        tf = tarfile.open(fileobj=source if hasattr(source, "read") else None,
                          name=None if hasattr(source, "read") else source, mode="r:")
        members = []
        for m in tf:
            members.append(m)
            if len(members) > lim.members:
                raise _limits.exceeded("members", "the tar archive has too many members", path=path)
    except tarfile.TarError as e:
        raise CorruptCheckpointError(f"tar archive is damaged: {e}", path=path) from None
    for m in members:
        if not m.isfile():
            continue
        if m.size > lim.pickle_bytes:
            raise _limits.exceeded("pickle_bytes", f"tar member {m.name} is {m.size:,} bytes", path=path)
        budget.take(m.size, path)
        data = tf.extractfile(m).read()
        found.blobs.append(Blob(prefix + m.name, data, 0, layout=f"tar:{m.name}"))


# --- 7z ---------------------------------------------------------------------------------------

def sevenz_files(path: str, tmpdir: str, found: Found, budget: Budget) -> list[str]:
    """Extract a 7z archive into ``tmpdir`` (bounded by the declared sizes) and list its files;
    without py7zr the archive is reported as not inspected."""
    try:
        import py7zr
    except ImportError:
        found.uninspected.append(f"{os.path.basename(path)} (7z archive: install py7zr to look inside)")
        return []
    lim = _limits.current()
    try:
        with py7zr.SevenZipFile(path, "r") as z:
            if z.needs_password():
                found.uninspected.append(f"{os.path.basename(path)} (encrypted 7z archive)")
                return []
            infos = z.list()
            if len(infos) > lim.members:
                raise _limits.exceeded("members", "the 7z archive has too many members", path=path)
            total = sum(int(i.uncompressed or 0) for i in infos)
            budget.take(total, path)  # judged on the declared sizes, before extracting
            z.extractall(path=tmpdir)
    except (FormatError,):
        raise
    except Exception as e:  # damaged or unsupported archive
        found.uninspected.append(f"{os.path.basename(path)} (7z archive cannot be read: {type(e).__name__})")
        return []
    out = []
    for root, _dirs, files in os.walk(tmpdir):
        for f in files:
            full = os.path.join(root, f)
            if not os.path.islink(full):
                out.append(full)
    return sorted(out)


__all__ = ["Blob", "Found", "Budget", "zip_pickles", "local_pickles", "npy_pickle", "tar_pickles", "sevenz_files",
           "is_tar", "ZIP_MAGIC", "NPY_MAGIC", "SEVENZ_MAGIC"]
