"""Hugging Face style checkpoint folders: an ``*.index.json`` whose ``weight_map`` names the shard
holding each tensor (shards are safetensors or torch.save files), or a folder with one weights file.

Each shard is opened with the reader its content calls for, so torch shards go through the
restricted unpickler like any other torch file; the tensors keep their shard's reader and are
read lazily from it.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import torch

from torchkeep import limits as _limits
from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.read.formats.base import Reader, TensorRef, load_grouped

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 64 * 1000 * 1000
# Single weights files a model folder may hold, most preferred first.
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
                "adapter_model.bin", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin", "model.pt", "model.pth", "model.ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Index files, most preferred first (safetensors before pickle-based shards).
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _load_index(path: str) -> dict[str, Any] | None:
    """The index document if ``path`` is a JSON file with a ``weight_map`` object, else None."""
    try:
        if os.path.getsize(path) > MAX_INDEX_BYTES:
            return None
        with open(path, "rb") as f:
            raw = f.read()
        _limits.check_json(raw, path=path, what="the index JSON")  # json.loads recurses
        doc = json.loads(raw)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict):
        return doc
    return None


def _looks_like_index(path: str) -> bool:
    """Cheap test for detection: HF writers put "weight_map" right after a short metadata
    block, so the first 64 KiB tell; larger, odd files are parsed in full."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if b'"weight_map"' in head:
        return head.lstrip()[:1] == b"{"
    return len(head) == 1 << 16 and _load_index(path) is not None


def find_index(folder: str) -> str | None:
    """The index file of ``folder`` (preferring safetensors shards), or None."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    cands = [n for n in names if n.endswith(".index.json")]
    cands.sort(key=lambda n: (INDEX_NAMES.index(n) if n in INDEX_NAMES else len(INDEX_NAMES),
                              "safetensors" not in n, n))
    for n in cands:
        if _looks_like_index(os.path.join(folder, n)):
            return os.path.join(folder, n)
    return None


def find_weights(folder: str) -> list[str]:
    """Single weights files in ``folder``, preferred first."""
    try:
        names = sorted(n for n in os.listdir(folder)
                       if n.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(folder, n))
                       and not n.startswith(".tmp-"))
    except OSError:
        return []
    names.sort(key=lambda n: WEIGHT_NAMES.index(n) if n in WEIGHT_NAMES else len(WEIGHT_NAMES))
    return [os.path.join(folder, n) for n in names]


class ShardedReader(Reader):
    format = "hf-sharded"
    description = "Hugging Face style folder (*.index.json + shards, or one weights file)"

    def __init__(self, path: str | os.PathLike, *, trust: bool = False) -> None:
        super().__init__(path, trust=trust)
        p = self.path
        self.index_path: str | None = None
        self.folder = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
        if os.path.isdir(p):
            self.index_path = find_index(p)
        elif p.endswith(".json"):
            self.index_path = p
        self._shards: dict[str, Reader] = {}
        self._single: Reader | None = None
        self._weight_map: dict[str, str] | None = None

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        if os.path.isdir(path):
            return find_index(path) is not None or bool(find_weights(path))
        return path.endswith(".json") and head.lstrip()[:1] == b"{" and _looks_like_index(path)

    # -- shards ------------------------------------------------------------------------
    def _open(self, file: str) -> Reader:
        from torchkeep.read.formats import detect

        r = self._shards.get(file)
        if r is None:
            r = detect(file)(file, trust=self.trust)
            self._shards[file] = r
        return r

    def _index(self) -> dict[str, str]:
        if self._weight_map is None:
            assert self.index_path is not None
            doc = _load_index(self.index_path)
            if doc is None:
                raise FormatError("not a valid index (JSON object with a weight_map expected)",
                                  path=self.index_path)
            wm = doc["weight_map"]
            bad = [k for k, v in wm.items() if not isinstance(v, str) or not v
                   or os.path.isabs(v) or ".." in v.replace("\\", "/").split("/")]
            if bad:
                raise CorruptCheckpointError(
                    f"weight_map entry {bad[0]!r} names shard {wm[bad[0]]!r}, which is not a file "
                    f"name inside the folder", path=self.index_path)
            self._weight_map = dict(wm)
            meta = doc.get("metadata")
            self.metadata = dict(meta) if isinstance(meta, dict) else {}
        return self._weight_map

    def shard_files(self) -> list[str]:
        """Every shard the index names, in name order (model-00001-of-... first)."""
        if self.index_path is None:
            return []
        return [os.path.join(self.folder, s) for s in sorted(set(self._index().values()))]

    def _single_file(self) -> Reader:
        if self._single is None:
            files = find_weights(self.folder)
            if not files:
                raise FormatError("no *.index.json and no weights file in this folder", path=self.path)
            known = [f for f in files if os.path.basename(f) in WEIGHT_NAMES]
            if not known and len(files) > 1:
                raise FormatError(
                    "the folder holds several weights files and no index: "
                    + ", ".join(os.path.basename(f) for f in files[:6]), path=self.path,
                    hint="open one of them directly")
            self._single = self._open(files[0])
        return self._single

    # -- Reader ------------------------------------------------------------------------
    def read_tree(self) -> Any:
        if self.index_path is None:
            single = self._single_file()
            tree = single.read_tree()
            self.metadata = {"file": os.path.basename(single.path), **single.metadata}
            return tree
        from torchkeep.read.tree import walk
        from torchkeep.read.unpickler import Opaque

        wm = self._index()
        by_shard: dict[str, list[str]] = {}
        for name, shard in wm.items():
            by_shard.setdefault(shard, []).append(name)
        missing = [s for s in by_shard if not os.path.isfile(os.path.join(self.folder, s))]
        if missing:
            n = len(by_shard[missing[0]])
            more = f" ({len(missing) - 1} more shards missing)" if len(missing) > 1 else ""
            raise CorruptCheckpointError(
                f"the index names shard {missing[0]!r} ({n} tensors) but it is missing{more}",
                path=self.index_path, hint="was the download or the save interrupted?")
        out: dict[str, Any] = {}
        formats = set()
        for shard in sorted(by_shard):
            file = os.path.join(self.folder, shard)
            reader = self._open(file)
            formats.add(reader.format)
            flat = dict(walk(reader.read_tree(), children=_module_children))
            listed = by_shard[shard]
            absent = [n for n in listed if n not in flat]
            if absent:
                more = f" ({len(absent) - 1} more)" if len(absent) > 1 else ""
                raise CorruptCheckpointError(
                    f"the index maps tensor {absent[0]!r} to shard {shard!r}, which has no such "
                    f"tensor{more}", path=self.index_path, hint="the index and the shards do not match")
            for name, v in flat.items():
                owner = wm.get(name)
                if owner is None and isinstance(v, (TensorRef, Opaque)):
                    # Stored in the shard but not listed (aliases of tied weights): keep it.
                    out.setdefault(name, v)
                elif owner == shard:
                    out[name] = v
        self.metadata.setdefault("shards", len(by_shard))
        self.metadata.setdefault("shard_format", ",".join(sorted(formats)))
        return out

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu", *,
             mmap: bool = False) -> list[torch.Tensor]:
        """Read refs from the shard readers that own them (shared storages stay shared);
        ``mmap=True`` is passed to shard readers that can map."""
        return load_grouped(refs, device, mmap=mmap, owner=self)

    def globals(self) -> list:
        if self.index_path is None:
            return self._single_file().globals()
        out = []
        for f in self.shard_files():
            out.extend(self._open(f).globals())
        return out

    def trusted_load(self, device: str | torch.device = "cpu") -> Any:
        if self.index_path is None:
            return self._single_file().trusted_load(device)
        wm = self._index()
        out: dict[str, Any] = {}
        for f in self.shard_files():
            r = self._open(f)
            if r.format == "safetensors":
                refs = r.read_tree()
                obj = dict(zip(refs, r.load(list(refs.values()), device)))
            else:
                obj = r.trusted_load(device)
            for k, v in dict(obj).items():
                if wm.get(k, os.path.basename(f)) == os.path.basename(f):
                    out[k] = v
        return out

    def files(self) -> list[str]:
        if self.index_path is None:
            return [self._single_file().path]
        return [self.index_path] + self.shard_files()

    def close(self) -> None:
        for r in self._shards.values():
            r.close()


def _module_children(obj: Any) -> Any:
    from torchkeep.read.unpickler import Opaque, module_children

    return module_children(obj) if isinstance(obj, Opaque) else None
