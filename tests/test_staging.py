"""The staging core on the CPU: buffers reused across saves (same memory), laid out again when a
name, shape or dtype changes, and a snapshot that later changes to the live tensors never reach
(the race of pytorch #144657 / Lightning #21079). The pinned pool runs the same code; its CUDA
side is in test_cuda.py."""
from __future__ import annotations

import logging
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torchkeep.keep.staging as staging
from torchkeep import CheckpointManager, TrainState
from torchkeep.errors import StateError
from torchkeep.read.formats import native
from torchkeep.keep.staging import ALIGN, Stager, layout


def kinds() -> dict[str, torch.Tensor]:
    """One tensor of every kind a state holds."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "param": torch.nn.Parameter(torch.randn(5, 7)),
        "transposed": torch.randn(6, 4).t(),
        "view_of_base": base[1:3],                       # shares storage with the next one
        "base": base,
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "bool": torch.tensor([True, False, True]),
        "bf16": torch.randn(33, dtype=torch.bfloat16),
        "int8": torch.randint(-100, 100, (17,), dtype=torch.int8),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "neg": torch.randn(4, dtype=torch.complex64).conj().imag,
        "big": torch.randn(600, 1000),                   # over staging.BIG: the thread pool
        "big2": torch.randn(300, 1000),
    }


def mutate(tensors: dict[str, torch.Tensor]) -> None:
    """What the next training step does to the live tensors: in-place changes."""
    with torch.no_grad():
        for t in tensors.values():
            if t.numel() and t.dtype != torch.bool and not t.is_conj() and not t.is_neg():
                t.add_(1)
            elif t.dtype == torch.bool:
                t.logical_not_()


def expected(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.detach().resolve_conj().resolve_neg().clone() for k, t in tensors.items()}


def test_snapshot_unchanged_when_the_live_tensors_change_right_after():
    src = kinds()
    want = expected(src)
    got = Stager().stage(src)
    mutate(src)
    for k in src:
        assert torch.equal(got.tensors[k], want[k]), k
        assert got.tensors[k].dtype == want[k].dtype and got.tensors[k].shape == want[k].shape
        assert not got.tensors[k].requires_grad
        assert got.tensors[k].device.type == "cpu" and got.tensors[k].is_contiguous()
    assert got.stats.copied == len(src) and got.stats.allocated > 0
    assert not src["param"].grad_fn and src["param"].is_leaf


def test_buffers_reused_across_saves_and_hold_the_new_values():
    src = kinds()
    s = Stager()
    s.stage(src)
    ptrs = {k: b.data_ptr() for k, b in s.buffers.items()}
    mutate(src)
    want = expected(src)
    again = s.stage(src)
    assert {k: b.data_ptr() for k, b in s.buffers.items()} == ptrs
    assert again.stats.allocated == 0
    assert all(torch.equal(again.tensors[k], want[k]) for k in src)


@pytest.mark.parametrize("change", ["shape", "dtype", "added", "removed"])
def test_laid_out_again_when_a_name_shape_or_dtype_changes(change, caplog):
    src = {"a": torch.randn(8, 8), "b": torch.randn(16)}
    s = Stager()
    s.stage(src)
    if change == "shape":
        src["b"] = torch.randn(17)
    elif change == "dtype":
        src["b"] = torch.randn(16, dtype=torch.float64)
    elif change == "added":
        src["c"] = torch.ones(3)
    else:
        del src["b"]
    with caplog.at_level(logging.INFO, logger="torchkeep.keep.staging"):
        got = s.stage(src)
    assert set(s.buffers) == set(src)
    assert got.stats.allocated > 0
    assert all(torch.equal(got.tensors[k], src[k]) for k in src)
    assert all(s.buffers[k].shape == src[k].shape and s.buffers[k].dtype == src[k].dtype for k in src)
    assert "laid out again" in caplog.text


def test_buffers_are_aligned_and_disjoint():
    src = kinds()
    s = Stager()
    s.stage(src)
    spans = sorted((b.data_ptr(), b.data_ptr() + b.nbytes) for b in s.buffers.values() if b.nbytes)
    assert all(b.data_ptr() % ALIGN == 0 for b in s.buffers.values())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    offsets, total = layout({k: (tuple(t.shape), t.dtype) for k, t in src.items()})
    assert total <= sum(t.nbytes for t in src.values()) + ALIGN * len(src)
    assert s.nbytes == total


def test_synchronous_staging_passes_plain_cpu_tensors_through():
    """Nothing changes the live tensors before a synchronous write ends: no copy for those the
    writer can read as they are; views it cannot (transposed, conj, neg) are still copied."""
    src = kinds()
    got = Stager().stage(src, copy_cpu=False)
    for k in ("param", "base", "bf16", "big", "scalar"):
        assert got.tensors[k] is src[k]
    for k in ("transposed", "conj", "neg"):
        assert got.tensors[k] is not src[k] and got.tensors[k].is_contiguous()
        assert torch.equal(got.tensors[k], src[k].resolve_conj().resolve_neg())


def test_release_frees_the_buffers_and_staging_starts_again():
    s = Stager()
    src = {"a": torch.randn(10)}
    first = s.stage(src)
    s.release()
    assert s.buffers == {} and s.nbytes == 0
    assert torch.equal(first.tensors["a"], src["a"])   # the old snapshot stays readable
    assert s.stage(src).stats.allocated > 0


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool])
states = st.dictionaries(st.sampled_from(list("abcdef")), st.tuples(shapes, dtypes), max_size=5)


@settings(max_examples=60, deadline=None)
@given(seq=st.lists(states, min_size=1, max_size=4))
def test_any_sequence_of_states_is_staged_exactly_and_reused_when_unchanged(seq):
    s = Stager(threads=1)
    prev_sig, prev_ptrs = None, None
    for i, spec in enumerate(seq):
        src = {k: (torch.rand(shape) * 100).to(dtype) for k, (shape, dtype) in spec.items()}
        want = expected(src)
        got = s.stage(src)
        mutate(src)
        assert set(got.tensors) == set(src)
        assert all(torch.equal(got.tensors[k], want[k]) for k in src)
        sig = tuple((k, spec[k]) for k in src)
        ptrs = {k: b.data_ptr() for k, b in s.buffers.items()}
        if sig == prev_sig:
            assert ptrs == prev_ptrs and got.stats.allocated == 0
        prev_sig, prev_ptrs = sig, ptrs


# ----------------------------------------------------------------- through the manager

def _state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return TrainState(model=model, optimizer=opt)


def _step(state: TrainState) -> None:
    loss = state.model(torch.randn(8, 32)).square().mean()
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.step += 1


def test_manager_async_save_reuses_buffers_and_snapshot_survives_the_next_steps(tmp_path, monkeypatch):
    d = str(tmp_path / "run")
    state = _state()
    _step(state)
    gate = threading.Event()
    orig = native.NativeWriter.write

    def slow_write(self, *a, **kw):
        gate.wait(10)
        return orig(self, *a, **kw)
    monkeypatch.setattr(native.NativeWriter, "write", slow_write)
    with CheckpointManager(d, async_save=True, keep_last=None) as mgr:
        mgr.save(state)
        gate.set()
        mgr.wait()
        ptrs = {k: b.data_ptr() for k, b in mgr._stager.buffers.items()}
        assert any(k.startswith("optimizer.") for k in ptrs)  # CPU Adam state staged too
        _step(state)
        gate.clear()
        want_model = {k: v.clone() for k, v in state.model.state_dict().items()}
        want_steps = [s["step"].clone() for s in state.optimizer.state.values()]
        mgr.save(state)                          # returns while the writer waits at the gate
        assert {k: b.data_ptr() for k, b in mgr._stager.buffers.items()} == ptrs
        for _ in range(3):                    # training goes on: weights and Adam's CPU steps
            _step(state)
        gate.set()
    got = _state(seed=5)
    assert CheckpointManager(d).restore(got, which=2) == 2
    assert all(torch.equal(got.model.state_dict()[k], v) for k, v in want_model.items())
    assert [s["step"] for s in got.optimizer.state.values()] == want_steps


def test_manager_releases_staging_memory_on_close(tmp_path):
    state = _state()
    _step(state)
    mgr = CheckpointManager(str(tmp_path / "run"), async_save=True)
    mgr.save(state)
    assert mgr._stager.nbytes > 0
    mgr.close()
    assert mgr._stager.nbytes == 0 and mgr._stager.buffers == {}


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # deprecated in torch
@pytest.mark.parametrize("bad", ["sparse", "meta", "quantized"])
def test_tensors_without_dense_data_are_refused_by_name(bad):
    t = {"sparse": lambda: torch.eye(3).to_sparse(), "meta": lambda: torch.empty(3, device="meta"),
         "quantized": lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)}[bad]()
    with pytest.raises(StateError) as err:
        Stager().stage({"ok": torch.ones(2), "x.bad": t})
    assert err.value.entry == "x.bad"


def test_stage_stats_read_well():
    got = Stager().stage({"a": torch.randn(256, 1024)})
    text = str(got.stats)
    assert "staged 1/1 tensors, 1.0 MiB" in text and "GiB/s" in text and "newly allocated" in text
    assert staging.StageStats().seconds == 0.0


# ----------------------------------------------------------------- the CUDA-only code, stood in for

class FakeCudart:
    """Records cudaHostRegister/Unregister calls instead of page-locking memory."""

    def __init__(self, rc: int = 0) -> None:
        self.rc, self.registered, self.unregistered = rc, {}, []

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 - CUDA's name
        self.registered[ptr] = (size, flags)
        return self.rc

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.unregistered.append(ptr)
        return 0


def test_pinned_pool_registers_its_own_pages_once(monkeypatch):
    import mmap

    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    page = mmap.PAGESIZE
    pool = staging._Pool(pinned=True)
    try:
        specs = {"a": ((1000,), torch.float32), "b": ((3, 5), torch.float16), "c": ((0,), torch.int64)}
        assert pool.buffers_for(specs) == layout(specs)[1]
        [(ptr, (span, flags))] = fake.registered.items()
        assert ptr % page == 0 and span % page == 0 and span >= pool.nbytes and flags == 1
        raw = pool._memory        # its own mapping, pinned from the storage's first byte
        assert raw.data_ptr() == ptr and raw.untyped_storage().data_ptr() == ptr and raw.nbytes == span
        assert pool.buffers["a"].data_ptr() == ptr
        assert all(ptr <= b.data_ptr() and b.data_ptr() + b.nbytes <= ptr + span
                   for b in pool.buffers.values() if b.nbytes)
        assert pool.buffers_for(dict(specs)) == 0 and len(fake.registered) == 1     # reused
        assert pool.buffers_for({**specs, "b": ((4, 5), torch.float16)}) > 0        # laid out again
        assert fake.unregistered == [ptr] and len(fake.registered) == 2
    finally:
        pool.release()   # unregisters through the stand-in, not the real cudart
    assert len(fake.unregistered) == 2 and pool.buffers == {}


def test_pinned_pool_warns_when_registration_fails(monkeypatch, caplog):
    fake = FakeCudart(rc=2)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    allocated = []
    real_empty = torch.empty

    def empty(*a, pin_memory=False, **kw):   # no CUDA here: record the fallback's request
        allocated.append(pin_memory)
        return real_empty(*a, **kw)
    monkeypatch.setattr(torch, "empty", empty)
    with caplog.at_level(logging.WARNING, logger="torchkeep.keep.staging"):
        staging._Pool(pinned=True).buffers_for({"a": ((10,), torch.float32)})
    assert allocated[-1] is True and "cudaError 2" in caplog.text


def test_device_copies_wait_for_the_current_stream_and_end_with_an_event(monkeypatch):
    import contextlib

    calls = []

    class Stream:
        def __init__(self, device=None):
            calls.append(("new stream", device))

        def wait_stream(self, other):
            calls.append(("wait for", other))

    class Event:
        def record(self, stream):
            calls.append(("record", type(stream).__name__))

        def synchronize(self):
            calls.append(("synchronize",))

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: f"current stream {index}")
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    s = Stager()
    src = torch.randn(5)
    buf = torch.empty(5)
    [ev] = s._copy_from_cuda([(buf, src)])
    assert torch.equal(buf, src)
    assert calls == [("new stream", 0), ("wait for", "current stream 0"), ("record", "Stream")]
    s._copy_from_cuda([(buf, src)])      # the side stream is kept
    assert calls[3:] == [("wait for", "current stream 0"), ("record", "Stream")]
