"""Quantized tensors (torch.ao, torchao), TorchScript archives and torch.export .pt2 archives,
written by the real writers, read as data and compared with the writers' own loaders."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import torchkeep
from conftest import run_cli

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning)


def _same(a, b) -> bool:
    if isinstance(b, tuple):
        return isinstance(a, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(b, torch.Tensor) and b.is_quantized:
        return (a.is_quantized and a.qscheme() == b.qscheme() and a.dtype == b.dtype
                and torch.equal(a.int_repr(), b.int_repr()) and torch.equal(a.dequantize(), b.dequantize()))
    if isinstance(b, torch.Tensor) and type(b) is not torch.Tensor and not isinstance(b, torch.nn.Parameter):
        return (type(a) is type(b) and torch.equal(a.qdata, b.qdata)
                and torch.equal(a.dequantize(), b.dequantize()))
    if isinstance(b, torch.Tensor):
        return type(a) in (torch.Tensor, torch.nn.Parameter) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_dynamic_quantization_packed_params(tmp_path):
    q = torch.ao.quantization.quantize_dynamic(_net(), {torch.nn.Linear}, dtype=torch.qint8)
    path = tmp_path / "dyn.pt"
    torch.save(q.state_dict(), path)
    ref = torch.load(path, weights_only=False)
    with torchkeep.open(path) as ck:
        e = {x.name: x for x in ck.entries()}
        w = e["0._packed_params._packed_params.0"]
        assert w.dtype == torch.qint8 and w.scheme.startswith("per_tensor_affine")
        sd = ck.state_dict()
        assert list(sd) == list(ref) and all(_same(sd[k], ref[k]) for k in ref)
        f = ck.state_dict(dequantize=True)["0._packed_params._packed_params"][0]
        want = ref["0._packed_params._packed_params"][0].dequantize()
        assert f.dtype == torch.float32 and torch.equal(f, want)
    p = run_cli("inspect", str(path), check=True)
    assert "model: 46 parameters" in p.stdout, p.stdout  # 8*4+4 + 4*2+2, scale/zero_point apart


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_tensors_per_tensor_and_per_channel(tmp_path, per_channel):
    torch.manual_seed(1)
    w = torch.randn(5, 3)
    t = (torch.quantize_per_channel(w, torch.rand(5) + 0.01, torch.arange(5), 0, torch.qint8)
         if per_channel else torch.quantize_per_tensor(w, 0.05, 7, torch.quint8))
    torch.save({"w": t, "b": torch.ones(5)}, tmp_path / "q.pt")
    with torchkeep.open(tmp_path / "q.pt") as ck:
        e = {x.name: x for x in ck.entries()}["w"]
        assert e.scheme.startswith("per_channel_affine axis=0" if per_channel else "per_tensor_affine")
        assert _same(ck.state_dict()["w"], t)
        assert torch.equal(ck.state_dict(dequantize=True)["w"], t.dequantize())
        assert ck.globals() and all(g.verdict == "safe" for g in ck.globals())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
@pytest.mark.parametrize("config", ["Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig",
                                    "IntxWeightOnlyConfig", "Float8WeightOnlyConfig"])
def test_torchao_subclasses(tmp_path, config):
    import torchao.quantization as taq

    m = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))
    taq.quantize_(m, getattr(taq, config)())
    path = tmp_path / "ao.pt"
    torch.save(m.state_dict(), path)
    ref = torch.load(path, weights_only=False)
    with torchkeep.open(path) as ck:
        e = {x.name: x for x in ck.entries()}
        assert e["0.weight"].scheme and type(ref["0.weight"]).__name__ in e["0.weight"].scheme
        sd = ck.state_dict()
        assert all(_same(sd[k], ref[k]) for k in ref)
        deq = ck.state_dict(dequantize=True)
        assert type(deq["0.weight"]) is torch.Tensor
        assert torch.equal(deq["0.weight"], ref["0.weight"].dequantize())
    p = run_cli("inspect", str(path), check=True)
    assert f"model: {32 * 16 + 16 + 16 * 8 + 8} parameters" in p.stdout, p.stdout


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.register_buffer("buf", torch.ones(2))
        self.register_buffer("tmp", torch.zeros(2), persistent=False)
        self.c = torch.tensor([1.0, 2.0])

    def forward(self, x):
        return self.fc(x) + self.buf + self.c + self.tmp


def test_torchscript_scripted_and_traced(tmp_path):
    torch.jit.script(_net()).save(str(tmp_path / "s.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(_Tied(), torch.randn(1, 3)).save(str(tmp_path / "t.pt"))
    for name in ("s.pt", "t.pt"):
        f = str(tmp_path / name)
        ref = torch.jit.load(f).state_dict()
        with torchkeep.open(f) as ck:
            assert ck.summary.kind == "torchscript"
            sd = ck.state_dict()
            assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
            assert any(g.module.startswith("__torch__") for g in ck.globals())
    with torchkeep.open(tmp_path / "t.pt") as ck:
        consts = [e for e in ck.entries() if e.name.startswith("constants.")]
        assert len(consts) == 1 and torch.equal(ck.tensors([consts[0].name])[consts[0].name],
                                                torch.tensor([1.0, 2.0]))
    p = run_cli("inspect", str(tmp_path / "s.pt"), check=True)
    assert "model: 46 parameters" in p.stdout, p.stdout


def test_exported_program_pt2(tmp_path):
    ep = torch.export.export(_Tied(), (torch.randn(1, 3),))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    loaded = torch.export.load(str(tmp_path / "m.pt2"))
    with torchkeep.open(tmp_path / "m.pt2") as ck:
        assert ck.format == "torch-export"
        sd = ck.state_dict()
        ref = loaded.state_dict
        assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
        consts = ck.tensors(["constants.c", "constants.tmp"])
        assert torch.equal(consts["constants.c"], loaded.constants["c"])
    p = run_cli("inspect", str(tmp_path / "m.pt2"), check=True)
    assert "model: 8 parameters" in p.stdout and "buffers: 1 tensors" in p.stdout, p.stdout


def test_scan_reports_the_code_programs_carry(tmp_path):
    """TorchScript source is a program torch.jit.load compiles and runs: listed as code, unsafe,
    and never misread as a protocol-0 pickle ('class ...' starts like GLOBAL). An exported program
    is a graph, not code that runs on load: safe, with a note that says what it holds."""
    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), tmp_path / "ts.pt")
    rep = torchkeep.scan(tmp_path / "ts.pt")
    assert rep.verdict == "unsafe" and rep.code
    assert all("TorchScript source" in c and c.split(" ")[0].endswith(".py") for c in rep.code)
    assert not [g for g in rep.globals if g.member.endswith(".py")], rep.globals  # no text-as-pickle
    assert not [e for e in rep.errors if ".py:" in e], rep.errors

    ep = torch.export.export(model, (torch.randn(1, 3),))
    torch.export.save(ep, tmp_path / "m.pt2")
    rep = torchkeep.scan(tmp_path / "m.pt2")
    assert rep.verdict == "safe" and not rep.code
    assert any("an exported program" in n for n in rep.notes), rep.notes
    p = run_cli("scan", str(tmp_path / "ts.pt"))
    assert p.returncode == 1 and "code     " in p.stdout and "TorchScript source" in p.stdout
