"""The torch.save readers (zip and legacy) against files written by the real torch.save."""
from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep
from torchkeep.read.formats.base import TensorRef

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
              torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
              torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64]


def _sample(dtype: torch.dtype, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((str(dtype), tuple(shape))) % 2**31)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality for every dtype (float8 and unsigned ints have no torch.equal)."""
    def raw(t: torch.Tensor) -> bytes:
        return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_dtype_round_trips(tmp_path, legacy):
    obj = {str(d).replace("torch.", ""): _sample(d, (3, 5)) for d in ALL_DTYPES}
    path = tmp_path / "dtypes.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    ck = torchkeep.open(path)
    assert ck.format == ("torch-legacy" if legacy else "torch-zip")
    entries = {e.name: e for e in ck.entries()}
    assert set(entries) == set(obj)
    for name, t in obj.items():
        assert entries[name].dtype == t.dtype and entries[name].shape == tuple(t.shape)
        assert entries[name].nbytes == t.numel() * t.element_size()
    got = ck.tensors()
    for name, t in obj.items():
        assert _same(got[name], t), name


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_views_offsets_strides_and_shared_storage(tmp_path, legacy):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    obj = collections.OrderedDict(
        base=base, rows=base[2:4], cols=base[:, 3:7], strided=base[::2, ::3], t=base.t(),
        scalar=torch.tensor(7.5), empty=torch.zeros(0, 3), nested=[(base[5], {"deep": base[1, 1:]})])
    path = tmp_path / "views.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    ck = torchkeep.open(path)
    got = ck.tensors()
    expect = {"base": base, "rows": obj["rows"], "cols": obj["cols"], "strided": obj["strided"],
              "t": obj["t"], "scalar": obj["scalar"], "empty": obj["empty"],
              "nested.0.0": base[5], "nested.0.1.deep": base[1, 1:]}
    assert set(got) == set(expect)
    for k, v in expect.items():
        assert torch.equal(got[k], v), k
        assert got[k].stride() == v.stride(), k
    # storage sharing survives: writing through one alias shows in the others
    assert got["rows"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
    got["base"][2, 0] = -1
    assert got["rows"][0, 0] == -1 and got["t"][0, 2] == -1
    # a subset reads only what is asked and still shares within the call
    sub = ck.tensors(["cols", "strided"])
    assert set(sub) == {"cols", "strided"}
    assert sub["cols"].untyped_storage().data_ptr() == sub["strided"].untyped_storage().data_ptr()


def test_entries_read_no_tensor_bytes(tmp_path, monkeypatch):
    torch.save({"w": torch.randn(100, 100)}, tmp_path / "a.pt")
    from torchkeep.read.formats import torchzip

    def boom(*a, **k):
        raise AssertionError("tensor bytes were read")
    monkeypatch.setattr(torchzip, "pread_into", boom)
    ck = torchkeep.open(tmp_path / "a.pt")
    (e,) = ck.entries()
    assert (e.name, e.shape, e.dtype, e.nbytes) == ("w", (100, 100), torch.float32, 40000)
    assert isinstance(ck.tree["w"], TensorRef)


def test_tree_keeps_structure_and_values(tmp_path, small_net):
    opt = torch.optim.Adam(small_net.parameters(), lr=3e-4)
    small_net(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    torch.save({"epoch": 3, "loss": 0.25, "model_state_dict": small_net.state_dict(),
                "optimizer_state_dict": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torchkeep.open(tmp_path / "ck.pt")
    tree = ck.tree
    assert tree["epoch"] == 3 and tree["loss"] == 0.25
    assert tree["optimizer_state_dict"]["param_groups"][0]["lr"] == 3e-4
    assert isinstance(tree["optimizer_state_dict"]["state"][0]["exp_avg"], TensorRef)
    loaded = ck.load()
    ref = torch.load(tmp_path / "ck.pt")
    assert loaded["epoch"] == 3
    for k, v in ref["optimizer_state_dict"]["state"][0].items():
        assert torch.equal(loaded["optimizer_state_dict"]["state"][0][k], v)


@pytest.mark.parametrize("wrap", ["plain", "dataparallel", "compile", "dp+compile"])
def test_state_dict_strips_wrapper_prefixes(tmp_path, small_net, wrap):
    model = small_net
    if "compile" in wrap:
        model = torch.compile(model)
    if wrap.startswith("dataparallel") or wrap.startswith("dp"):
        model = torch.nn.DataParallel(model)
    raw = model.state_dict()
    torch.save({"epoch": 1, "model": raw}, tmp_path / "m.pt")
    ck = torchkeep.open(tmp_path / "m.pt")
    sd = ck.state_dict()
    assert set(sd) == set(small_net.state_dict())
    for k, v in small_net.state_dict().items():
        assert torch.equal(sd[k], v)
    s = ck.summary
    assert s.wrapper == "model"
    expected = {"plain": [], "dataparallel": ["module."], "compile": ["_orig_mod."],
                "dp+compile": ["module.", "_orig_mod."]}[wrap]
    assert s.prefixes == expected


def test_largest_candidate_wins_and_is_reported(tmp_path, small_net):
    head = torch.nn.Linear(3, 2).state_dict()
    torch.save({"ema": small_net.state_dict(), "head": head, "step": 9}, tmp_path / "c.pt")
    ck = torchkeep.open(tmp_path / "c.pt")
    assert ck.summary.wrapper == "ema"
    assert ck.summary.candidates == {"ema": 9, "head": 2}
    assert "also seen: head (2)" in ck.summary.notes[0]


def test_submodule_compiled_prefix_inside_names(tmp_path, small_net):
    small_net.conv = torch.compile(small_net.conv)
    raw = small_net.state_dict()
    assert any("._orig_mod." in k for k in raw)
    torch.save(raw, tmp_path / "p.pt")
    sd = torchkeep.open(tmp_path / "p.pt").state_dict()
    assert "conv.weight" in sd and not any("_orig_mod" in k for k in sd)


def test_whole_model_pickle_lists_tensors_without_importing(tmp_path, small_net):
    torch.save(small_net, tmp_path / "whole.pt")
    ck = torchkeep.open(tmp_path / "whole.pt")
    assert ck.summary.kind == "whole-model"
    assert "conftest.SmallNet" in ck.summary.classes or any(c.endswith("SmallNet") for c in ck.summary.classes)
    sd = ck.state_dict()
    for k, v in small_net.state_dict().items():
        assert torch.equal(sd[k], v), k
    with pytest.raises(torchkeep.UnsafeCheckpointError) as err:
        ck.load()
    assert any(g.endswith("SmallNet") for g in err.value.globals)
    trusted = torchkeep.open(tmp_path / "whole.pt", trust=True).load()
    assert isinstance(trusted, torch.nn.Module)


def test_cuda_saved_file_loads_on_cpu(tmp_path):
    """A file whose storages claim 'cuda:0' (written by torch.save with a location tagger, as a
    GPU run would) loads with torchkeep on this CPU-only machine; torch.load needs map_location."""
    import torch.serialization as ser

    def tagger(storage):
        return "cuda:0" if storage.device.type == "cpu" else None

    def deserializer(storage, location):
        return None
    ser.register_package(-1, tagger, deserializer)
    try:
        w = torch.randn(4, 4)
        torch.save({"w": w}, tmp_path / "gpu.pt")
    finally:
        ser._package_registry[:] = [p for p in ser._package_registry if p[1] is not tagger]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.load(tmp_path / "gpu.pt")
    ck = torchkeep.open(tmp_path / "gpu.pt")
    assert ck.entries()[0].location == "cuda:0"
    assert torch.equal(ck.state_dict(device="cpu")["w"], w)


def test_lightning_checkpoint(tmp_path):
    L = pytest.importorskip("lightning")

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    net = Net()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(net, torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "l.ckpt")
    ck = torchkeep.open(tmp_path / "l.ckpt")
    assert ck.summary.kind == "lightning" and ck.summary.wrapper == "state_dict"
    assert ck.summary.prefixes == ["model."]
    sd = ck.state_dict()
    for k, v in net.model.state_dict().items():
        assert torch.equal(sd[k], v)
    assert ck.tree["epoch"] == 0 or ck.tree["epoch"] == 1


def _state_dicts():
    shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
    dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool,
                              torch.uint8, torch.complex64, torch.float64])
    tensor = st.tuples(dtypes, shapes, st.booleans(), st.integers(0, 2**31 - 1))
    return st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z0-9_]{1,5}){0,2}", fullmatch=True),
                           tensor, min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_state_dicts(), legacy=st.booleans())
def test_round_trip_property(tmp_path, spec, legacy):
    obj = {}
    for i, (name, (dtype, shape, as_view, seed)) in enumerate(spec.items()):
        t = _sample(dtype, shape) if seed % 3 else _sample(dtype, shape)
        if as_view and t.dim() >= 1 and t.shape[0] > 1:
            t = t[1:]  # a view with an offset into a bigger storage
        if as_view and t.dim() >= 2:
            t = t.transpose(0, 1)  # non-contiguous
        obj[name] = t
    if len(obj) > 1:
        first = next(iter(obj))
        obj["alias_of_first"] = obj[first]  # two names, one storage
    path = tmp_path / f"rt{'l' if legacy else 'z'}.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    got = torchkeep.open(path).tensors()
    assert set(got) == set(obj)
    for k, v in obj.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k], v), k
