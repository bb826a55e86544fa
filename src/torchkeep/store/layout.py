"""The native format's layout: folder and file names, step folder names, and the safetensors
bytes the format is made of (writing a header, reading and checking one against the manifest).
Shared by the writer (:mod:`.nativewrite`) and the reader (:mod:`.native`).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from torchkeep.errors import CorruptCheckpointError, LimitExceededError, StateError
from torchkeep.limits import loads_json
from torchkeep.store import typedjson as serial
from torchkeep.store.files import is_tmp

FORMAT = "torchkeep"
VERSION = 1
MANIFEST = "manifest.json"
COMMIT = "commit.json"
PACK = "tensors.safetensors"
BLOB_DIR = "blobs"
COPY_DIR = "copies"          # second copies of blobs that more than one checkpoint refers to
STEP_PREFIX = "step-"
BLOB_MIN_BYTES = 64 << 10   # tensors at least this large get their own deduplicated blob
IO_THREADS = 4              # hashing, checksums, writes and reads release the GIL

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
MAX_HEADER = 100 << 20


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint folder name (``step-00000100`` -> 100), None for other names."""
    if not name.startswith(STEP_PREFIX) or is_tmp(name):
        return None
    digits = name[len(STEP_PREFIX):]
    return int(digits) if digits.isdigit() else None


# ----------------------------------------------------------------------------- safetensors bytes

def st_header(items: Sequence[tuple[str, torch.dtype, Sequence[int], int]],
              metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors header (length prefix + JSON padded to 8 bytes) for tensors laid out in order.

    Deterministic for the same items, so a blob's name (the sha256 of header and data) depends
    on dtype, shape and bytes only.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    off = 0
    for name, dtype, shape, n in items:
        if dtype not in _ST_DTYPES:
            raise StateError(f"safetensors cannot hold dtype {dtype}", entry=name)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def _read_exact(f, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptCheckpointError(f"{what}: expected {n} bytes, the file ends after {len(data)}",
                                     path=path, hint="file truncated?")
    return data


def read_st_header(f, path: str) -> tuple[dict[str, Any], int]:
    """The parsed header of a safetensors stream and the offset where its data starts."""
    (n,) = struct.unpack("<Q", _read_exact(f, 8, path, "safetensors length prefix"))
    if n > MAX_HEADER:
        raise CorruptCheckpointError(f"safetensors header claims {n} bytes", path=path,
                                     hint="not a safetensors file, or damaged")
    try:
        header = loads_json(_read_exact(f, n, path, "safetensors header"), path=path,
                            what="the safetensors header")
    except (UnicodeDecodeError, json.JSONDecodeError, LimitExceededError) as e:
        raise CorruptCheckpointError(f"safetensors header is not JSON: {e}", path=path) from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError("safetensors header is not an object", path=path)
    return header, 8 + n


def _check_entry(st: Mapping[str, Any], name: str, info: Mapping[str, Any], path: str) -> tuple[int, int]:
    """Offsets of ``name`` in a safetensors header, checked against the manifest's entry."""
    e = st.get(name)
    if not isinstance(e, dict):
        raise CorruptCheckpointError("tensor missing from its file", path=path, entry=name)
    dtype = serial.dtype_from_name(info["dtype"])
    if _ST_NAMES.get(e.get("dtype")) != dtype or list(e.get("shape", ())) != list(info["shape"]):
        raise CorruptCheckpointError(
            f"file holds {e.get('dtype')} {e.get('shape')}, the manifest says {info['dtype']} {info['shape']}",
            path=path, entry=name)
    begin, end = e["data_offsets"]
    if end - begin != _nbytes(info):
        raise CorruptCheckpointError(f"declares {end - begin} bytes, expected {_nbytes(info)}",
                                     path=path, entry=name)
    return begin, end


def _nbytes(info: Mapping[str, Any]) -> int:
    n = serial.dtype_from_name(info["dtype"]).itemsize
    for s in info["shape"]:
        n *= s
    return n


@dataclass
class Problem:
    """One thing wrong with a checkpoint folder."""

    path: str
    message: str
    entry: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {'entry ' + repr(self.entry) + ': ' if self.entry else ''}{self.message}"
