"""``torch.export.save`` archives (``.pt2``): the exported program's tensors, read by name without
deserializing or running the program.

The archive keeps each weight (parameters, persistent buffers) and each constant (tensor
constants, non-persistent buffers) as a raw member described by a JSON config
(``data/weights/<model>_weights_config.json``, ``data/constants/<model>_constants_config.json``):
dtype, sizes, strides, storage offset. The tree is ``{"weights": ..., "constants": ...}``; the
model weights are ``weights``, as ``torch.export.load(f).state_dict`` has them.
"""
from __future__ import annotations

import io
import logging
import os
import struct
import zipfile
from typing import Any, Sequence

import torch

from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.limits import loads_json
from torchkeep.read.formats.base import Reader, TensorRef

log = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_SIG = b"PK\x03\x04"


def _first_member(head: bytes) -> str:
    if len(head) < 30 or head[:4] != _SIG:
        return ""
    n = struct.unpack_from("<H", head, 26)[0]
    return head[30:30 + n].decode("utf-8", "replace")


def _dtype(code: int) -> torch.dtype:
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    try:
        return _SERIALIZE_TO_TORCH_DTYPE[ScalarType(code)]
    except (ValueError, KeyError):
        raise FormatError(f"unknown dtype code {code} in the archive's tensor config") from None


class Pt2Reader(Reader):
    format = "torch-export"
    description = "torch.export .pt2 archive (tensors only; the program is not loaded)"
    kind = "exported-program"
    weights_at = "weights"

    def __init__(self, path: str | os.PathLike, *, trust: bool = False) -> None:
        super().__init__(path, trust=trust)
        self._zf: zipfile.ZipFile | None = None
        self._prefix = ""

    @classmethod
    def sniff(cls, path: str, head: bytes) -> bool:
        first = _first_member(head)
        if not first or first.endswith("data.pkl"):
            return False
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.rpartition("/")[2] == "archive_format" and zf.read(n).strip() == b"pt2"
                           for n in zf.namelist() if n.count("/") <= 1)
        except (zipfile.BadZipFile, OSError):
            return False

    def _zip(self) -> zipfile.ZipFile:
        if self._zf is None:
            try:
                self._zf = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as e:
                raise CorruptCheckpointError(f"zip archive is truncated or damaged ({e})",
                                             path=self.path) from None
            fmt = [n for n in self._zf.namelist() if n.rpartition("/")[2] == "archive_format"]
            self._prefix = fmt[0][: -len("archive_format")] if fmt else ""
        return self._zf

    def _configs(self, kind: str) -> dict[str, dict[str, Any]]:
        zf = self._zip()
        folder = f"{self._prefix}data/{kind}/"
        out: dict[str, dict[str, Any]] = {}
        for n in zf.namelist():
            if n.startswith(folder) and n.endswith(f"_{kind}_config.json"):
                model = n[len(folder): -len(f"_{kind}_config.json")]
                try:
                    doc = loads_json(zf.read(n), path=self.path, what=n)
                except ValueError as e:
                    raise CorruptCheckpointError(f"{n} is not valid JSON ({e})", path=self.path) from None
                out[model] = doc.get("config") or {}
        return out

    def read_tree(self) -> Any:
        tree: dict[str, Any] = {}
        models: set[str] = set()
        for kind in ("weights", "constants"):
            part: dict[str, Any] = {}
            configs = self._configs(kind)
            models.update(configs)
            for model, config in configs.items():
                for name, spec in config.items():
                    full = name if len(configs) == 1 else f"{model}.{name}"
                    part[full] = self._ref(kind, spec, name)
            tree[kind] = part
        self.metadata = {"models": ",".join(sorted(models))}
        return tree

    def _ref(self, kind: str, spec: dict[str, Any], name: str) -> TensorRef:
        meta = spec.get("tensor_meta") or {}
        try:
            shape = tuple(int(s["as_int"]) for s in meta["sizes"])
            stride = tuple(int(s["as_int"]) for s in meta["strides"])
            offset = int(meta["storage_offset"]["as_int"])
            dtype = _dtype(int(meta["dtype"]))
        except (KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"tensor config of {name!r} lacks {e}", path=self.path) from None
        member = f"{self._prefix}data/{kind}/{spec.get('path_name')}"
        dev = meta.get("device") or {}
        loc = dev.get("type", "cpu") + (f":{dev['index']}" if dev.get("index") is not None else "")
        return TensorRef(shape=shape, dtype=dtype, reader=self, key=(member, bool(spec.get("use_pickle"))),
                         storage=member, offset=offset, stride=stride,
                         requires_grad=bool(meta.get("requires_grad")),
                         is_parameter=bool(spec.get("is_param")), location=loc)

    def load(self, refs: Sequence[TensorRef], device: str | torch.device = "cpu",
             **kw: Any) -> list[torch.Tensor]:
        from torchkeep.read.formats.torchzip import materialize

        zf = self._zip()
        bufs: dict[str, torch.Tensor] = {}
        out = []
        for r in refs:
            member, pickled = r.key
            if pickled:
                # Written with torch.save: read by torch's weights-only unpickler (no code runs).
                t = torch.load(io.BytesIO(self._read(zf, member)), weights_only=True, map_location="cpu")
                out.append(t.to(device))
                continue
            buf = bufs.get(member)
            if buf is None:
                data = self._read(zf, member)
                buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
                    torch.empty(0, dtype=torch.uint8)
                bufs[member] = buf
            out.append(materialize(buf, r, path=self.path, name=member).to(device))
        return out

    def _read(self, zf: zipfile.ZipFile, member: str) -> bytes:
        try:
            return zf.read(member)
        except KeyError:
            raise CorruptCheckpointError(f"{member} is missing from the archive", path=self.path) from None
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise CorruptCheckpointError(f"cannot read {member}: {e}", path=self.path) from None

    def close(self) -> None:
        if self._zf is not None:
            self._zf.close()
            self._zf = None
