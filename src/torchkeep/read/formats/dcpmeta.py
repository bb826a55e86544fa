"""Read a DCP folder's pickled ``.metadata`` without running code: an unpickler that builds DCP's
metadata classes and nothing else, and a ``FileSystemReader`` that uses it, so torchkeep can hand
shards to ``torch.distributed.checkpoint.load`` safely (DCP's own reader uses plain pickle)."""
from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch

from torchkeep.errors import UnsafeCheckpointError
from torchkeep.read.formats.dcp import METADATA as DCP_METADATA

_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    *((_DCP_META, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                               "TensorStorageMetadata", "BytesStorageMetadata",
                               "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes and nothing else (no function of the file's choosing)."""

    def __init__(self, f: Any, path: str) -> None:
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f".metadata imports {module}.{name}, which DCP metadata never "
                                    f"holds", globals=[f"{module}.{name}"], path=self.path,
                                    hint="the shards folder was not written by DCP; do not load it")


def _prescan(data: bytes, path: str) -> None:
    """Walk the pickle with torchkeep's bounded machine before C pickle builds it: input over a
    limit (memo indices, opcodes, size) or malformed is refused before anything is allocated."""
    from torchkeep.errors import CorruptCheckpointError
    from torchkeep.read import pickles

    res = pickles.scan(data, path=path, member=DCP_METADATA)
    if res.limit is not None:
        raise res.limit
    if res.error is not None:
        raise CorruptCheckpointError(f"the pickle cannot be read: {res.error}", path=path)


def _safe_reader(path: str) -> Any:
    """DCP's FileSystemReader (FsspecReader for a URL) whose ``.metadata`` goes through
    :class:`_MetadataUnpickler` (DCP's own uses plain pickle); tensor data is read by DCP with
    ``weights_only=True``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    url = "://" in path
    if url:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader as base
    else:
        base = FileSystemReader

    class SafeFileSystemReader(base):  # type: ignore[valid-type,misc]
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if url:
                mpath = path.rstrip("/") + "/" + DCP_METADATA
                import fsspec
                with fsspec.open(mpath, "rb") as f:
                    data = f.read()
            else:
                mpath = os.path.join(os.fspath(self.path), DCP_METADATA)
                with open(mpath, "rb") as f:
                    data = f.read()
            _prescan(data, mpath)
            md = _MetadataUnpickler(io.BytesIO(data), mpath).load()
            if type(md).__name__ != "Metadata":
                raise UnsafeCheckpointError(f".metadata holds a {type(md).__name__}", path=mpath)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeFileSystemReader(path)
