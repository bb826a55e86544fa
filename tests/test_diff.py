"""diff: names on one side, shape and dtype changes, per-tensor change statistics, the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import torchkeep
from torchkeep.look import diffing
from torchkeep.look.diffing import compare, diff


@pytest.fixture
def pair(tmp_path):
    """A torch.save'd DataParallel state dict and a fine-tuned safetensors copy of it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    a = net.state_dict()
    b = {k: v.clone() for k, v in a.items()}
    b["0.weight"] += 0.5                 # big change
    b["2.weight"][0, 0] += 1e-3          # tiny change
    del b["1.running_var"]               # only in A
    b["3.extra"] = torch.ones(2)         # only in B
    b["2.bias"] = torch.zeros(7)         # shape change
    b["1.weight"] = b["1.weight"].double()  # dtype change, same values
    pa, pb = tmp_path / "a.pt", tmp_path / "b.safetensors"
    torch.save(torch.nn.DataParallel(net).state_dict(), pa)
    save_file(b, pb)
    return pa, pb, a, b


def test_report(pair):
    pa, pb, a, b = pair
    rep = diff(pa, pb)
    assert rep.a == str(pa) and rep.b == str(pb)
    assert set(rep.only_a) == {"1.running_var"} and set(rep.only_b) == {"3.extra"}
    assert [(c.name, c.shape_a, c.shape_b) for c in rep.shape_changed] == [("2.bias", (4,), (7,))]
    by = {t.name: t for t in rep.tensors}
    assert rep.tensors[0].name == "0.weight"                     # sorted by change
    w = by["0.weight"]
    assert w.max_abs == pytest.approx(0.5, rel=1e-6)
    assert w.rel_change == pytest.approx(0.5 * math.sqrt(128) / a["0.weight"].double().norm().item(), rel=1e-6)
    assert w.changed_elements == 128 and not w.unchanged
    tiny = by["2.weight"]
    assert tiny.changed_elements == 1 and tiny.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert by["1.weight"].dtype_changed and by["1.weight"].changed_elements == 0
    assert not by["1.weight"].unchanged                           # bytes differ (float64 now)
    assert by["0.bias"].unchanged and by["1.num_batches_tracked"].unchanged
    assert rep.tensors[-1].unchanged and not rep.identical
    order = [t.rel_change for t in rep.changed]
    assert order == sorted(order, reverse=True)


def test_identical_and_to_dict(tmp_path):
    sd = {"w": torch.randn(3, 3), "n": torch.tensor(float("nan"))}
    save_file(sd, tmp_path / "a.safetensors")
    torch.save(sd, tmp_path / "b.pt")
    rep = diff(tmp_path / "a.safetensors", tmp_path / "b.pt")
    assert rep.identical and all(t.unchanged for t in rep.tensors)
    d = rep.to_dict()
    json.dumps(d)
    assert d["identical"] and d["counts"]["unchanged"] == 2


def test_nan_and_inf_handling():
    a = torch.tensor([1.0, float("nan"), float("inf"), -2.0, 0.0])
    same_nan = compare("x", a, a.clone())
    assert same_nan.unchanged
    b = torch.tensor([1.0, float("nan"), float("inf"), -2.5, 0.0])
    d = compare("x", a, b)
    assert d.max_abs == pytest.approx(0.5) and d.changed_elements == 1 and d.nan_mismatch == 0
    assert math.isfinite(d.rel_change) and d.rel_change == pytest.approx(0.5 / math.sqrt(5))
    c = torch.tensor([1.0, 3.0, float("inf"), -2.0, 0.0])  # NaN on one side only
    d2 = compare("x", a, c)
    assert d2.nan_mismatch == 1 and d2.rel_change == math.inf and d2.max_abs == 0.0
    inf = compare("x", torch.zeros(3), torch.tensor([0.0, 1.0, 0.0]))
    assert inf.rel_change == math.inf and inf.max_abs == 1.0
    assert json.dumps(diffing.DiffReport("a", "b", tensors=[d2]).to_dict())


def test_streaming_slices_match_the_whole_computation(monkeypatch):
    torch.manual_seed(1)
    a, b = torch.randn(1000, 37), torch.randn(1000, 37)
    whole = compare("x", a, b)
    monkeypatch.setattr(diffing, "CHUNK", 997)
    sliced = compare("x", a, b)
    assert sliced.max_abs == whole.max_abs
    assert sliced.rel_change == pytest.approx(whole.rel_change, rel=1e-12)
    want = ((a.double() - b.double()).norm() / a.double().norm()).item()
    assert sliced.rel_change == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.bfloat16,
                                   torch.float8_e4m3fn, torch.complex64, torch.uint32])
def test_every_dtype_compares(dtype):
    x = torch.tensor([1, 0, 1, 1]).to(dtype)
    y = torch.tensor([1, 1, 1, 0]).to(dtype)
    d = compare("x", x, y)
    assert d.changed_elements == 2 and d.max_abs == 1.0
    assert compare("x", x, x.clone()).unchanged


def test_mappings_and_names_filter():
    a = {"x": torch.ones(2), "y": torch.ones(3)}
    b = {"x": torch.ones(2) * 2, "y": torch.ones(3)}
    rep = diff(a, b, names=["y"])
    assert [t.name for t in rep.tensors] == ["y"] and rep.identical


def test_cli(pair, cli):
    pa, pb, a, b = pair
    r = cli("diff", str(pa), str(pb), "--limit", "2")
    assert r.returncode == 1, r.stderr
    out = r.stdout
    assert "only in A (1):" in out and "1.running_var" in out and "only in B (1):" in out
    assert "2.bias  [4] → [7]" in out
    assert "0.weight" in out and "more changed tensors" in out
    assert "different (whole state): 7 common tensors, 3 changed, 4 unchanged, 1 dtype changes" in out
    r = cli("diff", str(pa), str(pa), "--json")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["identical"] and doc["counts"]["common"] == 9
