"""Checkpoints of a process group: FSDP2 shards written by every rank through DCP, DDP state
written once, exact resume, resharding 2 -> 1 and 2 -> 3, a rank SIGKILLed mid-save, damaged
shards, consolidation. Real gloo process groups on 127.0.0.1, CPU only; the ranks are forked
from the test process (torch is imported once) and talk through a free TCP port.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch

import torchkeep
from torchkeep import CheckpointManager, CorruptCheckpointError, TrainState
from torchkeep.read.formats import native
from torchkeep.read.formats import nativeshards as sharded

dist = pytest.importorskip("torch.distributed")

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                       reason="the ranks are forked"),
]

SAMPLES, BATCH = 24, 4   # 2 ranks: 3 batches an epoch; 3 ranks: 2


# -- starting ranks ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(r: int, n: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)  # forked: never touch the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                      WORLD_SIZE=str(n), LOCAL_RANK=str(r))
    code = 0
    try:
        dist.init_process_group("gloo", rank=r, world_size=n, timeout=timedelta(seconds=60))
        fn(*args)
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(n: int, fn, *args, timeout: float = 150, grace: float = 15) -> list[int]:
    """Run ``fn(*args)`` on ``n`` forked ranks of a gloo group; their exit codes. When one rank
    fails, the others get ``grace`` seconds to notice (as torchrun, then they are killed)."""
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, n, port, fn, args), daemon=True) for r in range(n)]
    for p in procs:
        p.start()
    t0, failed_at = time.monotonic(), None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = now
        if now - t0 > timeout or (failed_at is not None and now - failed_at > grace):
            for p in procs:
                if p.is_alive():
                    p.kill()
        time.sleep(0.05)
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


# -- the training run ----------------------------------------------------------------------------

def build(kind: str, seed: int) -> TrainState:
    """A small MLP with dropout, Adam, StepLR and a shuffled loader; ``kind`` 'plain', 'ddp' or
    'fsdp' (FSDP2 ``fully_shard`` per layer and at the root)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.25),
                                torch.nn.Linear(16, 4))
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in (model[0], model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(SAMPLES, 8, generator=g),
                                          torch.randn(SAMPLES, 4, generator=g))
    if dist.is_initialized():
        sampler = torch.utils.data.distributed.DistributedSampler(data, shuffle=True, seed=3)
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=sampler)
    else:
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True,
                                             generator=torch.Generator().manual_seed(3))
    return TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader)


def train(state: TrainState, upto: int, mgr: CheckpointManager | None = None, save_at=()) -> None:
    while state.step < upto:
        for x, y in state.batches():
            loss = torch.nn.functional.mse_loss(state.model(x), y)
            state.optimizer.zero_grad()
            loss.backward()
            state.optimizer.step()
            state.scheduler.step()
            if mgr is not None and state.step in save_at:
                mgr.save(state)
            if state.step >= upto:
                break


def full_state(state: TrainState, *, gather: bool = False) -> dict:
    """Model and optimizer tensors under canonical names, whole (gathered to rank 0 with
    ``gather``), plus the scheduler's learning rates."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if gather else None
    msd = get_model_state_dict(state.model, options=opts)
    osd = get_optimizer_state_dict(state.model, state.optimizer, options=opts)
    out = {f"model.{k}": v.detach().clone() for k, v in msd.items()}
    for fqn, s in osd.get("state", {}).items():
        for k, v in s.items():
            out[f"optimizer.{fqn}.{k}"] = v.detach().clone()
    out["lr"] = torch.tensor([g["lr"] for g in state.optimizer.param_groups], dtype=torch.float64)
    return out


def assert_same(ref: dict, got: dict, what: str = "") -> None:
    assert sorted(ref) == sorted(got), f"{what}: keys differ: {sorted(set(ref) ^ set(got))}"
    bad = [k for k in ref if ref[k].dtype != got[k].dtype or not torch.equal(ref[k], got[k])]
    assert not bad, f"{what}: not bit-identical: {bad}"


def _two_rank_run(d: str, ddp_dir: str, out: str) -> None:
    me = dist.get_rank()
    st = build("fsdp", seed=0)
    torch.manual_seed(100 + me)  # each rank's own dropout stream
    with CheckpointManager(d, keep_last=3) as mgr:  # asynchronous saves (dcp.async_save)
        train(st, 6, mgr, save_at=(2, 4, 6))
    ref = full_state(st, gather=True)
    if me == 0:
        torch.save(ref, os.path.join(out, "ref6.pt"))
        man = json.load(open(os.path.join(d, native.step_dirname(6), native.MANIFEST)))
        assert man[sharded.SECTION]["world_size"] == 2
        assert sorted(man[sharded.SECTION]["files"]) == [
            "shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp"]

    # Exact resume from the asynchronous save at step 2 (training changed every tensor after it
    # returned): fresh objects, other initial weights and RNG.
    st2 = build("fsdp", seed=1)
    torch.manual_seed(7)
    mgr2 = CheckpointManager(d, keep_last=3)
    assert mgr2.restore(st2, 2) == 2
    assert (st2.step, st2.epoch, st2.position) == (2, 0, 2)
    train(st2, 6)
    got = full_state(st2, gather=True)
    if me == 0:
        assert_same(ref, got, "resumed at step 2 on 2 ranks")
        open(os.path.join(out, "resume-ok"), "w").close()

    # DDP: replicated state, written once by rank 0 and restored on every rank; each rank's RNG
    # (dropout) is kept, so the resumed run is bit-identical on every rank. (2 ranks: with 3, a
    # new DDP instance's gradient all-reduce may sum in another order, which no checkpoint fixes.)
    ddp = build("ddp", seed=0)
    torch.manual_seed(200 + me)
    with CheckpointManager(ddp_dir, async_save=False) as mgr:
        train(ddp, 3, mgr, save_at=(3,))
    ddp3 = full_state(ddp)
    if me == 0:
        torch.save(ddp3, os.path.join(out, "ddp3.pt"))
    train(ddp, 6)
    ref_ddp = full_state(ddp)
    ddp2 = build("ddp", seed=1)
    torch.manual_seed(0)
    assert CheckpointManager(ddp_dir).restore(ddp2) == 3
    assert_same(ddp3, full_state(ddp2), f"DDP restored on rank {me}")
    train(ddp2, 6)
    assert_same(ref_ddp, full_state(ddp2), f"DDP resumed on rank {me}")
    if me == 0:
        open(os.path.join(out, "ddp-ok"), "w").close()

    # Rank 1 dies while step 8 is saved: after DCP finished (.metadata written, every shard on
    # disk) and before torchkeep's commit. Rank 0 must fail; nothing may look committed.
    train(st2, 8)
    if me == 1:
        def die(path):
            os.kill(os.getpid(), signal.SIGKILL)
        sharded.file_digest = die
    mgr2.save(st2)
    mgr2.wait()
    raise AssertionError(f"rank {me}: the save of step 8 succeeded although rank 1 died")


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory, request):
    """The 2-rank FSDP2 run, once per test session (shared by pytest-xdist workers)."""
    # Loaded before forking, so that no rank imports them (seconds each on a busy machine).
    import torch._dynamo  # noqa: F401  (fully_shard imports it on first use)
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    base = root / "torchkeep-two-ranks"
    with FileLock(str(base) + ".lock"):
        result = base / "result.json"
        if not result.exists():
            shutil.rmtree(base, ignore_errors=True)
            (base / "out").mkdir(parents=True)
            t0 = time.monotonic()
            codes = run_ranks(2, _two_rank_run, str(base / "run"), str(base / "ddp"), str(base / "out"))
            result.write_text(json.dumps({"codes": codes, "seconds": time.monotonic() - t0}))
    info = json.loads((base / "result.json").read_text())
    return {"dir": str(base / "run"), "ddp": str(base / "ddp"), "out": str(base / "out"),
            "codes": info["codes"],
            "ref": os.path.join(str(base / "out"), "ref6.pt")}


def _ref(two_ranks) -> dict:
    assert os.path.exists(two_ranks["ref"]), f"the 2-rank run failed early: exit codes {two_ranks['codes']}"
    return torch.load(two_ranks["ref"])


# -- 2 ranks ------------------------------------------------------------------------------------

def test_fsdp2_exact_resume_on_two_ranks(two_ranks):
    _ref(two_ranks)
    assert os.path.exists(os.path.join(two_ranks["out"], "resume-ok")), \
        "the resumed FSDP2 run was not bit-identical (see the ranks' output)"
    steps = [i.step for i in CheckpointManager(two_ranks["dir"]).list()]
    assert steps == [2, 4, 6]


def test_rank_killed_mid_save_leaves_nothing_restore_would_choose(two_ranks):
    r0, r1 = two_ranks["codes"]
    assert r1 == -signal.SIGKILL, two_ranks["codes"]
    assert r0 != 0, "rank 0 did not notice that rank 1 died"
    killed = os.path.join(two_ranks["dir"], native.step_dirname(8))
    # DCP considered its part done: .metadata and both ranks' data are there...
    assert sorted(os.listdir(os.path.join(killed, sharded.SHARDS))) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    # ...but torchkeep never committed it, so it is not a checkpoint.
    assert not os.path.exists(os.path.join(killed, native.COMMIT))
    mgr = CheckpointManager(two_ranks["dir"])
    assert mgr.latest().step == 6
    assert [i.status for i in mgr.list(include_uncommitted=True)] == ["ok", "ok", "ok", "uncommitted"]


def test_restore_on_one_process_is_bit_identical(two_ranks):
    """2 ranks -> 1: a plain model and optimizer in a process without a process group."""
    ref = _ref(two_ranks)
    st = build("plain", seed=5)
    assert CheckpointManager(two_ranks["dir"]).restore(st) == 6
    assert (st.step, st.epoch, st.position) == (6, 1, 3)  # saved after the epoch's last batch
    assert_same(ref, full_state(st), "restored on 1 process")


def test_open_and_consolidate(two_ranks, tmp_path, cli):
    import safetensors.torch

    ref = _ref(two_ranks)
    model = {k[len("model."):]: v for k, v in ref.items() if k.startswith("model.")}
    with torchkeep.open(two_ranks["dir"]) as ck:
        sd = ck.state_dict()
    assert_same(model, sd, "torchkeep.open")

    out = tmp_path / "model.safetensors"
    p = cli("consolidate", two_ranks["dir"], str(out))
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "4 model tensors" in p.stdout, p.stdout
    assert_same(model, safetensors.torch.load_file(str(out)), "consolidated")

    from torchkeep.look.consolidate import consolidate
    res = consolidate(two_ranks["dir"], tmp_path / "all.safetensors", step=4, everything=True)
    full = safetensors.torch.load_file(str(tmp_path / "all.safetensors"))
    assert res.tensors == len(full)
    assert {"model.0.weight", "optimizer.state.0.weight.exp_avg", "optimizer.state.3.bias.step",
            "distributed.rng.1.torch"} <= set(full)
    assert not torch.equal(full["model.0.weight"], model["0.weight"])  # step 4, not 6


def test_damaged_shard_is_never_restored(two_ranks, tmp_path, caplog):
    _ref(two_ranks)
    d = tmp_path / "run"
    shutil.copytree(two_ranks["dir"], d)
    victim = d / native.step_dirname(6) / sharded.SHARDS / "__1_0.distcp"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))

    mgr = CheckpointManager(str(d))
    status = {i.step: i.status for i in mgr.verify()}
    assert status == {2: "ok", 4: "ok", 6: "damaged", 8: "uncommitted"}
    st = build("plain", seed=5)
    with caplog.at_level(logging.WARNING):
        assert mgr.restore(st) == 4
    assert "xxh3_128 is" in caplog.text
    from torchkeep.look.consolidate import consolidate
    with pytest.raises(CorruptCheckpointError, match="xxh3_128"):
        consolidate(str(d), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_shard_metadata_is_read_without_running_code(two_ranks, tmp_path):
    """restore hands DCP a reader whose .metadata unpickler builds DCP's classes only."""
    import pickle

    from torchkeep import UnsafeCheckpointError
    from torchkeep.keep.sharded.checkpointing import _safe_reader

    _ref(two_ranks)
    shards = os.path.join(two_ranks["dir"], native.step_dirname(6), sharded.SHARDS)
    md = _safe_reader(shards).read_metadata()
    assert type(md).__module__ == "torch.distributed.checkpoint.metadata"
    assert "model.0.weight" in md.state_dict_metadata

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        _safe_reader(str(tmp_path)).read_metadata()
    assert not marker.exists()


# -- 3 ranks ------------------------------------------------------------------------------------

def _three_rank_run(d: str, ref_path: str, ddp_dir: str, ddp_ref: str) -> None:
    me = dist.get_rank()
    # 2 -> 3: the FSDP2 checkpoint of 2 ranks into 3 (16 rows split 6/5/5).
    st = build("fsdp", seed=9)
    assert CheckpointManager(d).restore(st) == 6
    got = full_state(st, gather=True)
    if me == 0:
        assert_same(torch.load(ref_path), got, "FSDP2 restored on 3 ranks")
    # The DDP checkpoint of 2 ranks, restored on each of 3.
    ddp = build("ddp", seed=9)
    assert CheckpointManager(ddp_dir).restore(ddp) == 3
    assert_same(torch.load(ddp_ref), full_state(ddp), f"DDP restored on rank {me} of 3")


def test_ddp_written_once_and_resumed_exactly(two_ranks):
    _ref(two_ranks)
    assert os.path.exists(os.path.join(two_ranks["out"], "ddp-ok")), \
        "the resumed DDP run was not bit-identical (see the ranks' output)"
    folder = os.path.join(two_ranks["ddp"], native.step_dirname(3))
    # Nothing sharded: one writer's files only, canonical names, every rank's RNG.
    assert sorted(os.listdir(folder)) == ["commit.copy.json", "commit.json", "manifest.json",
                                          "tensors.safetensors"]
    man = json.load(open(os.path.join(folder, native.MANIFEST)))
    assert "0.weight" in man["state"]["model"]
    assert len(man["state"][sharded.SECTION]["rng"]) == 2


def test_three_ranks_restore_two_ranks_checkpoints(two_ranks):
    _ref(two_ranks)
    codes = run_ranks(3, _three_rank_run, two_ranks["dir"], two_ranks["ref"], two_ranks["ddp"],
                      os.path.join(two_ranks["out"], "ddp3.pt"))
    assert codes == [0, 0, 0], "a rank failed (its traceback is in the captured output)"


def _groups_end_with_destroy(d: str) -> None:
    import gc
    import weakref

    from torchkeep.keep.sharded.checkpointing import checkpoint_group

    mgr = CheckpointManager(d, async_save=True)
    state = TrainState(model=torch.nn.Linear(4, 4))
    mgr.save(state, step=1)
    mgr.close()
    group = checkpoint_group()
    assert group is not None and checkpoint_group() is group   # made once, then reused
    refs = [weakref.ref(group), weakref.ref(dist.distributed_c10d._get_default_group())]
    del group
    dist.destroy_process_group()
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"process groups outlive destroy_process_group(): {alive}"


def test_process_groups_end_with_destroy_process_group(tmp_path):
    """torchkeep keeps no process group alive past destroy_process_group(): one that lives on is
    destroyed at interpreter exit, where gloo's threads abort the process about once in ten runs
    ("terminate called without an active exception", torchrun exits 1)."""
    codes = run_ranks(2, _groups_end_with_destroy, str(tmp_path / "ckpt"))
    assert codes == [0, 0], "a rank failed (its traceback is in the captured output)"


IMPORT_ORDER = r"""
import gc, sys, weakref
import torch
import torch.distributed as dist
import torchkeep
assert "torch.distributed.nn" in sys.modules, "torchkeep did not bind torch.distributed.nn early"
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
ref = weakref.ref(dist.distributed_c10d._get_default_group())
import torch.distributed.checkpoint  # what torchkeep imports at its first distributed save
mgr = torchkeep.CheckpointManager(sys.argv[1])
mgr.save(torchkeep.TrainState(model=torch.nn.Linear(2, 2)), step=1)
mgr.close()
dist.destroy_process_group()
gc.collect()
assert ref() is None, "the default process group outlives destroy_process_group()"
"""


def test_default_group_ends_with_destroy_whatever_the_import_order(tmp_path):
    """torch.distributed.nn binds the default group into default arguments on first import; when
    that import comes after init_process_group() (torchkeep imports DCP lazily), the group lives
    until interpreter exit. torchkeep binds it early, while no group exists."""
    import subprocess
    p = subprocess.run([sys.executable, "-c", IMPORT_ORDER, str(tmp_path / "ckpt")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
