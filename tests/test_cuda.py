"""The CUDA paths, tested where a GPU exists (skipped, with the reason, where none is):

- exact resume after SIGKILL of a CUDA run with dropout and a shuffled loader (deterministic
  kernels, cuBLAS workspace fixed), in fresh interpreters (CUDA does not survive a fork);
- asynchronous saves staged into pinned buffers that the next save reuses, complete before
  ``save()`` returns: an update right after it never reaches the checkpoint (pytorch #144657,
  Lightning #21079), whichever stream the update runs on;
- a CUDA checkpoint restored onto CUDA and onto the CPU; CUDA RNG states of every device;
- files written from CUDA tensors opened onto CUDA, and onto the CPU where CUDA is hidden.

The RNG bookkeeping for several devices also runs here without a GPU, against a stand-in
``torch.cuda``; the staging core's CPU side is in test_staging.py.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest
import torch

import resume_worker as rw
import torchkeep
from torchkeep import CheckpointManager, TrainState
from torchkeep.keep import rng as tkrng
from torchkeep.read.formats import native
from torchkeep.keep.staging import Stager

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: torch.cuda.is_available() is False here (the CPU side of staging is "
           "tested in test_staging.py)")


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, CUBLAS_WORKSPACE_CONFIG=":4096:8", **extra)


# ----------------------------------------------------------------------------- exact resume

def _run_worker(directory: str, out: str, kill: str = "none:0") -> int:
    r = subprocess.run([sys.executable, os.path.join(HERE, "resume_worker.py"), "--dir", directory,
                        "--out", out, "--kill", kill, "--device", "cuda"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, -9), f"worker ({kill}) failed:\n{r.stderr[-3000:]}"
    return r.returncode


@needs_cuda
@pytest.mark.slow
def test_sigkill_resume_of_a_cuda_run_is_bit_identical(tmp_path):
    ref = str(tmp_path / "ref.pt")
    assert _run_worker(str(tmp_path / "ref"), ref) == 0
    out, d = str(tmp_path / "final.pt"), str(tmp_path / "ckpt")
    ends = [_run_worker(d, out, kill) for kill in ("step:6", "write:3", "commit:3", "step:30")]
    assert ends.count(-9) >= 3, ends
    assert _run_worker(d, out) == 0
    assert not [i for i in CheckpointManager(d).verify() if i.status != "ok"]
    want, got = torch.load(ref, map_location="cpu"), torch.load(out, map_location="cpu")
    assert len(got["cuda_rng"]) == torch.cuda.device_count()
    diff = rw.same(want, got)
    assert not diff, f"the resumed CUDA run differs (kills ended {ends}): {diff[:5]}"


# ----------------------------------------------------------------------------- staging

@needs_cuda
def test_pinned_staging_is_reused_and_complete_before_stage_returns():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(4096, 4096, device=dev, generator=g)
    src = {"w": torch.empty(4096, 4096, device=dev),             # 64 MiB, filled by a queued matmul
           "b": torch.randn(7, device=dev, generator=g),
           "t": torch.randn(64, 32, device=dev, generator=g).t(),  # not contiguous
           "h": torch.randn(1000, device=dev, generator=g).to(torch.bfloat16),
           "cpu": torch.randn(100)}
    s = Stager()
    for round_ in range(2):
        torch.matmul(a, a, out=src["w"])     # still running when stage() is called
        got = s.stage(src)
        for t in src.values():               # the next step, queued at once on the same stream
            t.neg_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):        # ... and on another stream
            src["b"].mul_(4)
        torch.cuda.synchronize()
        want = {k: (v / 4 if k == "b" else v).neg().cpu() for k, v in src.items()}
        for k in src:
            assert torch.equal(got.tensors[k], want[k]), (round_, k)
            assert got.tensors[k].device.type == "cpu"
        pinned = {k: b.is_pinned() for k, b in s.buffers.items()}
        assert pinned == {"w": True, "b": True, "t": True, "h": True, "cpu": False}
        ptrs = {k: b.data_ptr() for k, b in s.buffers.items()}
        if round_ == 0:
            first = ptrs
            assert got.stats.allocated > 0 and got.stats.device_nbytes >= 64 << 20
        else:
            assert ptrs == first and got.stats.allocated == 0
    assert got.devices == {k: "cuda:0" for k in ("w", "b", "t", "h")}
    s.release()
    assert s.nbytes == 0


def _cuda_state(seed: int, device: str = "cuda") -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Dropout(0.1),
                                torch.nn.Linear(1024, 256)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return TrainState(model=model, optimizer=opt)


def _step(st: TrainState) -> None:
    dev = next(st.model.parameters()).device
    loss = st.model(torch.randn(16, 512, device=dev)).square().mean()
    st.optimizer.zero_grad()
    loss.backward()
    st.optimizer.step()
    st.step += 1


@needs_cuda
def test_async_cuda_save_survives_the_next_step_and_restores_onto_cuda_and_cpu(tmp_path, monkeypatch):
    d = str(tmp_path / "run")
    st = _cuda_state(0)
    _step(st)
    gate = threading.Event()
    orig = native.NativeWriter.write

    def slow_write(self, *a, **kw):
        gate.wait(30)
        return orig(self, *a, **kw)
    monkeypatch.setattr(native.NativeWriter, "write", slow_write)
    with CheckpointManager(d, async_save=True, keep_last=None) as mgr:
        gate.set()
        mgr.save(st)
        mgr.wait()
        ptrs = {k: b.data_ptr() for k, b in mgr._stager.buffers.items()}
        from_model = [k for k in ptrs if k.startswith("model.")]
        assert from_model and all(mgr._stager.buffers[k].is_pinned() for k in from_model)
        _step(st)
        gate.clear()
        want = {k: v.detach().cpu() for k, v in st.model.state_dict().items()}
        want_avg = [s["exp_avg"].cpu() for s in st.optimizer.state.values()]
        mgr.save(st)                 # returns while the writer waits at the gate
        assert {k: b.data_ptr() for k, b in mgr._stager.buffers.items()} == ptrs
        for _ in range(3):           # the next steps change every parameter and Adam's state
            _step(st)
        gate.set()
    for device in ("cuda", "cpu"):
        got = _cuda_state(7, device)
        assert CheckpointManager(d).restore(got, which=2) == 2
        sd = got.model.state_dict()
        assert all(sd[k].device.type == device and torch.equal(sd[k].cpu(), v) for k, v in want.items())
        states = list(got.optimizer.state.values())
        assert all(s["exp_avg"].device.type == device for s in states)
        assert all(torch.equal(s["exp_avg"].cpu(), w) for s, w in zip(states, want_avg))
        _step(got)                   # and training continues on that device


# ----------------------------------------------------------------------------- RNG

@needs_cuda
def test_cuda_rng_of_every_device_round_trips_through_a_checkpoint(tmp_path):
    n = torch.cuda.device_count()
    for i in range(n):
        with torch.cuda.device(i):
            torch.cuda.manual_seed(100 + i)
        torch.rand(3, device=f"cuda:{i}")          # advance each device's generator a little
    st = TrainState(model=torch.nn.Linear(2, 2).cuda())
    with CheckpointManager(str(tmp_path / "run"), async_save=False) as mgr:
        mgr.save(st, step=1)

        def draws():
            ones = [torch.ones(1000, device=f"cuda:{i}") for i in range(n)]
            return [(torch.rand(5, device=f"cuda:{i}").cpu(),
                     torch.nn.functional.dropout(ones[i], 0.5).cpu()) for i in range(n)]
        first = draws()
        assert not torch.equal(draws()[0][0], first[0][0])   # the generators moved on
        mgr.restore(st)
        again = draws()
        assert len(mgr.load()[1]["rng"]["cuda"]) == n
    assert all(torch.equal(a, b) for f, g in zip(first, again) for a, b in zip(f, g))


# ----------------------------------------------------------------------------- files

def _cuda_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(3)
    return {"w": torch.randn(64, 32, device="cuda", generator=g),
            "b": torch.randn(32, device="cuda", generator=g),
            "h": torch.randn(8, device="cuda", generator=g).to(torch.bfloat16)}


@needs_cuda
@pytest.mark.parametrize("fmt", ["torch", "safetensors", "native"])
def test_file_written_from_cuda_opens_onto_cuda_and_cpu(tmp_path, fmt):
    sd = _cuda_sd()
    path = str(tmp_path / "f")
    if fmt == "torch":
        torch.save(sd, path)
    elif fmt == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(sd, path)
    else:
        with CheckpointManager(path, async_save=False) as mgr:
            mgr.save(sd, step=1)
    ck = torchkeep.open(path)
    if fmt == "torch":
        assert {e.location for e in ck.entries()} == {"cuda:0"}
    on_cuda = ck.state_dict(device="cuda")
    on_cpu = ck.state_dict(device="cpu")
    assert set(on_cuda) == set(sd) == set(on_cpu)
    for k, v in sd.items():
        assert on_cuda[k].device.type == "cuda" and on_cpu[k].device.type == "cpu"
        assert on_cuda[k].dtype == v.dtype and torch.equal(on_cuda[k], v)
        assert torch.equal(on_cpu[k], v.cpu())


@needs_cuda
def test_torch_save_from_cuda_opens_where_cuda_is_hidden(tmp_path):
    sd = _cuda_sd()
    torch.save(sd, tmp_path / "gpu.pt")
    torch.save({k: v.cpu() for k, v in sd.items()}, tmp_path / "ref.pt")
    code = ("import sys, torch, torchkeep\n"
            "assert not torch.cuda.is_available()\n"
            "ck = torchkeep.open(sys.argv[1])\n"
            "got, ref = ck.state_dict(), torch.load(sys.argv[2])\n"
            "assert all(torch.equal(got[k], ref[k]) and got[k].device.type == 'cpu' for k in ref)\n"
            "print('locations', sorted({e.location for e in ck.entries()}))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "gpu.pt"), str(tmp_path / "ref.pt")],
                       env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "locations ['cuda:0']" in r.stdout


# ----------------------------------------------------------------------------- without a GPU

@pytest.fixture
def fake_cuda(monkeypatch):
    """A stand-in torch.cuda with three devices whose generator states are recorded."""
    states = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(3)]
    fake = {"count": 3, "set": {}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake["count"])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])

    def set_rng_state(state, device="cuda"):
        fake["set"][device] = state.clone()
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    fake["states"] = states
    return fake


def test_rng_captures_and_restores_every_cuda_device(fake_cuda, tmp_path):
    st = TrainState(model=torch.nn.Linear(2, 2))
    with CheckpointManager(str(tmp_path / "run"), async_save=False) as mgr:
        mgr.save(st, step=1)
        assert len(mgr.load()[1]["rng"]["cuda"]) == 3
        mgr.restore(st)
    assert sorted(fake_cuda["set"]) == [0, 1, 2]
    assert all(torch.equal(fake_cuda["set"][i], fake_cuda["states"][i]) for i in range(3))


def test_rng_restore_onto_fewer_devices_warns_and_restores_those(fake_cuda, caplog):
    saved = tkrng.capture()
    fake_cuda["count"] = 2
    with caplog.at_level(logging.WARNING, logger="torchkeep.keep.rng"):
        tkrng.restore(saved)
    assert sorted(fake_cuda["set"]) == [0, 1]
    assert "3 CUDA device(s), this process sees 2" in caplog.text


def test_rng_restore_without_cuda_warns(fake_cuda, monkeypatch, caplog):
    saved = tkrng.capture()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="torchkeep.keep.rng"):
        tkrng.restore(saved)
    assert fake_cuda["set"] == {}
    assert "CUDA is not available" in caplog.text
