"""Folders made of several checkpoint files (pipelines, training-state folders): each part is
opened by the reader its content calls for, and tensors keep their part's reader."""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch

from torchkeep.read.formats.base import Reader, TensorRef, load_grouped

log = logging.getLogger(__name__)


def module_tree(reader: Reader) -> Any:
    """A part's tree with placeholder modules (whole pickled models) opened into their tensors."""
    from torchkeep.read.unpickler import Opaque, module_children

    tree = reader.read_tree()
    kids = module_children(tree) if isinstance(tree, Opaque) else None
    return kids if kids is not None else tree


class CompositeReader(Reader):
    """A folder of parts. Subclasses build the tree from :meth:`part`."""

    def __init__(self, path: str | os.PathLike, *, trust: bool = False) -> None:
        super().__init__(path, trust=trust)
        self.folder = self.path
        self._parts: dict[str, Reader] = {}

    def part(self, path: str) -> Reader:
        """The reader of one file or folder inside (opened once)."""
        from torchkeep.read.formats import detect

        r = self._parts.get(path)
        if r is None:
            r = detect(path)(path, trust=self.trust)
            self._parts[path] = r
        return r

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu", *,
             mmap: bool = False) -> list[torch.Tensor]:
        return load_grouped(refs, device, mmap=mmap)

    def globals(self) -> list:
        self.read_tree()
        out = []
        for r in self._parts.values():
            out.extend(r.globals())
        return out

    def files(self) -> list[str]:
        out = []
        for r in self._parts.values():
            out.extend(r.files())
        return out

    def close(self) -> None:
        for r in self._parts.values():
            r.close()
