"""Checksums of bytes, tensors and files, all xxh3 (the ``xxhash`` C extension: several GiB/s
on one core, and it releases the GIL, so reading, copying and checking overlap on threads).
Blobs are named by the xxh3-128 of their file and tensors are checked with xxh3-64; sha256 names
and zlib's crc32 of checkpoints written before are still read and checked.

A per-tensor checksum travels as a *token*, ``"xxh3:<16 hex digits>"`` or ``"crc32:<decimal>"``,
so callers compare and store values without caring which algorithm made them. A manifest entry
holds ``"xxh3": "<hex>"`` (new) or ``"crc32": <int>`` (old). Whole files are recorded as
``{"xxh3_128": <hex>, "size": n}`` (``"sha256"`` in older records).
"""
from __future__ import annotations

import hashlib
import zlib
from typing import TYPE_CHECKING, Any, Mapping

import xxhash

if TYPE_CHECKING:  # pragma: no cover
    import torch


# Whole files (DCP shard files, the files of a sealed folder) are recorded as
# {"xxh3_128": <32 hex digits>, "size": n}; records written before hold "sha256" instead.
FILE_ALGOS = ("xxh3_128", "sha256")


def file_record(f: "Any", algo: str = "xxh3_128", chunk: int = 8 << 20) -> dict[str, Any]:
    """``{algo: hex digest, "size": bytes}`` of a binary file object, read in chunks (both
    hashes release the GIL, so several files hash in parallel on threads)."""
    if algo not in FILE_ALGOS:
        raise ValueError(f"unknown file checksum {algo!r} (known: {', '.join(FILE_ALGOS)})")
    h = xxhash.xxh3_128() if algo == "xxh3_128" else hashlib.sha256()
    size = 0
    while b := f.read(chunk):
        h.update(b)
        size += len(b)
    return {algo: h.hexdigest(), "size": size}


def record_algo(record: Mapping[str, Any]) -> str | None:
    """Which digest a file record holds (xxh3_128, or sha256 for older records); None if none."""
    return next((a for a in FILE_ALGOS if isinstance(record.get(a), str)), None)


def record_mismatch(got: Mapping[str, Any], want: Mapping[str, Any]) -> str | None:
    """What differs between a file as read (``got``, by :func:`file_record` with ``want``'s
    algorithm) and its record (``want``): a sentence, or None when they agree."""
    algo = record_algo(want)
    if algo is None:
        return "its record holds no checksum"
    if got.get("size") != want.get("size"):
        return f"holds {got.get('size')} bytes, the manifest says {want.get('size')} (truncated or rewritten?)"
    if got.get(algo) != want[algo]:
        return (f"{algo} is {str(got.get(algo))[:12]}…, the manifest says {want[algo][:12]}… "
                f"(damaged on disk?)")
    return None


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


ALGO = "xxh3"            # what new checkpoints are written with
CHUNK = 4 << 20          # feed hashes in pieces that stay in the CPU cache


class Hasher:
    """A streaming checksum of one algorithm (``update`` pieces, then ``token``)."""

    def __init__(self, algo: str = ALGO) -> None:
        if algo not in ("xxh3", "crc32"):
            raise ValueError(f"unknown checksum algorithm {algo!r}")
        self.algo = algo
        self._x = xxhash.xxh3_64() if algo == "xxh3" else None
        self._crc = 0

    def update(self, data: "bytes | memoryview") -> None:
        if self._x is not None:
            self._x.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def token(self) -> str:
        if self._x is not None:
            return f"xxh3:{self._x.intdigest():016x}"
        return f"crc32:{self._crc}"


def token_of(data: "bytes | memoryview", algo: str = ALGO, chunk: int = 64 << 20) -> str:
    """The checksum token of a buffer (in chunks: large buffers release the GIL piecewise)."""
    mv = memoryview(data).cast("B")
    if algo == "xxh3" and len(mv) <= chunk:
        return f"xxh3:{xxhash.xxh3_64_intdigest(mv):016x}"
    h = Hasher(algo)
    for i in range(0, len(mv), chunk):
        h.update(mv[i:i + chunk])
    return h.token()


def algo_of(token: str) -> str:
    return token.split(":", 1)[0]


def entry_token(entry: Mapping[str, Any]) -> str | None:
    """The checksum token of a manifest entry (xxh3 preferred, crc32 for old checkpoints)."""
    if isinstance(entry.get("xxh3"), str):
        return f"xxh3:{entry['xxh3']}"
    if isinstance(entry.get("crc32"), int):
        return f"crc32:{entry['crc32']}"
    return None


def content_name(header: bytes, data: memoryview, chunk: int = CHUNK) -> tuple[str, str]:
    """(blob name, checksum token) of a blob file = ``header`` + ``data``, in one pass over the
    data while each piece is cache-hot: the name is the xxh3-128 of the whole file (32 hex
    digits; blobs written before were named by sha256, 64 digits), the token the xxh3-64 of
    ``data``. xxh3-128 is not cryptographic: names stay unique for honest content (accidental
    collision odds about 2**-64 per pair of tensors), at ~10x the speed of sha256."""
    name = xxhash.xxh3_128()
    name.update(header)
    check = xxhash.xxh3_64()
    mv = memoryview(data).cast("B")
    for i in range(0, len(mv), chunk):
        piece = mv[i:i + chunk]
        name.update(piece)
        check.update(piece)
    return name.hexdigest(), f"xxh3:{check.intdigest():016x}"


def file_name_digest(path_or_file: Any, name: str, chunk: int = 8 << 20) -> str:
    """The digest of a blob file in the algorithm its ``name`` implies (64 hex digits: sha256,
    32: xxh3-128), to check a blob against its name."""
    h: Any = hashlib.sha256() if len(name) == 64 else xxhash.xxh3_128()
    while b := path_or_file.read(chunk):
        h.update(b)
    return h.hexdigest()


def entry_fields(token: str) -> dict[str, Any]:
    """The manifest fields that record ``token`` (the inverse of :func:`entry_token`)."""
    algo, value = token.split(":", 1)
    return {"xxh3": value} if algo == "xxh3" else {"crc32": int(value)}
