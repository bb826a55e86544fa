"""Streaming statistics checked numerically against torch, on small inputs of every kind."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep
from torchkeep.look.stats import (StorageLoader, Thresholds, chunks, flag, histogram, stream_pair,
                                  stream_stats, tensor_stats)


def reference(t: torch.Tensor) -> dict:
    """The statistics computed the obvious way with torch, in float64, over finite values."""
    x = t.abs() if t.is_complex() else t
    x = x.reshape(-1).to(torch.float64)
    fin = x[torch.isfinite(x)]
    out = {"nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum()),
           "zeros": int((t.reshape(-1) == 0).sum()), "count": fin.numel()}
    if fin.numel():
        out.update(mean=float(fin.mean()), std=float(fin.std(correction=0)), min=float(fin.min()),
                   max=float(fin.max()), l2=float(torch.linalg.vector_norm(fin)))
    return out


def check(s, t: torch.Tensor, rel: float = 1e-9) -> None:
    ref = reference(t)
    assert (s.nan, s.inf, s.zeros) == (ref["nan"], ref["inf"], ref["zeros"])
    assert s.numel == t.numel() and s.shape == tuple(t.shape)
    if not ref["count"]:
        assert s.mean is s.std is s.min is s.max is None
        return
    scale = max(1.0, abs(ref["mean"]), ref["std"])
    assert s.mean == pytest.approx(ref["mean"], rel=rel, abs=1e-12 * scale)
    assert s.std == pytest.approx(ref["std"], rel=1e-7, abs=1e-12 * scale)
    assert s.min == ref["min"] and s.max == ref["max"]
    assert s.l2 == pytest.approx(ref["l2"], rel=1e-9)
    assert s.abs_max == max(abs(ref["min"]), abs(ref["max"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_float_stats_match_torch_across_chunks(dtype):
    torch.manual_seed(1)
    t = (torch.randn(37, 29) * 3 + 0.5).to(dtype)
    t[3, :7] = 0
    for chunk in (1, 5, 29, 100, 1 << 22):
        check(tensor_stats(t, "w", chunk=chunk), t)


def test_mean_and_std_stay_accurate_far_from_zero():
    # sum-of-squares would lose all digits here; the chunked update must not
    t = torch.full((10_000,), 1e8, dtype=torch.float64) + torch.arange(10_000, dtype=torch.float64) % 7
    s = tensor_stats(t, chunk=333)
    assert s.std == pytest.approx(float(t.std(correction=0)), rel=1e-9)
    assert s.mean == pytest.approx(float(t.mean()), rel=1e-15)


def test_nan_and_inf_are_counted_and_excluded():
    t = torch.tensor([[1.0, float("nan"), -2.0], [float("inf"), 0.0, float("-inf")]])
    s = tensor_stats(t, "x", chunk=2, bins=8)
    assert (s.nan, s.inf, s.zeros) == (1, 2, 1)
    assert s.mean == pytest.approx(-1 / 3) and (s.min, s.max) == (-2.0, 1.0)
    assert s.flags == ["nonfinite"]
    assert sum(s.histogram.counts) == 3


def test_all_nan_tensor_has_no_moments_but_is_reported():
    s = tensor_stats(torch.full((2, 3), float("nan")), "n", bins=8)
    assert s.nan == 6 and s.mean is None and s.std is None and s.histogram is None
    assert "nonfinite" in s.flags


def test_empty_and_zero_dim_tensors():
    e = tensor_stats(torch.empty(0, 5), "e", bins=4)
    assert e.numel == 0 and e.mean is None and e.zero_fraction == 0.0 and e.histogram is None
    assert e.flags == []
    z = tensor_stats(torch.tensor(-2.5), "z", bins=4)
    assert (z.shape, z.numel, z.mean, z.std, z.min, z.max) == ((), 1, -2.5, 0.0, -2.5, -2.5)
    assert sum(z.histogram.counts) == 1  # a constant gets a unit-wide range, not a crash


def test_integer_and_bool_tensors():
    big = torch.tensor([2**62 + 1, -7, 0, 5], dtype=torch.int64)
    s = tensor_stats(big, "counter")
    assert s.max == 2**62 + 1 and s.min == -7  # exact, not rounded through float64
    assert s.zeros == 1 and s.flags == []
    i8 = torch.tensor([[-128, 127], [0, 3]], dtype=torch.int8)
    check(tensor_stats(i8, chunk=3), i8)
    b = torch.tensor([True, False, True, True])
    sb = tensor_stats(b, "mask")
    assert sb.mean == 0.75 and sb.zeros == 1 and (sb.min, sb.max) == (0.0, 1.0)
    u = torch.tensor([1, 2, 65535], dtype=torch.uint16)
    assert tensor_stats(u).max == 65535


def test_complex_tensors_use_magnitude():
    t = torch.tensor([3 + 4j, 0j, complex("nan")], dtype=torch.complex64)
    s = tensor_stats(t)
    assert s.zeros == 1 and s.nan == 1 and s.max == 5.0 and s.mean == 2.5


def test_non_contiguous_tensors_match_their_contiguous_copy():
    torch.manual_seed(2)
    base = torch.randn(40, 30)
    views = [base.t(), base[::3, 1::2], base.unsqueeze(0).expand(3, 40, 30)]
    for v in views:
        a, b = tensor_stats(v, chunk=17), tensor_stats(v.contiguous(), chunk=17)
        assert (a.mean, a.std, a.min, a.max, a.zeros) == pytest.approx((b.mean, b.std, b.min, b.max, b.zeros))


def test_chunks_cut_by_shape_only_and_cover_everything_in_order():
    t = torch.arange(7 * 5 * 3).reshape(7, 5, 3)
    for size in (1, 4, 15, 16, 1000):
        a = list(chunks(t, size))
        b = list(chunks(t.permute(2, 1, 0).contiguous().permute(2, 1, 0), size))
        assert [c.numel() for c in a] == [c.numel() for c in b]
        assert all(c.numel() <= size for c in a)
        assert torch.equal(torch.cat(a), t.reshape(-1)) and torch.equal(torch.cat(b), t.reshape(-1))
    assert list(chunks(torch.empty(3, 0))) == []


def test_histogram_matches_torch_histc():
    torch.manual_seed(3)
    t = torch.randn(1000, dtype=torch.float64)
    h = histogram(t, -3.0, 3.0, bins=12, chunk=77)
    assert h.counts == [int(c) for c in torch.histc(t, 12, -3.0, 3.0).tolist()]
    assert h.edges[0] == -3.0 and h.edges[-1] == 3.0 and len(h.edges) == 13
    s = tensor_stats(t, bins=20)
    assert sum(s.histogram.counts) == 1000 and (s.histogram.lo, s.histogram.hi) == (s.min, s.max)


finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32, min_value=-1e6, max_value=1e6)
any_floats = st.one_of(finite_floats, st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(any_floats, min_size=0, max_size=80), cols=st.integers(1, 6),
       chunk=st.integers(1, 40))
def test_stats_property_against_torch(values, cols, chunk):
    n = len(values) - len(values) % cols
    t = torch.tensor(values[:n], dtype=torch.float32).reshape(-1, cols)
    check(tensor_stats(t, chunk=chunk), t, rel=1e-9)


def test_pair_changes_match_torch_norms():
    from torchkeep.read.formats.base import ref_of
    torch.manual_seed(4)
    a = {"w": torch.randn(50, 20), "same": torch.randn(7), "z": torch.zeros(4), "n": torch.tensor([1.0, 2.0])}
    b = {"w": a["w"] + 0.01 * torch.randn(50, 20), "same": a["same"].clone(), "z": torch.ones(4),
         "n": torch.tensor([1.0, float("nan")])}
    items = {i.name: i.change for i in stream_pair({k: ref_of(v) for k, v in a.items()},
                                                   {k: ref_of(v) for k, v in b.items()})}
    d = a["w"].double() - b["w"].double()
    assert items["w"].rel_change == pytest.approx(float(d.norm() / a["w"].double().norm()), rel=1e-9)
    assert items["w"].max_abs == pytest.approx(float(d.abs().max()), rel=1e-9)
    assert not items["w"].unchanged and items["same"].unchanged
    assert math.isinf(items["z"].rel_change)  # a was all zeros
    assert items["n"].nan_mismatch == 1


def test_flags():
    t = Thresholds(explode_at=100.0)
    assert flag(tensor_stats(torch.zeros(8, 4), "l.weight"), t) == ["dead"]
    assert flag(tensor_stats(torch.full((8, 4), 0.3), "l.weight"), t) == ["dead"]
    assert flag(tensor_stats(torch.zeros(8), "l.bias"), t) == []       # zero-initialised bias
    assert flag(tensor_stats(torch.ones(8), "norm.weight"), t) == []   # unit LayerNorm weight
    assert flag(tensor_stats(torch.randn(8, 4) * 1e3, "l.weight"), t) == ["exploded"]
    assert flag(tensor_stats(torch.full((8,), 5e3), "bn.running_var"), t) == []
    assert flag(tensor_stats(torch.tensor(10**6), "bn.num_batches_tracked"), t) == []
    assert flag(tensor_stats(torch.zeros(4, 4, dtype=torch.int32), "idx"), t) == []
    assert flag(tensor_stats(torch.randn(8, 4), "ok.weight"), t) == []


def test_stream_stats_over_a_torch_save_file(tmp_path):
    torch.manual_seed(5)
    emb = torch.nn.Embedding(30, 8)
    head = torch.nn.Linear(8, 30, bias=False)
    head.weight = emb.weight  # tied: one storage, two names
    sd = {"emb.weight": emb.weight.detach(), "head.weight": head.weight.detach(),
          "half": torch.randn(6, 4).half(), "steps": torch.tensor(3), "view": emb.weight.detach()[2:5]}
    path = tmp_path / "tied.pt"
    torch.save(sd, path)
    ck = torchkeep.open(path)
    refs = {e.name: e.ref for e in ck.entries()}
    reads = []
    real_load = ck.reader.load
    ck.reader.load = lambda rs, device="cpu": reads.append(len(rs)) or real_load(rs, device)
    seen = []
    got = list(stream_stats(refs, chunk=16, progress=seen.append, want_histogram=lambda s: s.name == "half"))
    assert [s.name for s in got] == list(sd)
    for s in got:
        check(s, sd[s.name])
    assert sum(reads) == len(sd) and len(reads) == 3  # the tied storage is read once for 3 names
    assert sum(seen) == sum(r.nbytes for r in refs.values())
    assert [s.name for s in got if s.histogram] == ["half"]


def test_storage_loader_lets_go_of_tensors():
    t = torch.arange(10.0)
    from torchkeep.read.formats.base import ref_of
    loader = StorageLoader({"a": ref_of(t), "b": ref_of(t * 2)})
    assert torch.equal(loader.take("b"), t * 2) and torch.equal(loader.take("a"), t)
    assert not loader._held


def test_stream_pair_orders_names_and_shares_histogram_range():
    from torchkeep.read.formats.base import ref_of
    torch.manual_seed(6)
    a = {"x": torch.randn(10, 3), "gone": torch.ones(2), "head": torch.randn(4, 3)}
    b = {"x": a["x"] * 3, "head": torch.randn(5, 3), "new": torch.zeros(2)}
    items = list(stream_pair({k: ref_of(v) for k, v in a.items()}, {k: ref_of(v) for k, v in b.items()},
                             bins=10, want_histogram=lambda s: s.name == "x"))
    assert [i.name for i in items] == ["x", "gone", "head", "new"]
    x = items[0]
    assert x.change.rel_change == pytest.approx(2.0, rel=1e-6)
    assert (x.a.histogram.lo, x.a.histogram.hi) == (x.b.histogram.lo, x.b.histogram.hi)
    assert x.b.histogram.lo == pytest.approx(float(b["x"].min()))
    assert items[1].b is None and items[2].change is None and items[3].a is None
