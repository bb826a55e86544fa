"""tensordict memmap folders (``TensorDict.memmap(prefix)``): ``meta.json`` describes each key
(dtype, shape) whose bytes are the raw file ``<key>.memmap``; nested tensordicts are subfolders
with their own ``meta.json``. Read lazily like ``TensorDict.load_memmap``, without tensordict."""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch

from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.limits import read_json_file
from torchkeep.read.formats.base import Reader, TensorRef

log = logging.getLogger(__name__)


def _meta(folder: str) -> dict[str, Any] | None:
    doc = read_json_file(os.path.join(folder, "meta.json"), max_bytes=16 << 20, what="meta.json")
    return doc if isinstance(doc, dict) and "_type" in doc else None


def _dtype(name: str, where: str) -> torch.dtype:
    d = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(d, torch.dtype):
        raise FormatError(f"unknown dtype {name!r}", path=where)
    return d


class MemmapReader(Reader):
    format = "tensordict"
    description = "tensordict memmap folder (meta.json + *.memmap)"
    kind = "tensordict"

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        return os.path.isdir(path) and _meta(path) is not None

    def read_tree(self) -> Any:
        tree = self._folder(self.path, depth=0)
        self.weights_at = tuple(tree)  # every tensor, nested keys dotted
        meta = _meta(self.path) or {}
        self.metadata = {"class": meta.get("_class") or meta.get("_type"),
                         "batch_size": meta.get("shape")}
        return tree

    def _folder(self, folder: str, depth: int) -> dict[str, Any]:
        meta = _meta(folder)
        if meta is None or depth > 32:
            raise FormatError("meta.json is missing or unreadable", path=folder)
        out: dict[str, Any] = {}
        for key, spec in meta.items():
            if key.startswith("_") or key in ("shape", "device") or not isinstance(spec, dict):
                continue
            sub = os.path.join(folder, key)
            if "dtype" in spec and "shape" in spec:
                if spec.get("is_nested"):
                    raise FormatError(f"{key}: nested (jagged) tensors are not read by torchkeep",
                                      path=folder)
                out[key] = TensorRef(shape=tuple(int(s) for s in spec["shape"]),
                                     dtype=_dtype(spec["dtype"], folder), reader=self,
                                     key=sub + ".memmap", storage=sub + ".memmap",
                                     location=spec.get("device"))
            elif os.path.isdir(sub) and _meta(sub) is not None:
                out[key] = self._folder(sub, depth + 1)
            else:
                log.warning("%s: entry %r (%s) is not a tensor or a nested tensordict; skipped",
                            folder, key, spec.get("type") or spec.get("_type"))
        return out

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu",
             **kw: Any) -> list[torch.Tensor]:
        out = []
        for r in refs:
            size = os.path.getsize(r.key) if os.path.exists(r.key) else -1
            if size < 0:
                raise CorruptCheckpointError(f"{os.path.basename(r.key)} is missing", path=self.path)
            if size < r.nbytes:
                raise CorruptCheckpointError(f"{os.path.basename(r.key)} holds {size} bytes but the "
                                             f"tensor needs {r.nbytes}", path=self.path)
            with open(r.key, "rb") as f:
                data = bytearray(f.read(r.nbytes))
            t = torch.frombuffer(data, dtype=r.dtype, count=r.numel) if r.numel else \
                torch.empty(0, dtype=r.dtype)
            out.append(t.reshape(r.shape).to(device))
        return out

    def files(self) -> list[str]:
        out = []
        for root, _, names in os.walk(self.path):
            out.extend(os.path.join(root, n) for n in names)
        return out
