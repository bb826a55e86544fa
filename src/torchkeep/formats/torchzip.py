"""torch.save zip archives (the default since PyTorch 1.6), read without torch.load.

The pickle (``<archive>/data.pkl``) goes through the restricted unpickler; every storage it
names becomes a lazy reference to the member ``<archive>/data/<key>``, whose bytes are read with
one positioned read straight into the tensor's memory when asked for.
"""
from __future__ import annotations

import os
import struct
import sys
import zipfile
from typing import Any, Sequence

import torch

from ..errors import CorruptCheckpointError, FormatError
from ..safety import GlobalRef, StorageRef, StorageType, restricted_load_with_globals
from .base import Reader, TensorRef

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_SIG = b"PK\x03\x04"


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


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class TorchZipReader(Reader):
    format = "torch-zip"
    description = "torch.save zip archive"

    def __init__(self, path: str, *, trust: bool = False) -> None:
        super().__init__(path, trust=trust)
        self._zf: zipfile.ZipFile | None = None
        self._prefix = ""
        self._storages: dict[str, StorageRef] = {}
        self._seen: list[GlobalRef] = []
        self._big_endian = False
        self.kind: str | None = None

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        return head[:4] == _LOCAL_SIG

    # -- archive -----------------------------------------------------------------------
    def _zip(self) -> zipfile.ZipFile:
        if self._zf is None:
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
        return self._zf

    def read_tree(self) -> Any:
        zf = self._zip()
        member = self._prefix + "data.pkl"
        try:
            data = zf.read(member)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise CorruptCheckpointError(f"cannot read {member}: {e}", path=self.path,
                                         hint="file truncated or damaged?") from None
        obj, self._seen = restricted_load_with_globals(data, path=self.path, member=member,
                                                       persistent_load=self._persistent_load)
        return obj

    def _persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise CorruptCheckpointError(f"malformed persistent id {pid!r}", path=self.path)
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage" or len(pid) < 5:
            raise CorruptCheckpointError(f"unknown persistent id {typename!r}", path=self.path)
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType):
            raise CorruptCheckpointError(f"storage {key!r} has unknown type {storage_type!r}",
                                         path=self.path)
        key = str(key)
        ref = self._storages.get(key)
        if ref is None:
            ref = StorageRef(self, key, storage_type.dtype, int(numel), str(location))
            self._storages[key] = ref
        return ref

    def globals(self) -> list[GlobalRef]:
        if not self._seen:
            self.read_tree()
        return list(self._seen)

    # -- bytes -------------------------------------------------------------------------
    def _member_span(self, key: str, nbytes: int) -> tuple[int, int]:
        """(absolute offset of the storage's bytes, their length) after checking the archive."""
        zf = self._zip()
        name = f"{self._prefix}data/{key}"
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise CorruptCheckpointError(f"storage {name} is missing from the archive",
                                         path=self.path) from None
        if info.compress_type != zipfile.ZIP_STORED:
            return -1, info.file_size
        if info.file_size < nbytes:
            raise CorruptCheckpointError(
                f"storage {name} holds {info.file_size} bytes but its tensors need {nbytes}",
                path=self.path, hint="file damaged?")
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(_LOCAL_HEADER.size)
        if len(head) < _LOCAL_HEADER.size or head[:4] != _LOCAL_SIG:
            raise CorruptCheckpointError(f"bad local header for {name}", path=self.path,
                                         hint="file truncated or damaged?")
        fields = _LOCAL_HEADER.unpack(head)
        offset = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        return offset, nbytes

    def _read_storage(self, st: StorageRef, fd: int) -> torch.Tensor:
        nbytes = st.numel * st.dtype.itemsize
        offset, _ = self._member_span(st.key, nbytes)
        if offset < 0:  # re-zipped with compression: fall back to zipfile
            data = self._zip().read(f"{self._prefix}data/{st.key}")
            if len(data) < nbytes:
                raise CorruptCheckpointError(f"storage data/{st.key} is shorter than its tensors",
                                             path=self.path)
            buf = torch.frombuffer(bytearray(data[:nbytes]), dtype=torch.uint8) if nbytes else \
                torch.empty(0, dtype=torch.uint8)
        else:
            size = os.fstat(fd).st_size
            if offset + nbytes > size:
                raise CorruptCheckpointError(
                    f"storage data/{st.key} declares {nbytes} bytes but the file ends after "
                    f"{max(0, size - offset)}", path=self.path, hint="file truncated?")
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                pread_into(fd, buf, offset, path=self.path, what=f"storage data/{st.key}")
        if self._big_endian and st.dtype.itemsize > 1:
            buf = _byteswap(buf, st.dtype)
        return buf

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu") -> list[torch.Tensor]:
        if not refs:
            return []
        self._zip()
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
                    buf = self._read_storage(st, fd)
                    if torch.device(device).type != "cpu":
                        buf = buf.to(device)
                    bufs[ref.key] = buf
                out.append(materialize(buf, ref, path=self.path, name=str(ref.key)))
        finally:
            os.close(fd)
        return out

    def trusted_load(self, device: str | torch.device = "cpu") -> Any:
        return torch.load(self.path, map_location=device, weights_only=False)

    def close(self) -> None:
        if self._zf is not None:
            self._zf.close()
            self._zf = None


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
