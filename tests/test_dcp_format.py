"""torch.distributed.checkpoint folders written by the real dcp.save, read without DCP's pickle."""
from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

import torchkeep
from torchkeep.errors import CorruptCheckpointError, FormatError, UnsafeCheckpointError

dcp = pytest.importorskip("torch.distributed.checkpoint")
DATA = os.path.join(os.path.dirname(__file__), "data")


def _save(state, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))


def _reference(path):
    """What DCP's own (pickle-running) loader gives, for comparison."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load_state_dict_from_keys(checkpoint_id=str(path))


@pytest.fixture(scope="module")
def training_state(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    net(torch.randn(4, 6)).sum().backward()
    opt.step()
    state = {"model": net.state_dict(), "optim": opt.state_dict(), "step": 3,
             "extra": {"note": "run-a", "ids": torch.arange(4), "bf": torch.randn(3).to(torch.bfloat16)}}
    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    _save(state, path)
    return path, net


def test_nested_state_round_trips(training_state):
    path, net = training_state
    ck = torchkeep.open(path)
    assert ck.format == "dcp"
    tree = ck.tree
    assert set(tree) == {"model", "optim", "step", "extra"}
    assert tree["step"] == 3 and tree["extra"]["note"] == "run-a"
    pg = tree["optim"]["param_groups"]
    assert isinstance(pg, list) and pg[0]["lr"] == 0.01 and pg[0]["betas"] == (0.9, 0.999)
    ref = _reference(path)
    loaded = ck.load()
    for k, v in ref["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    for pid, st in ref["optim"]["state"].items():
        for k, v in st.items():
            assert torch.equal(loaded["optim"]["state"][pid][k], v), (pid, k)
    assert loaded["extra"]["bf"].dtype == torch.bfloat16
    assert torch.equal(loaded["extra"]["bf"], ref["extra"]["bf"])


def test_state_dict_found_in_the_model_wrapper(training_state):
    path, net = training_state
    ck = torchkeep.open(path)
    assert ck.summary.wrapper == "model"
    sd = ck.state_dict()
    assert set(sd) == set(net.state_dict())
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    fresh.load_state_dict(sd)
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    entries = {e.name: e for e in ck.entries()}
    assert entries["model.0.weight"].shape == (5, 6) and entries["model.0.weight"].dtype == torch.float32


def test_chunks_from_two_ranks_are_assembled():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dcp", os.path.join(DATA, "make_dcp_2ranks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    want = mod.expected()
    ck = torchkeep.open(os.path.join(DATA, "dcp_2ranks"))
    meta = ck.reader._meta()
    assert len(meta["w"].chunks) == 2 and len(meta["col"].chunks) == 2
    got = ck.load()
    for k in ("w", "v", "col", "b"):
        assert torch.equal(got[k], want[k]), k
    assert got["step"] == 7
    assert len([f for f in ck.reader.files() if f.endswith(".distcp")]) == 2


def test_missing_metadata(training_state, tmp_path):
    path, _ = training_state
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    os.rename(broken / ".metadata", broken / ".metadata.tmp")
    with pytest.raises(CorruptCheckpointError) as ei:
        torchkeep.open(broken).entries()
    msg = str(ei.value)
    assert "no .metadata: the save did not finish (or this is not a DCP folder)" in msg
    assert "interrupted while committing" in msg


def test_missing_and_truncated_data_files(training_state, tmp_path):
    path, _ = training_state
    gone = tmp_path / "gone"
    shutil.copytree(path, gone)
    data = [n for n in os.listdir(gone) if n.endswith(".distcp")]
    os.unlink(gone / data[0])
    with pytest.raises(CorruptCheckpointError, match=f"data file '{data[0]}' named by .metadata"):
        torchkeep.open(gone).entries()
    short = tmp_path / "short"
    shutil.copytree(path, short)
    f = short / data[0]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="file truncated"):
        torchkeep.open(short).load()


def test_damaged_chunk_bytes(training_state, tmp_path):
    path, _ = training_state
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    ck = torchkeep.open(bad)
    where = ck.reader._meta()["model.0.weight"].chunks[0].where
    with open(where.file, "r+b") as f:  # wipe the chunk's zip signature
        f.seek(where.offset)
        f.write(b"\0" * 8)
    with pytest.raises(FormatError, match="not a torch.save archive"):
        torchkeep.open(bad).state_dict()


class Payload:
    """Pickles as a call that would create a marker file if it were ever run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_items_that_would_run_code_stay_placeholders(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil"
    _save({"model": {"w": torch.ones(2)}, "hook": Payload(marker)}, path)
    ck = torchkeep.open(path)
    tree = ck.tree
    assert isinstance(tree["hook"], torchkeep.read.unpickler.Opaque)
    assert "system" in tree["hook"].global_name
    assert torch.equal(ck.state_dict()["w"], torch.ones(2))
    with pytest.raises(UnsafeCheckpointError):
        ck.load()
    names = {g.qualname for g in ck.globals()}
    assert any(n.endswith(".system") for n in names)
    assert not marker.exists()


def test_malicious_metadata_is_never_run(training_state, tmp_path):
    import pickle

    path, _ = training_state
    evil = tmp_path / "evil_meta"
    shutil.copytree(path, evil)
    marker = tmp_path / "PWNED"
    (evil / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(FormatError, match="not DCP Metadata"):
        torchkeep.open(evil).entries()
    assert not marker.exists()


def test_trusted_load_uses_dcp(training_state):
    path, net = training_state
    obj = torchkeep.open(path, trust=True).reader.trusted_load()
    assert obj["step"] == 3 and torch.equal(obj["model"]["0.weight"], net.state_dict()["0.weight"])
