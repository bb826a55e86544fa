"""convert: safetensors / torch / sharded output, aliases for shared storage, renaming and casting,
atomic replacement and verification against the source."""
from __future__ import annotations

import importlib
import json
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import torchkeep
from torchkeep.errors import CorruptCheckpointError, FormatError
from torchkeep.look.conversion import convert, parse_size

writing_mod = importlib.import_module("torchkeep.look.streamwriter")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
          torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64]


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and _raw(a) == _raw(b)


def _tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=g, dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    if dtype.is_floating_point or dtype.is_complex:  # finite values (NaN payloads still compare by bytes)
        vals = torch.randn(n * (2 if dtype.is_complex else 1), generator=g, dtype=torch.float64)
        t = vals.to(dtype.to_real() if dtype.is_complex else dtype)
        return (torch.view_as_complex(t.reshape(-1, 2)) if dtype.is_complex else t).reshape(shape)
    return raw.view(dtype).reshape(shape)


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def state_dicts(draw):
    """Mixed dtypes and shapes (0-d and empty included), ties, views with offsets and
    non-contiguous views sharing a storage."""
    sd = {}
    n = draw(st.integers(1, 6))
    for i in range(n):
        dtype = draw(st.sampled_from(DTYPES))
        sd[f"layer{i}.w"] = _tensor(dtype, draw(shapes), seed=i * 7 + 1)
    if draw(st.booleans()):
        base = _tensor(torch.float32, (4, 6), seed=99)
        sd["shared.base"] = base
        picks = draw(st.sets(st.sampled_from(["tie", "rows", "cols", "t", "tail"]), min_size=1))
        views = {"tie": base, "rows": base[1:3], "cols": base[:, 2:5], "t": base.t(), "tail": base.view(-1)[7:]}
        for p in sorted(picks):
            sd[f"shared.{p}"] = views[p]
    return sd


def _check(got, want):
    assert set(got) == set(want), set(got) ^ set(want)
    for k, v in want.items():
        assert _same(got[k], v), k


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sd=state_dicts(), torch_out=st.booleans(), via_file=st.booleans())
def test_round_trip_property(tmp_path_factory, sd, torch_out, via_file):
    folder = tmp_path_factory.mktemp("rt")
    out = folder / ("w.pt" if torch_out else "w.safetensors")
    src = sd
    if via_file:  # storage sharing then comes from the torch.save file's storage records
        src = folder / "src.pt"
        torch.save(sd, src)
    if all(t.numel() == 0 for t in sd.values()):  # a file without data is refused, never written
        with pytest.raises(FormatError, match="tensors are empty|no tensors to write"):
            convert(src, out)
        assert not out.exists()
        return
    res = convert(src, out)
    assert res.verified and res.tensors == len(sd)
    got = torchkeep.open(out).load()
    _check(got, sd)
    # tensors that were one storage in the source are one storage again
    if "shared.base" in sd:
        for k in sd:
            if k.startswith("shared."):
                assert got[k].untyped_storage().data_ptr() == got["shared.base"].untyped_storage().data_ptr(), k
        assert all(a.startswith("shared.") for a in res.aliases)


def test_round_trip_from_a_torch_save_file_with_ties(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.body = torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight

    torch.manual_seed(0)
    m = Tied()
    src = tmp_path / "m.pt"
    torch.save(torch.nn.DataParallel(m).state_dict(), src)  # 'module.' prefixed, tied weights
    res = convert(src, tmp_path / "m.safetensors")
    assert res.prefixes == ["module."] and res.aliases == {"head.weight": "emb.weight"}
    assert res.stored == 3 and res.tensors == 4
    sd = torchkeep.open(tmp_path / "m.safetensors").state_dict()
    assert sd["head.weight"].data_ptr() == sd["emb.weight"].data_ptr()
    fresh = Tied()
    fresh.load_state_dict(sd)
    x = torch.tensor([1, 2, 3])
    assert torch.equal(fresh.head(fresh.body(fresh.emb(x))), m.head(m.body(m.emb(x))))
    # the file is a plain safetensors file for other readers (the alias lives in the metadata)
    plain = load_file(tmp_path / "m.safetensors")
    assert set(plain) == {"emb.weight", "body.weight", "body.bias"}
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["torchkeep.aliases"]) == {"head.weight": "emb.weight"}


def test_complex128_is_stored_as_float64_pairs(tmp_path):
    c = torch.randn(3, 2, dtype=torch.complex128)
    convert({"c": c}, tmp_path / "c.safetensors")
    assert torch.equal(torchkeep.open(tmp_path / "c.safetensors").state_dict()["c"], c)
    plain = load_file(tmp_path / "c.safetensors")["c"]
    assert plain.dtype == torch.float64 and plain.shape == (3, 2, 2)
    assert torch.equal(torch.view_as_complex(plain), c)


def test_rename_prefixes_and_dtype(tmp_path):
    sd = {"encoder.layer.0.w": torch.randn(3, 3), "encoder.layer.1.w": torch.randn(3, 3),
          "encoder.steps": torch.arange(4), "encoder.mask": torch.ones(2, dtype=torch.bool),
          "encoder.q": torch.ones(2).to(torch.float8_e4m3fn)}
    res = convert(sd, tmp_path / "o.safetensors", strip_prefix="encoder", add_prefix="backbone",
                  rename=[r"layer\.(\d+)=blocks.\1"], dtype="bf16")
    got = torchkeep.open(tmp_path / "o.safetensors").state_dict()
    assert set(got) == {"backbone.blocks.0.w", "backbone.blocks.1.w", "backbone.steps",
                        "backbone.mask", "backbone.q"}
    assert res.renamed["encoder.layer.1.w"] == "backbone.blocks.1.w"
    assert got["backbone.blocks.0.w"].dtype == torch.bfloat16
    assert torch.equal(got["backbone.blocks.0.w"], sd["encoder.layer.0.w"].to(torch.bfloat16))
    assert got["backbone.steps"].dtype == torch.int64 and got["backbone.mask"].dtype == torch.bool
    assert got["backbone.q"].dtype == torch.float8_e4m3fn  # quantized storage is not cast
    assert sorted(res.cast) == ["backbone.blocks.0.w", "backbone.blocks.1.w"]
    with pytest.raises(ValueError, match="names collide"):
        convert(sd, tmp_path / "x.safetensors", rename=[r"layer\.\d+=layer"])
    assert not (tmp_path / "x.safetensors").exists()


def test_sharded_output_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=40)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    src = tmp_path / "bert.pt"
    torch.save({"epoch": 2, "model_state_dict": model.state_dict()}, src)
    out = tmp_path / "hf"
    res = convert(src, out, max_shard_size="30KB")
    shards = [f for f in res.files if f.endswith(".safetensors")]
    assert res.format == "hf-sharded" and len(shards) > 2 and res.wrapper == "model_state_dict"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert all(os.path.getsize(f) < 30_000 + 4096 or len(load_file(f)) == 1 for f in shards)
    cfg.save_pretrained(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.BertModel.from_pretrained(out).eval()
    ids = torch.tensor([[1, 4, 7]])
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)
    assert torchkeep.open(out).format == "hf-sharded"


def test_sharded_aliases_stay_with_their_base(tmp_path):
    base = torch.randn(40, 40)
    sd = {"a": torch.randn(40, 40), "emb": base, "b": torch.randn(40, 40), "head": base}
    res = convert(sd, tmp_path / "sh", max_shard_size="7KB")
    assert len([f for f in res.files if f.endswith(".safetensors")]) == 3
    got = torchkeep.open(tmp_path / "sh").state_dict()
    _check(got, sd)
    assert got["head"].data_ptr() == got["emb"].data_ptr()


def test_torch_output_keeps_sharing(tmp_path):
    base = torch.randn(5, 4)
    sd = {"w": base, "tied": base, "rows": base[1:3]}
    res = convert(sd, tmp_path / "o.pt", dtype="fp16")
    assert res.format == "torch-zip"
    raw = torch.load(tmp_path / "o.pt", weights_only=True)
    assert raw["w"].dtype == torch.float16 and torch.equal(raw["rows"], base[1:3].half())
    assert raw["tied"].untyped_storage().data_ptr() == raw["w"].untyped_storage().data_ptr()
    assert raw["rows"].untyped_storage().data_ptr() == raw["w"].untyped_storage().data_ptr()


def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".tmp-")]


def test_existing_destination_needs_overwrite_and_is_replaced_atomically(tmp_path):
    dst = tmp_path / "o.safetensors"
    convert({"a": torch.ones(3)}, dst)
    with pytest.raises(FileExistsError):
        convert({"a": torch.zeros(3)}, dst)
    convert({"a": torch.zeros(3)}, dst, overwrite=True)
    assert torch.equal(torchkeep.open(dst).state_dict()["a"], torch.zeros(3))
    folder = tmp_path / "sh"
    convert({"a": torch.ones(300), "b": torch.ones(300)}, folder, max_shard_size="1KB")
    convert({"a": torch.zeros(300), "b": torch.zeros(300)}, folder, max_shard_size="1KB", overwrite=True)
    assert torch.equal(torchkeep.open(folder).state_dict()["b"], torch.zeros(300))
    assert _leftovers(tmp_path) == []


def test_failure_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    dst = tmp_path / "o.safetensors"
    convert({"a": torch.ones(3)}, dst)
    before = dst.read_bytes()
    calls = {"n": 0}
    real = writing_mod._Feeder.get

    def flaky(self, it):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, it)

    monkeypatch.setattr(writing_mod._Feeder, "get", flaky)
    with pytest.raises(OSError, match="No space left"):
        convert({"a": torch.zeros(3), "b": torch.zeros(2)}, dst, overwrite=True)
    assert dst.read_bytes() == before and _leftovers(tmp_path) == []


def test_verification_catches_bytes_that_differ(tmp_path, monkeypatch):
    from torchkeep.read.formats.safetensors import SafetensorsReader

    real = SafetensorsReader.load

    def bitflip(self, refs, device="cpu"):
        out = [t.clone() for t in real(self, refs, device)]
        out[0].view(-1).view(torch.uint8)[0] ^= 1
        return out

    monkeypatch.setattr(SafetensorsReader, "load", bitflip)
    dst = tmp_path / "o.safetensors"
    with pytest.raises(CorruptCheckpointError, match="verification failed: the bytes of 'a'"):
        convert({"a": torch.ones(3)}, dst)
    assert not dst.exists() and _leftovers(tmp_path) == []


def test_refusals(tmp_path):
    with pytest.raises(FormatError, match="found no model weights"):
        torch.save({"epoch": 3}, tmp_path / "e.pt")
        convert(tmp_path / "e.pt", tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match="unknown dtype"):
        convert({"a": torch.ones(1)}, tmp_path / "a.safetensors", dtype="int3")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(1024) == 1024
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("two gigs")
    res = convert({"a": torch.ones(1), "step": 5}, tmp_path / "s.safetensors")
    assert res.skipped == {"step": "not a tensor (int)"}


def test_cli_convert(tmp_path, cli):
    torch.manual_seed(0)
    torch.save({"state_dict": {"module.fc.weight": torch.randn(3, 3), "module.fc.bias": torch.zeros(3)}},
               tmp_path / "ck.pt")
    r = cli("convert", str(tmp_path / "ck.pt"), str(tmp_path / "out.safetensors"), "--dtype", "fp16",
            "--add-prefix", "net", "--rename", "fc=head")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {tmp_path / 'out.safetensors'} (safetensors): 2 tensors")
    assert "verified" in r.stdout and r.stderr == ""  # no progress bar when piped
    sd = load_file(tmp_path / "out.safetensors")
    assert set(sd) == {"net.head.weight", "net.head.bias"} and sd["net.head.weight"].dtype == torch.float16
    r = cli("convert", str(tmp_path / "ck.pt"), str(tmp_path / "out.safetensors"))
    assert r.returncode == 2 and "exists" in r.stderr and "--force" in r.stderr
