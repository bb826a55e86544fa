"""TrainState and typed JSON: what is captured, how it comes back, what is refused and why."""
from __future__ import annotations

import json
import math
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from torchkeep import StateError, TrainState
from torchkeep.keep.progress import ResumableIndexSampler
from torchkeep.store import typedjson as serial

# ----------------------------------------------------------------------------- helpers

def through_json(obj, allow_pickle=False):
    """encode -> JSON text -> decode, tensors passed by key (as the manager does via files)."""
    enc = serial.encode(obj, allow_pickle=allow_pickle)
    text = json.dumps(enc.tree, allow_nan=False)
    tensors = {k: t.clone() for k, t in enc.tensors.items()}

    def pickled(v, path):
        return v.load()
    return serial.decode(json.loads(text), lambda k, tag: tensors[k], pickled=pickled)


def assert_same(a, b, path="x"):
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8) if a.numel() else a,
                           b.reshape(-1).view(torch.uint8) if b.numel() else b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif isinstance(a, float):
        assert a == b and math.copysign(1, a) == math.copysign(1, b), path
    else:
        assert a == b, path


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int8, torch.uint8, torch.bool, torch.complex64]


@hst.composite
def tensors(draw):
    dtype = draw(hst.sampled_from(_DTYPES))
    shape = draw(hst.lists(hst.integers(0, 4), max_size=3))
    t = (torch.randn(shape) * 100).to(dtype) if dtype != torch.complex64 else torch.randn(shape, dtype=dtype)
    if draw(hst.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous
    return t


scalars = (hst.none() | hst.booleans() | hst.integers(-2**70, 2**70) | hst.floats(allow_nan=True)
           | hst.text(max_size=8) | hst.binary(max_size=8))
values = hst.recursive(
    scalars | tensors(),
    lambda inner: (hst.lists(inner, max_size=4) | hst.tuples(inner, inner)
                   | hst.dictionaries(hst.text(max_size=6), inner, max_size=4)
                   | hst.dictionaries(hst.integers(-5, 5), inner, max_size=3)),
    max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_typed_json_round_trip(obj):
    assert_same(obj, through_json(obj))


def test_type_tags_keep_what_json_loses():
    obj = {"t": (1, 2.0), "i": 3, "f": 3.0, "n": None, "inf": float("-inf"), "d": torch.float16,
           "dev": torch.device("cpu"), "size": torch.Size([2, 3]), 5: "int key", "s": {1, 2},
           "np": np.float32(1.5), "arr": np.arange(4, dtype=np.uint32), "b": b"\x00\xff",
           "od": OrderedDict(a=1), "__t": "a key that looks like a tag"}
    back = through_json(obj)
    assert back["t"] == (1, 2.0) and type(back["t"][1]) is float and type(back["i"]) is int
    assert type(back["f"]) is float and back["n"] is None and back["inf"] == float("-inf")
    assert back["d"] is torch.float16 and back["size"] == torch.Size([2, 3]) and back[5] == "int key"
    assert back["s"] == {1, 2} and type(back["np"]) is np.float32 and back["b"] == b"\x00\xff"
    assert back["arr"].dtype == np.uint32 and back["arr"].tolist() == [0, 1, 2, 3]
    assert back["__t"] == "a key that looks like a tag" and back["od"] == {"a": 1}


class Custom:
    pass


def module_level_schedule(step):
    return 0.5 ** step


def test_unstorable_object_names_its_path():
    with pytest.raises(StateError) as e:
        serial.encode({"extras": {"cb": [1, Custom()]}})
    assert e.value.entry == "extras.cb[1]"
    assert "Custom" in str(e.value) and "trust=True" in str(e.value)
    with pytest.raises(StateError, match="lambda"):
        serial.encode({"f": lambda x: x}, allow_pickle=True)
    back = through_json({"obj": module_level_schedule}, allow_pickle=True)
    assert back["obj"] is module_level_schedule
    enc = serial.encode({"obj": module_level_schedule}, allow_pickle=True)
    with pytest.raises(StateError, match="trust=True"):
        serial.decode(enc.tree, lambda k, t: None)  # refused unless the caller opts in


def test_lambda_lr_refused_with_path_unless_pickle_allowed():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    with pytest.raises(StateError) as e:
        TrainState(model=model, optimizer=opt, scheduler=sched).capture()
    assert e.value.entry == "scheduler.lr_lambdas[0]"

    inner = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    seq = torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, total_iters=2), inner], milestones=[2])
    with pytest.raises(StateError) as e:
        TrainState(optimizer=opt, scheduler={"main": seq}).capture()
    assert e.value.entry == "scheduler.main._schedulers[1].lr_lambdas[0]"

    # A module-level function is stored by reference with allow_pickle and comes back.
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt, module_level_schedule)
    for _ in range(3):
        opt.step()
        sched2.step()
    st = TrainState(optimizer=opt, scheduler=sched2, trust=True)
    back = through_json(st.capture(), allow_pickle=True)
    opt_b = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0)
    TrainState(optimizer=opt_b, scheduler=sched_b, trust=True).restore(back, strict=False)
    assert sched_b.lr_lambdas[0] is module_level_schedule
    assert sched_b.last_epoch == 3 and sched_b.get_last_lr() == sched2.get_last_lr()


def _schedulers(opt):
    S = torch.optim.lr_scheduler
    return {
        "sequential": S.SequentialLR(opt, [S.LinearLR(opt, 0.1, total_iters=3), S.CosineAnnealingLR(opt, 10)],
                                     milestones=[3]),
        "chained": S.ChainedScheduler([S.StepLR(opt, 2, 0.5), S.ExponentialLR(opt, 0.9)]),
        "onecycle": S.OneCycleLR(opt, max_lr=0.5, total_steps=40),
        "plateau": S.ReduceLROnPlateau(opt, patience=1, factor=0.5),
    }


@pytest.mark.parametrize("kind", ["sequential", "chained", "onecycle", "plateau"])
def test_scheduler_resume_continues_the_same_lrs(kind):
    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 3)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        return m, opt, _schedulers(opt)[kind]

    def step(opt, sched, i):
        opt.step()
        if kind == "plateau":
            sched.step(1.0 if i % 3 else 2.0)
        else:
            sched.step()

    m, opt, sched = make()
    for i in range(7):
        step(opt, sched, i)
    back = through_json(TrainState(model=m, optimizer=opt, scheduler=sched).capture())
    m2, opt2, sched2 = make()
    TrainState(model=m2, optimizer=opt2, scheduler=sched2).restore(back)
    for i in range(7, 20):
        step(opt, sched, i)
        step(opt2, sched2, i)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups], i


def test_optimizer_checked_by_name_and_shape():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 5))
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    back = through_json(TrainState(model=m, optimizer=opt).capture())

    # Same shapes, other order: torch would load silently; we name the parameter.
    m2 = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 5))
    params = list(m2.named_parameters())
    opt2 = torch.optim.Adam([params[2][1], params[3][1], params[0][1], params[1][1]])
    with pytest.raises(StateError) as e:
        TrainState(model=m2, optimizer=opt2).restore(back)
    assert "'0.weight'" in str(e.value) and "'1.weight'" in str(e.value)
    assert e.value.entry == "optimizer.1.weight"
    # The model was not touched: the check runs before anything is loaded.
    assert not torch.equal(m2[0].weight, m[0].weight)

    m3 = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 5))
    with pytest.raises(StateError, match=r"shape \[5, 4\].*shape \[6, 4\]"):
        TrainState(model=m3, optimizer=torch.optim.Adam(m3.parameters())).restore(
            {k: v for k, v in back.items() if k != "model"}, strict=False)


def test_model_mismatch_is_a_state_error_naming_the_component():
    back = through_json(TrainState(model={"gen": torch.nn.Linear(2, 3)}).capture())
    with pytest.raises(StateError) as e:
        TrainState(model={"gen": torch.nn.Linear(2, 4)}).restore(back)
    assert e.value.entry == "model.gen" and "size mismatch" in str(e.value)
    with pytest.raises(StateError, match="holds models"):
        TrainState(model={"disc": torch.nn.Linear(2, 3)}).restore(back)
    with pytest.raises(StateError, match="has an optimizer but the checkpoint holds none"):
        TrainState(model={"gen": torch.nn.Linear(2, 3)}, optimizer=torch.optim.SGD(
            torch.nn.Linear(1, 1).parameters(), lr=1)).restore(back)


def test_several_models_optimizers_scaler_extras_rng():
    torch.manual_seed(0)
    g, d = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    og, od = torch.optim.Adam(g.parameters()), torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.9)
    d(g(torch.randn(4, 3))).sum().backward()
    og.step()
    od.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ext = {"best": 0.25, "hist": [1, 2], "ema": torch.arange(3.0)}
    st = TrainState(model={"gen": g, "disc": d}, optimizer={"gen": og, "disc": od}, scaler=scaler,
                    extras=ext)
    st.step = 17
    back = through_json(st.capture())
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))

    torch.manual_seed(5)
    g2, d2 = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    og2, od2 = torch.optim.Adam(g2.parameters()), torch.optim.SGD(d2.parameters(), lr=0.1, momentum=0.9)
    scaler2 = torch.amp.GradScaler("cpu")
    ema = torch.zeros(3)
    ext2 = {"ema": ema}
    st2 = TrainState(model={"gen": g2, "disc": d2}, optimizer={"gen": og2, "disc": od2},
                     scaler=scaler2, extras=ext2)
    st2.restore(back)
    assert st2.step == 17 and scaler2.get_scale() == 1024.0
    assert ext2["best"] == 0.25 and ext2["hist"] == [1, 2] and ext2["ema"] is ema
    assert torch.equal(ema, torch.arange(3.0))
    assert torch.equal(og2.state_dict()["state"][0]["exp_avg"], og.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(od2.state_dict()["state"][0]["momentum_buffer"],
                       od.state_dict()["state"][0]["momentum_buffer"])
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1]
    assert torch.equal(draws[2], expected_draws[2])


# ----------------------------------------------------------------------------- data position

class Recording(torch.utils.data.Dataset):
    """Returns its index; records which indices were loaded in this process."""

    def __init__(self, n):
        self.n = n
        self.loaded = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loaded.append(i)
        return torch.tensor(i), torch.rand(())  # the rand draws from the global RNG


def _loader(ds, **kw):
    return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, **kw)


@pytest.mark.parametrize("own_generator", [False, True])
def test_resume_mid_epoch_continues_the_same_order_without_loading_skipped(own_generator):
    def make():
        ds = Recording(22)
        gen = torch.Generator().manual_seed(7) if own_generator else None
        return ds, TrainState(dataloader=_loader(ds, generator=gen))

    torch.manual_seed(0)
    ds, st = make()
    order, rands = [], []
    snapshot = None
    for epoch in range(2):
        for i, (idx, r) in enumerate(st.batches()):
            order.append(idx.tolist())
            rands.append(r.tolist())
            if epoch == 1 and i == 2:
                snapshot = through_json(st.capture())
                after = len(order)
    assert st.epoch == 2 and st.step == 12
    # The same loop without torchkeep sees the same batches: batches() changes nothing.
    torch.manual_seed(0)
    plain_ds = Recording(22)
    gen = torch.Generator().manual_seed(7) if own_generator else None
    plain = [idx.tolist() for _ in range(2) for idx, _ in _loader(plain_ds, generator=gen)]
    assert plain == order

    torch.manual_seed(123)  # a fresh process would be elsewhere in the stream
    ds2, st2 = make()
    st2.restore(snapshot)
    assert (st2.epoch, st2.position, st2.step) == (1, 3, 9)
    rest = [(idx.tolist(), r.tolist()) for idx, r in st2.batches()]
    assert [b for b, _ in rest] == order[after:]
    assert [r for _, r in rest] == rands[after:]
    assert sorted(ds2.loaded) == sorted(i for b in order[after:] for i in b)  # skipped: never loaded
    assert st2.epoch == 2 and st2.position == 0


def test_break_then_batches_continues_the_epoch_and_loader_is_untouched():
    ds = Recording(12)
    dl = _loader(ds)
    st = TrainState(dataloader=dl)
    assert len(dl) == 3
    seen = []
    for idx, _ in st.batches():
        seen.append(idx.tolist())
        break
    assert st.epoch == 0 and st.position == 1
    assert isinstance(dl.batch_sampler, ResumableIndexSampler) and dl.batch_sampler.batch_size == 4
    seen += [idx.tolist() for idx, _ in st.batches()]
    assert st.epoch == 1 and sorted(sum(seen, [])) == list(range(12))
    with pytest.raises(StateError, match="several dataloaders"):
        TrainState(dataloader={"a": _loader(ds), "b": _loader(ds)}).batches()


def test_iterable_dataset_cannot_resume_mid_epoch():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(8))

    st = TrainState(dataloader=torch.utils.data.DataLoader(Stream(), batch_size=2))
    for _ in st.batches():
        break
    with pytest.raises(StateError, match="IterableDataset"):
        st.batches()
