"""What every on-disk format provides: a Reader that turns a file into a tree of lazy tensors."""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from torchkeep.errors import FormatError


@dataclass(eq=False)
class TensorRef:
    """A tensor in a checkpoint that has not been read: shape, dtype and where its bytes live.

    ``storage`` identifies the underlying buffer: refs with the same ``storage`` alias the same
    bytes (tied weights, views), and :meth:`Reader.load` keeps that aliasing.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    reader: "Reader" = field(repr=False)
    key: Any = field(repr=False)
    storage: str | None = None
    offset: int = 0  # in elements, into the storage
    stride: tuple[int, ...] | None = None  # None: contiguous
    requires_grad: bool = False
    is_parameter: bool = False
    location: str | None = None  # device the writer had it on ('cuda:0'), informational

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def load(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.reader.load([self], device)[0]


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of ``shape`` (what a contiguous tensor of that shape has)."""
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class Reader(abc.ABC):
    """One on-disk format. Knows bytes, not policy: it builds the tree and reads tensor bytes."""

    format: ClassVar[str]
    description: ClassVar[str] = ""
    # Whether the stored names keep the writer's order (a pickle keeps a state dict's
    # registration order; safetensors sorts its keys, sharded indexes and DCP keep none).
    keeps_order: ClassVar[bool] = False

    def __init__(self, path: str | os.PathLike, *, trust: bool = False) -> None:
        self.path = os.fspath(path)
        self.trust = trust
        self.metadata: dict[str, Any] = {}

    @classmethod
    @abc.abstractmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        """True when ``path`` is in this format. ``head`` is the first bytes of a file (b'' for a folder)."""

    @abc.abstractmethod
    def read_tree(self) -> Any:
        """The stored object as nested dict/list/tuple with TensorRef (and Opaque) leaves."""

    @abc.abstractmethod
    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu") -> list[torch.Tensor]:
        """Read the bytes of ``refs``; refs sharing a storage come back sharing memory.

        Readers that can map files accept ``mmap=True``: CPU tensors then are copy-on-write
        views of the file instead of copies."""

    def globals(self) -> list:
        """Globals the format's pickles import (empty for formats without pickle)."""
        return []

    def trusted_load(self, device: str | torch.device = "cpu") -> Any:
        """The object with full pickle semantics (may execute code); only called with trust=True."""
        raise NotImplementedError(f"{self.format} has no pickle to load with trust")

    def files(self) -> list[str]:
        """The files this checkpoint consists of (one for single-file formats)."""
        return [self.path]

    def close(self) -> None:
        pass


class MemoryReader(Reader):
    """Refs to tensors already in memory (rebuilt from a pickle, or handed in by a caller)."""

    format = "memory"
    keeps_order = True

    def __init__(self) -> None:
        super().__init__("<memory>")

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        return False

    def read_tree(self) -> Any:
        return {}

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu") -> list[torch.Tensor]:
        return [r.key.to(device) for r in refs]


MEMORY = MemoryReader()


def load_grouped(refs: Sequence[TensorRef], device: str | torch.device = "cpu", *,
                 mmap: bool = False, owner: "Reader | None" = None) -> list[torch.Tensor]:
    """Read ``refs`` from the readers that own them, one call per reader (so each keeps shared
    storages shared), in the order given. ``mmap=True`` goes to readers that can map; the others
    copy, which is slower but the same tensors. ``owner``: a reader that delegates to parts and
    so must own none of the refs itself."""
    groups: dict[int, tuple[Reader, list[int]]] = {}
    for i, r in enumerate(refs):
        groups.setdefault(id(r.reader), (r.reader, []))[1].append(i)
    out: list[Any] = [None] * len(refs)
    for reader, idx in groups.values():
        if owner is not None and reader is owner:
            raise FormatError(f"a {owner.format} reader reads through its parts and holds no "
                              "tensors itself", path=owner.path)
        part = [refs[i] for i in idx]
        try:
            got = reader.load(part, device, mmap=True) if mmap else reader.load(part, device)
        except TypeError:
            if not mmap:
                raise
            got = reader.load(part, device)  # this reader cannot map: it copies
        for i, t in zip(idx, got):
            out[i] = t
    return out


def ref_of(tensor: torch.Tensor) -> TensorRef:
    """A TensorRef for a tensor already in memory."""
    return TensorRef(shape=tuple(tensor.shape), dtype=tensor.dtype, reader=MEMORY, key=tensor,
                     storage=None, is_parameter=isinstance(tensor, torch.nn.Parameter))
