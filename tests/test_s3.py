"""CheckpointManager on object storage: ``s3://`` through fsspec/s3fs against a real
S3-compatible server started here (moto's standalone server on 127.0.0.1): commit, verify,
fallback past a damaged checkpoint, rotation, an interrupted upload that leaves nothing, the CLI,
and the sharded (multi-rank, FSDP2) path through DCP's fsspec writer and reader."""
from __future__ import annotations

import logging
import os
import uuid

import pytest
import torch

from torchkeep import CheckpointManager, TrainState
from torchkeep.read.formats import native
from torchkeep.read.formats import nativeshards as sharded

s3fs = pytest.importorskip("s3fs", reason="s3:// needs s3fs (pip install s3fs)")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port of 127.0.0.1, and the environment that points s3fs at it."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        pytest.skip(f"moto[server] is not installed ({e}): no local S3 server to test against")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
        host, port = server.get_host_and_port()
    except Exception as e:  # noqa: BLE001 - any failure to start means: no server here
        pytest.skip(f"the local S3 server (moto) could not start: {e}")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # fsspec caches filesystems by their arguments, not by the environment: one made for an
    # earlier server (this fixture runs again when xdist interleaves modules) would be reused.
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    # moto keeps its buckets in the process, across servers: the bucket of an earlier instance
    # of this fixture is still there (each test writes under its own prefix).
    fs.makedirs("torchkeep-test", exist_ok=True)
    try:
        yield fs
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture
def url(s3):
    return f"s3://torchkeep-test/{uuid.uuid4().hex[:8]}"


def _state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 4))
    model[0].requires_grad_(False)                # frozen: one blob for every checkpoint
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return TrainState(model=model, optimizer=opt)


def _step(st: TrainState) -> None:
    x = torch.randn(8, 64)
    loss = st.model(x).square().mean()
    st.optimizer.zero_grad()
    loss.backward()
    st.optimizer.step()
    st.step += 1


def test_save_list_verify_rotate_restore(s3, url):
    st = _state()
    with CheckpointManager(url, keep_last=2) as mgr:       # asynchronous saves
        for _ in range(4):
            _step(st)
            mgr.save(st, metrics={"s": st.step})
        mgr.wait()
        assert [i.step for i in mgr.list()] == [3, 4]
        assert [i.status for i in mgr.verify(deep=True)] == ["ok", "ok"]
    root = url[len("s3://"):]
    names = sorted(n.rsplit("/", 1)[-1] for n in s3.ls(root, refresh=True))
    assert names == ["blobs", "copies", "step-00000003", "step-00000004"], names
    assert len(s3.ls(f"{root}/blobs", refresh=True)) == 1          # the frozen layer, once
    assert not [p for p in s3.find(root) if "/.tmp-" in p]         # no temporary objects
    st2 = _state(seed=1)
    assert CheckpointManager(url).restore(st2) == 4
    for k, v in st.model.state_dict().items():
        assert torch.equal(v, st2.model.state_dict()[k]), k


def test_damaged_newest_is_skipped_and_uncommitted_is_cleaned(s3, url, caplog):
    st = _state()
    with CheckpointManager(url, keep_last=None, async_save=False) as mgr:
        for _ in range(3):
            _step(st)
            mgr.save(st)
    root = url[len("s3://"):]
    pack = f"{root}/{native.step_dirname(3)}/{native.PACK}"
    data = bytearray(s3.cat(pack))
    data[-2] ^= 0xFF
    s3.pipe(pack, bytes(data))
    # an interrupted save: a step folder with its pack uploaded and no commit record
    s3.pipe(f"{root}/{native.step_dirname(9)}/{native.PACK}", s3.cat(f"{root}/{native.step_dirname(1)}/{native.PACK}"))
    mgr = CheckpointManager(url, keep_last=None)
    status = {i.step: i.status for i in mgr.verify()}
    assert status == {1: "ok", 2: "ok", 3: "damaged", 9: "uncommitted"}
    with caplog.at_level(logging.WARNING, logger="torchkeep"):
        assert mgr.restore(_state(seed=2)) == 2
    assert "damaged" in caplog.text and native.step_dirname(3) in caplog.text
    _step(st)
    mgr.save(st)                   # the first save cleans what an interrupted writer left
    mgr.close()
    assert not s3.exists(f"{root}/{native.step_dirname(9)}")


def test_an_interrupted_upload_leaves_no_object(s3, url):
    from torchkeep.store.backends import storage_for

    st, root = storage_for(url)
    path = st.join(root, "x.bin")

    def chunks():
        yield b"a" * 1000
        raise KeyboardInterrupt   # as if the process were stopped mid-upload

    with pytest.raises(KeyboardInterrupt):
        st.write_file(path, chunks())
    assert not s3.exists(path)
    st.write_file(path, [b"abc", memoryview(b"def")])
    assert s3.cat(path) == b"abcdef"


@pytest.mark.slow
def test_cli_ls_and_verify_on_s3(s3, url, cli):
    st = _state()
    with CheckpointManager(url, async_save=False) as mgr:
        _step(st)
        mgr.save(st)
    p = cli("ls", url)
    assert p.returncode == 0 and "1 checkpoint" in p.stdout, p.stdout + p.stderr
    p = cli("verify", url)
    assert p.returncode == 0 and "all 1 good" in p.stdout, p.stdout + p.stderr


# -- the sharded path: every rank writes its shards through DCP's fsspec writer -------------------

def _sharded_run(url: str, out: str) -> None:
    import test_distributed as td

    dist = td.dist
    me = dist.get_rank()
    st = td.build("fsdp", seed=0)
    torch.manual_seed(100 + me)
    with CheckpointManager(url, keep_last=2) as mgr:
        td.train(st, 6, mgr, save_at=(2, 4, 6))
    ref = td.full_state(st, gather=True)
    st2 = td.build("fsdp", seed=1)
    torch.manual_seed(9)
    assert CheckpointManager(url).restore(st2) == 6
    got = td.full_state(st2, gather=True)
    if me == 0:
        td.assert_same(ref, got, "restored from s3 on 2 ranks")
        open(os.path.join(out, "ok"), "w").close()


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_checkpoints_on_s3(s3, url, tmp_path, caplog):
    import test_distributed as td

    import torch._dynamo  # noqa: F401  (loaded before forking: fully_shard imports it)
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    codes = td.run_ranks(2, _sharded_run, url, str(tmp_path))
    assert codes == [0, 0] and os.path.exists(tmp_path / "ok"), codes
    mgr = CheckpointManager(url)
    infos = mgr.verify()
    assert [(i.step, i.status) for i in infos] == [(4, "ok"), (6, "ok")]     # rotated: keep_last=2
    root = url[len("s3://"):]
    shard_files = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{root}/{native.step_dirname(6)}/{sharded.SHARDS}"))
    assert shard_files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # A damaged shard object is found by verify and never restored: one process (no group)
    # reads the older checkpoint through DCP's fsspec reader instead.
    obj = f"{root}/{native.step_dirname(6)}/{sharded.SHARDS}/__1_0.distcp"
    data = bytearray(s3.cat(obj))
    data[len(data) // 2] ^= 1
    s3.pipe(obj, bytes(data))
    assert [i.status for i in CheckpointManager(url).verify()] == ["ok", "damaged"]
    st = td.build("plain", seed=5)
    with caplog.at_level(logging.WARNING, logger="torchkeep"):
        assert CheckpointManager(url).restore(st) == 4
    assert "damaged" in caplog.text and native.step_dirname(6) in caplog.text
    assert (st.step, st.epoch, st.position) == (4, 1, 1)


@pytest.mark.slow
def test_lightning_checkpoints_on_s3(s3, url):
    pl = pytest.importorskip("lightning.pytorch", reason="needs lightning")  # noqa: F841
    import test_integrations_lightning as tl
    from torchkeep.integrations.lightning import TorchkeepCheckpointIO, last_checkpoint

    torch.set_num_threads(1)
    assert last_checkpoint(url) is None
    tl._trainer(url, TorchkeepCheckpointIO(), epochs=2).fit(tl.Tiny(), tl._loader())
    root = url[len("s3://"):]
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(root, refresh=True))
    assert names == ["blobs", "copies", "epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt", "last.ckpt"], names
    assert last_checkpoint(url) == f"{url}/last.ckpt"
    trainer = tl._trainer(url, TorchkeepCheckpointIO(), epochs=3)
    trainer.fit(tl.Tiny(), tl._loader(), ckpt_path=last_checkpoint(url))
    assert trainer.global_step == 15                       # resumed at 10, one more epoch
    assert TorchkeepCheckpointIO().load_checkpoint(f"{url}/last.ckpt")["global_step"] == 15
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(root, refresh=True))
    assert names == ["blobs", "copies", "epoch=1-step=10.ckpt", "epoch=2-step=15.ckpt", "last.ckpt"], names
