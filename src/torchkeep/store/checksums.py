"""Checksums of bytes and tensors. sha256 names content (collision resistant, hardware
accelerated on most CPUs); crc32 checks reads quickly where the name is already known."""
from __future__ import annotations

import hashlib
import zlib
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pragma: no cover
    import torch


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def tensor_bytes(t: "torch.Tensor") -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    import torch

    if not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor")
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def crc32(data: "bytes | memoryview", value: int = 0, chunk: int = 64 << 20) -> int:
    """zlib's crc32, in chunks so that large buffers release the GIL without huge temporaries."""
    mv = memoryview(data).cast("B")
    for i in range(0, len(mv), chunk):
        value = zlib.crc32(mv[i:i + chunk], value)
    return value


def sha256_parts(parts: "Iterable[bytes | memoryview]") -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()
