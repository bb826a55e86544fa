"""The safetensors reader against files written by the real safetensors library."""
from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

import torchkeep
from torchkeep.read.formats.safetensors import DTYPES, SafetensorsReader

DTYPE_LIST = sorted({d for d in DTYPES.values()}, key=str)


def _sample(dtype: torch.dtype, shape) -> torch.Tensor:
    """Deterministic values of any dtype (raw random bytes for the 8-bit float formats)."""
    g = torch.Generator().manual_seed(len(str(dtype)) * 31 + len(shape))
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    if dtype.itemsize == 1 and dtype not in (torch.int8, torch.uint8):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(0, 120, shape, generator=g).to(dtype)


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _raw(a) == _raw(b)


def test_every_dtype_round_trips(tmp_path):
    obj = {str(d).replace("torch.", ""): _sample(d, (3, 4)) for d in DTYPE_LIST}
    obj["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    obj["empty"] = torch.zeros(0, 7)
    path = tmp_path / "all.safetensors"
    save_file(obj, path, metadata={"format": "pt", "note": "hello"})
    ck = torchkeep.open(path)
    assert ck.format == "safetensors"
    entries = {e.name: e for e in ck.entries()}
    assert set(entries) == set(obj)
    for name, t in obj.items():
        assert entries[name].shape == tuple(t.shape) and entries[name].dtype == t.dtype, name
        assert entries[name].nbytes == t.nbytes, name
    assert ck.metadata == {"format": "pt", "note": "hello"}
    got = ck.state_dict()
    for name, t in obj.items():
        assert _same(got[name], t), name


def test_header_order_and_lazy_listing(tmp_path):
    obj = {f"layer{i}.weight": torch.full((4,), float(i)) for i in range(5)}
    path = tmp_path / "m.safetensors"
    save_file(obj, path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header_names = [k for k in json.loads(f.read(n)) if k != "__metadata__"]
    reader = SafetensorsReader(str(path))
    assert list(reader.read_tree()) == header_names
    ck = torchkeep.open(path)
    ck.entries()
    assert ck.reader._mm is None  # listing mapped nothing
    sub = ck.tensors(["layer3.weight"])
    assert list(sub) == ["layer3.weight"] and torch.equal(sub["layer3.weight"], obj["layer3.weight"])


def test_loaded_tensors_are_writable_and_the_file_never_changes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 3)}, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    sd = torchkeep.open(path).state_dict()
    sd["a"].mul_(-1)
    sd["b"][0, 0] = 42
    assert sd["a"][5] == -5
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert torch.equal(load_file(path)["a"], torch.arange(1000, dtype=torch.float32))


def test_state_dict_is_a_copy_on_write_view_matching_load_file(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    path = tmp_path / "net.safetensors"
    save_file(net.state_dict(), path)
    ours, theirs = torchkeep.open(path).state_dict(), load_file(path)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert _same(ours[k], theirs[k])
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    fresh.load_state_dict(ours)
    x = torch.randn(2, 16)
    assert torch.equal(fresh(x), net(x))


def test_save_model_ties_come_back_sharing_memory(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    m = Tied()
    path = tmp_path / "tied.safetensors"
    save_model(m, str(path))
    ck = torchkeep.open(path)
    names = {e.name for e in ck.entries()}
    assert names == {"emb.weight", "head.weight"}
    sd = ck.state_dict()
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
    assert torch.equal(sd["head.weight"], m.emb.weight)
    fresh = Tied()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.head.weight, m.head.weight)


def test_unaligned_tensor_data_is_copied_to_aligned_memory(tmp_path):
    # Valid per the spec though the safetensors writer never produces it: a 3-byte tensor first
    # leaves the float32 tensor after it at an odd address.
    a = torch.tensor([1, 2, 3], dtype=torch.uint8)
    b = torch.arange(5, dtype=torch.float32)
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [5], "data_offsets": [3, 23]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + _raw(a) + _raw(b))
    sd = torchkeep.open(path).state_dict()
    assert torch.equal(sd["a"], a) and torch.equal(sd["b"], b)
    assert sd["b"].data_ptr() % 4 == 0


def test_device_argument_and_tensors_subset(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.ones(2), "y": torch.zeros(3)}, path)
    ck = torchkeep.open(path)
    got = ck.tensors(["y"], device="cpu")
    assert list(got) == ["y"] and got["y"].device.type == "cpu"
    with pytest.raises(torchkeep.FormatError, match="no tensor named 'z'"):
        ck.tensors(["z"])


def test_detected_by_content_not_extension(tmp_path):
    path = tmp_path / "weights.pt"  # misleading name
    save_file({"x": torch.ones(2)}, path)
    assert torchkeep.open(path).format == "safetensors"
