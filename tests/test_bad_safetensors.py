"""Damaged and lying safetensors files, built from files the real writer produced: every one
gets a clear TorchkeepError naming the file (and the tensor where there is one), quickly, and
nothing is allocated from a size the header merely claims."""
from __future__ import annotations

import json
import resource
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

import torchkeep
from torchkeep.errors import CorruptCheckpointError, FormatError, TorchkeepError


@pytest.fixture
def real(tmp_path):
    """A real safetensors file: (path, its bytes, header dict, header length)."""
    torch.manual_seed(0)
    sd = {"fc.weight": torch.randn(32, 32), "fc.bias": torch.randn(32),
          "emb": torch.randn(50, 8).to(torch.bfloat16), "steps": torch.arange(10)}
    path = tmp_path / "model.safetensors"
    save_file(sd, path, metadata={"format": "pt"})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return path, data, json.loads(data[8:8 + n]), n


def _with_header(tmp_path, data: bytes, n: int, header: dict, name="bad.safetensors"):
    """The real file's data region behind a rewritten header."""
    raw = json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return path


def _read_all(path):
    ck = torchkeep.open(path)
    ck.entries()
    return ck.state_dict()


def test_truncated_at_every_point_of_the_header_and_many_of_the_data(real, tmp_path):
    path, data, header, n = real
    cuts = list(range(0, 8 + n + 2)) + list(range(8 + n + 2, len(data), max(1, len(data) // 97)))
    cuts.append(len(data) - 1)
    t0 = time.perf_counter()
    for cut in cuts:
        p = tmp_path / "cut.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(TorchkeepError) as ei:
            _read_all(p)
        msg = str(ei.value)
        assert str(p) in msg, (cut, msg)
        if cut == 0:
            assert "empty" in msg
        elif cut < 8:
            assert "shorter than the 8-byte header length" in msg, (cut, msg)
        elif cut < 8 + n:
            assert "header declares" in msg and "truncated" in msg, (cut, msg)
        elif cut < len(data):
            assert isinstance(ei.value, CorruptCheckpointError), (cut, msg)
            assert "declares" in msg and "file ends after" in msg and "truncated?" in msg, (cut, msg)
            assert any(f"tensor '{t}'" in msg for t in header if t != "__metadata__"), msg
    assert time.perf_counter() - t0 < 30


def test_truncation_message_names_tensor_and_counts(real, tmp_path):
    path, data, header, n = real
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    p = tmp_path / "model.safetensors"
    p.write_bytes(data[:8 + n + begin + 10])
    with pytest.raises(CorruptCheckpointError) as ei:
        _read_all(p)
    assert str(ei.value) == (f"{p}: tensor '{last}' declares {end - begin} bytes but the file ends "
                             f"after 10 (file truncated?)")


def test_cli_reports_one_line_and_exit_2(real, tmp_path, cli):
    path, data, header, n = real
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[:-7])
    r = cli("inspect", str(p))
    assert r.returncode == 2
    assert r.stderr.startswith("torchkeep: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "file truncated?" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("length,exc,words", [
    (2**63 + 5, FormatError, "which no safetensors header has"),
    (200 * 1000 * 1000, FormatError, "which no safetensors header has"),
    (10**6, CorruptCheckpointError, "header declares 1000000 bytes but the file ends"),
])
def test_header_length_that_lies(real, tmp_path, length, exc, words):
    path, data, header, n = real
    p = tmp_path / "lie.safetensors"
    p.write_bytes(struct.pack("<Q", length) + data[8:])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(exc, match=words):
        _read_all(p)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def _edit(header: dict, name: str, **changes) -> dict:
    h = json.loads(json.dumps(header))
    h[name].update(changes)
    return h


@pytest.mark.parametrize("change,exc,words", [
    (dict(dtype="F7"), FormatError, "tensor 'fc.bias' has dtype 'F7', which is not a safetensors dtype"),
    (dict(dtype="F6_E2M3"), FormatError, "has no torch equivalent"),
    (dict(dtype=3), FormatError, "dtype 3"),
    (dict(shape=[-1, 32]), CorruptCheckpointError, "negative dimension"),
    (dict(shape=[2**40, 2**40, 2**40]), CorruptCheckpointError, "overflows"),
    (dict(shape=[1.5]), CorruptCheckpointError, "not a list of integers"),
    (dict(shape=[True]), CorruptCheckpointError, "not a list of integers"),
    (dict(shape=[33]), CorruptCheckpointError, "needs 132 bytes but data_offsets"),
    (dict(data_offsets=[50, 10]), CorruptCheckpointError, "misordered"),
    (dict(data_offsets=[-4, 124]), CorruptCheckpointError, "misordered"),
    (dict(data_offsets=[0]), CorruptCheckpointError, "not a pair of integers"),
    (dict(data_offsets=[10**12, 10**12 + 128]), CorruptCheckpointError,
     "tensor 'fc.bias' declares 128 bytes but the file ends after 0"),
])
def test_lying_entry(real, tmp_path, change, exc, words):
    path, data, header, n = real
    p = _with_header(tmp_path, data, n, _edit(header, "fc.bias", **change))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(exc) as ei:
        _read_all(p)
    assert words in str(ei.value) and str(p) in str(ei.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000


def test_overlapping_offsets(real, tmp_path):
    path, data, header, n = real
    h = json.loads(json.dumps(header))
    a, b = "fc.bias", "fc.weight"
    h[a]["data_offsets"] = [h[b]["data_offsets"][0] + 4, h[b]["data_offsets"][0] + 4 + 128]
    p = _with_header(tmp_path, data, n, h)
    with pytest.raises(CorruptCheckpointError, match="overlap") as ei:
        _read_all(p)
    assert "'fc.bias'" in str(ei.value) and "'fc.weight'" in str(ei.value)


@pytest.mark.parametrize("raw,words", [
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}', "not valid JSON"),
    (b'{"a": 1, "a": 2}', "appears twice"),
    (b'["a"]', "JSON list"),
    (b'{"a": [1, 2]}', "header entry is list"),
    (b'{"a": {"dtype": "F32"}}', "lacks shape, data_offsets"),
    (b'{"__metadata__": [1], "a": {}}', "__metadata__ is a JSON list"),
    (b'{"__metadata__": {"torchkeep.aliases": "{{"}}', "torchkeep.aliases is malformed"),
    (b'{"__metadata__": {"torchkeep.aliases": "{\\"b\\": \\"zz\\"}"}}', "refers to 'zz'"),
    (b'{"\xff\xfe": 1}', "not valid JSON"),
])
def test_malformed_header(tmp_path, raw, words):
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(TorchkeepError) as ei:
        _read_all(p)
    assert words in str(ei.value), str(ei.value)


def test_alias_pointing_outside_its_base(real, tmp_path):
    path, data, header, n = real
    h = json.loads(json.dumps(header))
    h["__metadata__"]["torchkeep.aliases"] = json.dumps(
        {"view": {"base": "fc.bias", "shape": [8], "offset": 30}})
    p = _with_header(tmp_path, data, n, h)
    with pytest.raises(CorruptCheckpointError, match="alias 'view' reaches element 37 of 'fc.bias'"):
        _read_all(p)


def test_text_and_tiny_files(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("just some notes, not a checkpoint at all\n")
    with pytest.raises(FormatError, match="not a checkpoint: a text file"):
        torchkeep.open(p)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CorruptCheckpointError, match="shorter than the 8-byte header"):
        _read_all(tiny)


def test_bit_flips_in_the_header_never_escape_as_other_errors(real, tmp_path):
    path, data, header, n = real
    for pos in range(8, 8 + n, 3):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        p = tmp_path / "flip.safetensors"
        p.write_bytes(bytes(bad))
        try:
            _read_all(p)
        except TorchkeepError as e:
            assert str(p) in str(e)
