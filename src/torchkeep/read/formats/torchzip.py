"""torch.save zip archives (the default since PyTorch 1.6), read without torch.load.

The pickle (``<archive>/data.pkl``) goes through the restricted unpickler; every storage it
names becomes a lazy reference to the member ``<archive>/data/<key>``, whose bytes are read with
one positioned read straight into the tensor's memory when asked for.
"""
from __future__ import annotations

import mmap
import os
import struct
import sys
import zipfile
from typing import Any, Sequence

import torch

from torchkeep import limits as _limits
from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.read.formats.base import Reader, TensorRef
from torchkeep.read.formats.base import contiguous_stride as _contiguous_stride
from torchkeep.read.unpickler import (GlobalRef, StorageRef, restricted_load_with_globals,
                                      storage_from_pid)

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_SIG = b"PK\x03\x04"
_CONSTANTS = "constants/"


def pread_into(fd: int, buf: torch.Tensor, offset: int, *, path: str, what: str) -> None:
    """Fill the uint8 tensor ``buf`` from ``fd`` at ``offset``; CorruptCheckpointError on EOF."""
    view = memoryview(buf.numpy()).cast("B")
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
        if n <= 0:
            raise CorruptCheckpointError(
                f"{what} declares {total} bytes but the file ends after {done} of them",
                path=path, hint="file truncated?")
        done += n


def materialize(buf: torch.Tensor, ref: TensorRef, *, path: str, name: str) -> torch.Tensor:
    """The tensor ``ref`` describes, as a view into the raw storage bytes ``buf``."""
    itemsize = ref.dtype.itemsize
    usable = (buf.numel() // itemsize) * itemsize
    typed = buf[:usable].view(ref.dtype) if usable else torch.empty(0, dtype=ref.dtype)
    stride = ref.stride if ref.stride is not None else _contiguous_stride(ref.shape)
    if ref.numel:
        if any(s < 0 for s in ref.shape) or any(s < 0 for s in stride) or ref.offset < 0:
            raise CorruptCheckpointError("negative size, stride or offset", path=path, entry=name)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, stride))
        if last >= typed.numel():
            raise CorruptCheckpointError(
                f"tensor of shape {tuple(ref.shape)} reaches element {last} but its storage holds "
                f"{typed.numel()} {str(ref.dtype).replace('torch.', '')} elements",
                path=path, entry=name, hint="file truncated or damaged?")
        return typed.as_strided(ref.shape, stride, ref.offset)
    return torch.empty(ref.shape, dtype=ref.dtype)


class TorchZipReader(Reader):
    format = "torch-zip"
    keeps_order = True
    description = "torch.save zip archive"

    def __init__(self, path: str, *, trust: bool = False) -> None:
        super().__init__(path, trust=trust)
        self._zf: zipfile.ZipFile | None = None
        self._fast: Any = None
        self._mm: mmap.mmap | None = None
        self._prefix = ""
        self._storages: dict[str, StorageRef] = {}
        self._seen: list[GlobalRef] = []
        self._big_endian = False
        self.kind: str | None = None
        self.weights_at: str | None = None

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        return head[:4] == _LOCAL_SIG

    # -- archive -----------------------------------------------------------------------
    # torch's own C++ zip reader parses the central directory about ten times faster than
    # Python's zipfile (it matters for checkpoints with thousands of tensors); zipfile is the
    # fallback that also gives the precise error for archives torch's reader refuses.
    def _zip(self) -> None:
        if self._fast is not None or self._zf is not None:
            return
        try:
            fast = torch._C.PyTorchFileReader(self.path)
            if fast.has_record("data.pkl"):
                self._fast = fast
                if fast.has_record("constants.pkl"):
                    self.kind = "torchscript"
                if fast.has_record("byteorder"):
                    self._big_endian = bytes(fast.get_record("byteorder")).strip() == b"big"
                return
        except RuntimeError:
            pass
        try:
            zf = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise CorruptCheckpointError(
                f"zip archive is truncated or damaged ({e})", path=self.path,
                hint="was the write interrupted? torch.save writes the archive's directory last") from None
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            pkls = [n for n in zf.namelist() if n == "data.pkl"]
        if not pkls:
            names = ", ".join(zf.namelist()[:5])
            zf.close()
            raise FormatError(f"zip archive without data.pkl (members: {names}): not a torch.save file",
                              path=self.path)
        self._prefix = pkls[0][: -len("data.pkl")]
        names = set(zf.namelist())
        if self._prefix + "constants.pkl" in names:
            self.kind = "torchscript"
        bo = self._prefix + "byteorder"
        if bo in names:
            self._big_endian = zf.read(bo).strip() == b"big"
        self._zf = zf

    def _read_record(self, name: str) -> bytes:
        self._zip()
        try:
            if self._fast is not None:
                return bytes(self._fast.get_record(name))
            return self._zf.read(self._prefix + name)
        except KeyError:
            raise CorruptCheckpointError(f"{name} is missing from the archive", path=self.path) from None
        except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise CorruptCheckpointError(f"cannot read {name}: {str(e).splitlines()[0]}",
                                         path=self.path, hint="file truncated or damaged?") from None

    def _record_info(self, name: str) -> tuple[int, int]:
        """(local header offset, stored size) of a member; CorruptCheckpointError if absent."""
        if self._fast is not None:
            if not self._fast.has_record(name):
                raise CorruptCheckpointError(f"storage {name} is missing from the archive",
                                             path=self.path)
            return self._fast.get_record_header_offset(name), self._fast.get_record_size(name)
        try:
            info = self._zf.getinfo(self._prefix + name)
        except KeyError:
            raise CorruptCheckpointError(f"storage {name} is missing from the archive",
                                         path=self.path) from None
        return info.header_offset, info.file_size

    def read_tree(self) -> Any:
        # torch's reader inflates a record to the size the directory declares: check it first.
        self._zip()
        size = self._fast.get_record_size("data.pkl") if self._fast is not None else \
            self._zf.getinfo(self._prefix + "data.pkl").file_size
        if size > _limits.current().pickle_bytes:
            raise _limits.exceeded("pickle_bytes", f"data.pkl declares {size:,} bytes", path=self.path)
        data = self._read_record("data.pkl")
        member = self._prefix + "data.pkl"
        obj, self._seen = restricted_load_with_globals(data, path=self.path, member=member,
                                                       persistent_load=self._persistent_load)
        if self.kind == "torchscript":
            from torchkeep.read.formats.torchscript import script_tree

            consts, seen = restricted_load_with_globals(
                self._read_record("constants.pkl"), path=self.path,
                member=self._prefix + "constants.pkl", persistent_load=self._constants_load)
            self._seen.extend(seen)
            self.weights_at = "module"
            return script_tree(obj, consts, self.path)
        return obj

    def _constants_load(self, pid: Any) -> Any:
        # constants.pkl names storages under constants/, a namespace apart from data/
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
            pid = (pid[0], pid[1], f"{_CONSTANTS}{pid[2]}", *pid[3:])
        return self._persistent_load(pid)

    def _persistent_load(self, pid: Any) -> Any:
        typename, ref, _ = storage_from_pid(pid, self, self._storages, path=self.path, fields=5)
        if ref is None:
            raise CorruptCheckpointError(f"unknown persistent id {typename!r}", path=self.path)
        return ref

    def check_storages(self) -> list[str]:
        """Storages the pickle names that the zip directory lacks or holds short, without
        reading tensor bytes."""
        self._zip()
        out = []
        for st in self._storages.values():
            need = st.numel * st.dtype.itemsize
            name = _member(st.key)
            try:
                _, size = self._record_info(name)
            except CorruptCheckpointError:
                out.append(f"storage {name} ({need} bytes) is missing from the archive")
                continue
            if size < need:
                out.append(f"storage {name} holds {size} bytes but its tensors need {need}")
        return out

    def globals(self) -> list[GlobalRef]:
        if not self._seen:
            self.read_tree()
        return list(self._seen)

    # -- bytes -------------------------------------------------------------------------
    def _member_span(self, key: str, nbytes: int) -> int:
        """Absolute offset of a storage's bytes (-1 if compressed), after checking its size."""
        name = _member(key)
        header_offset, size = self._record_info(name)
        if size < nbytes:
            raise CorruptCheckpointError(
                f"storage {name} holds {size} bytes but its tensors need {nbytes}",
                path=self.path, hint="file damaged?")
        with open(self.path, "rb") as f:
            f.seek(header_offset)
            head = f.read(_LOCAL_HEADER.size)
        if len(head) < _LOCAL_HEADER.size or head[:4] != _LOCAL_SIG:
            raise CorruptCheckpointError(f"bad local header for {name}", path=self.path,
                                         hint="file truncated or damaged?")
        fields = _LOCAL_HEADER.unpack(head)
        if fields[4] != zipfile.ZIP_STORED:
            return -1
        return header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]

    def _read_storage(self, st: StorageRef, fd: int, use_mmap: bool = False) -> torch.Tensor:
        nbytes = st.numel * st.dtype.itemsize
        offset = self._member_span(st.key, nbytes)
        if offset < 0:  # re-zipped with compression: let the zip library inflate it
            _, declared = self._record_info(_member(st.key))
            if declared > nbytes + (1 << 20):  # inflating it all would take more than needed
                raise _limits.exceeded("decompressed", f"storage {_member(st.key)} inflates to "
                                       f"{declared:,} bytes but its tensors need {nbytes:,}",
                                       path=self.path)
            data = self._read_record(_member(st.key))
            buf = torch.frombuffer(bytearray(data[:nbytes]), dtype=torch.uint8) if nbytes else \
                torch.empty(0, dtype=torch.uint8)
        else:
            size = os.fstat(fd).st_size
            if offset + nbytes > size:
                raise CorruptCheckpointError(
                    f"storage data/{st.key} declares {nbytes} bytes but the file ends after "
                    f"{max(0, size - offset)}", path=self.path, hint="file truncated?")
            if use_mmap and nbytes:
                buf = torch.frombuffer(self._mapping(fd), dtype=torch.uint8, count=nbytes, offset=offset)
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8)
                if nbytes:
                    pread_into(fd, buf, offset, path=self.path, what=f"storage data/{st.key}")
        if self._big_endian and st.dtype.itemsize > 1:
            buf = _byteswap(buf, st.dtype)
        return buf

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu", *,
             mmap: bool = False) -> list[torch.Tensor]:
        """Read ``refs``. With ``mmap=True`` CPU tensors are copy-on-write views of the file
        (fastest; the file must then not be truncated in place while they live)."""
        if not refs:
            return []
        self._zip()
        use_mmap = mmap and torch.device(device).type == "cpu"
        bufs: dict[str, torch.Tensor] = {}
        out = []
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for ref in refs:
                buf = bufs.get(ref.key)
                if buf is None:
                    st = self._storages.get(ref.key)
                    if st is None:
                        raise CorruptCheckpointError(f"unknown storage {ref.key!r}", path=self.path)
                    buf = self._read_storage(st, fd, use_mmap)
                    if torch.device(device).type != "cpu":
                        buf = buf.to(device)
                    bufs[ref.key] = buf
                out.append(materialize(buf, ref, path=self.path, name=str(ref.key)))
        finally:
            os.close(fd)
        return out

    def _mapping(self, fd: int) -> mmap.mmap:
        if self._mm is None:
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        return self._mm

    def trusted_load(self, device: str | torch.device = "cpu") -> Any:
        return torch.load(self.path, map_location=device, weights_only=False)

    def close(self) -> None:
        if self._zf is not None:
            self._zf.close()
        self._zf = self._fast = self._mm = None  # live tensors keep their mapping alive


def _member(key: str) -> str:
    """The archive member holding storage ``key``."""
    return key if key.startswith(_CONSTANTS) else f"data/{key}"


def _byteswap(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes of a big-endian storage reordered to this machine's order."""
    if sys.byteorder == "big":
        return buf
    k = dtype.itemsize
    if dtype.is_complex:
        k //= 2
    n = (buf.numel() // k) * k
    swapped = buf[:n].view(-1, k).flip(1).reshape(-1).contiguous()
    return swapped
