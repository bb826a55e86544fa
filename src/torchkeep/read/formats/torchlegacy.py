"""Legacy (non-zip) torch.save files, ``_use_new_zipfile_serialization=False``, and plain pickles.

Layout of a legacy file: five pickles in a row (magic number, protocol version, system info, the
object, the list of storage keys) followed by each storage's bytes, each preceded by its element
count as a little-endian int64. The object pickle goes through the restricted unpickler; storage
positions are found by walking the count prefixes, without reading the data.
"""
from __future__ import annotations

import mmap
import os
import struct
import tarfile
from typing import Any, Sequence

import torch

from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.read.formats.base import Reader, TensorRef
from torchkeep.read.formats.torchzip import materialize, pread_into
from torchkeep.read.unpickler import GlobalRef, StorageRef, restricted_walk, storage_from_pid

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


class LegacyReader(Reader):
    format = "torch-legacy"
    keeps_order = True
    description = "legacy torch.save file (non-zip) or plain pickle"

    def __init__(self, path: str, *, trust: bool = False) -> None:
        super().__init__(path, trust=trust)
        self._storages: dict[str, StorageRef] = {}
        self._offsets: dict[str, int] | None = None
        self._declared: dict[str, int] = {}
        self._data_start = 0
        self._keys: list[str] = []
        self._seen: list[GlobalRef] = []
        self.kind: str | None = None

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
            return True
        if len(head) >= 1 and head[:1] in (b"(", b"}", b"]"):  # protocol 0/1 pickles
            return True
        return False

    def _parse(self) -> Any:
        """Walk the pickles in the order torch.load does, each with the restricted unpickler
        (the file is mapped, so only the pickles are read, not the storage bytes after them)."""
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise FormatError("the file is empty", path=self.path)
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, _, pos = restricted_walk(data, 0, path=self.path, member="magic")
        if magic != MAGIC_NUMBER:
            # Not a torch legacy file: a plain pickle holding the whole object.
            self.kind = "pickle"
            obj, self._seen, _ = restricted_walk(data, 0, path=self.path, member="pickle",
                                                 persistent_load=self._persistent_load)
            return obj
        proto, _, pos = restricted_walk(data, pos, path=self.path, member="protocol")
        if proto != PROTOCOL_VERSION:
            raise FormatError(f"unsupported legacy protocol version {proto!r}", path=self.path)
        _sysinfo, _, pos = restricted_walk(data, pos, path=self.path, member="sys info")
        obj, self._seen, pos = restricted_walk(data, pos, path=self.path, member="object",
                                               persistent_load=self._persistent_load)
        keys, _, pos = restricted_walk(data, pos, path=self.path, member="storage keys")
        if not isinstance(keys, list):
            raise CorruptCheckpointError("storage key list is malformed", path=self.path)
        self._keys = [str(k) for k in keys]
        self._data_start = pos
        return obj

    def read_tree(self) -> Any:
        if tarfile.is_tarfile(self.path):
            raise FormatError("tar-based torch file from PyTorch < 0.4 is not supported",
                              path=self.path, hint="re-save it with a current torch.save")
        return self._parse()

    def _persistent_load(self, pid: Any) -> Any:
        typename, root, rest = storage_from_pid(pid, self, self._storages, path=self.path, fields=6)
        if typename == "module":
            return rest[0] if rest else None
        if root is None:
            raise CorruptCheckpointError(f"unknown persistent id {typename!r}", path=self.path)
        view = rest[0]
        if view is not None:  # a view into the root storage: (view key, offset, size)
            _view_key, offset, _view_size = view
            return StorageRef(self, root.key, root.dtype, root.numel, root.location, int(offset))
        return root

    def globals(self) -> list[GlobalRef]:
        if not self._seen:
            self.read_tree()
        return list(self._seen)

    def _storage_offsets(self, fd: int) -> dict[str, int]:
        """Where each storage's bytes start, by walking the count prefixes."""
        if self._offsets is None:
            size = os.fstat(fd).st_size
            offsets, pos = {}, self._data_start
            for key in self._keys:
                st = self._storages.get(key)
                if st is None:
                    raise CorruptCheckpointError(f"storage {key!r} is listed but never used",
                                                 path=self.path)
                head = os.pread(fd, 8, pos)
                if len(head) < 8:
                    raise CorruptCheckpointError(
                        f"storage {key} should start at byte {pos} but the file ends at {size}",
                        path=self.path, hint="file truncated?")
                (count,) = struct.unpack("<q", head)
                nbytes = count * st.dtype.itemsize
                if count < 0 or pos + 8 + nbytes > size:
                    raise CorruptCheckpointError(
                        f"storage {key} declares {max(count, 0) * st.dtype.itemsize} bytes but the "
                        f"file ends after {max(0, size - pos - 8)}", path=self.path,
                        hint="file truncated?")
                offsets[key] = pos + 8
                self._declared[key] = nbytes
                pos += 8 + nbytes
            self._offsets = offsets
        return self._offsets

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu") -> list[torch.Tensor]:
        if not refs:
            return []
        fd = os.open(self.path, os.O_RDONLY)
        try:
            offsets = self._storage_offsets(fd)
            bufs: dict[str, torch.Tensor] = {}
            out = []
            for ref in refs:
                buf = bufs.get(ref.key)
                if buf is None:
                    st = self._storages[ref.key]
                    nbytes = st.numel * st.dtype.itemsize
                    declared = self._declared[ref.key]
                    if nbytes > declared:  # checked before allocating: a pickle may claim terabytes
                        raise CorruptCheckpointError(
                            f"storage {ref.key} claims {nbytes:,} bytes but the file stores "
                            f"{declared:,} for it", path=self.path, hint="file damaged or hostile?")
                    buf = torch.empty(nbytes, dtype=torch.uint8)
                    if nbytes:
                        pread_into(fd, buf, offsets[ref.key], path=self.path,
                                   what=f"storage {ref.key}")
                    if torch.device(device).type != "cpu":
                        buf = buf.to(device)
                    bufs[ref.key] = buf
                out.append(materialize(buf, ref, path=self.path, name=f"storage {ref.key}"))
            return out
        finally:
            os.close(fd)

    def trusted_load(self, device: str | torch.device = "cpu") -> Any:
        if self.kind == "pickle":
            import pickle
            with open(self.path, "rb") as f:
                return pickle.load(f)
        return torch.load(self.path, map_location=device, weights_only=False)


