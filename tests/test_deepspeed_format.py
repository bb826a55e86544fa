"""DeepSpeed ZeRO checkpoints written by a real DeepSpeed engine (CPU accelerator, gloo), read
without DeepSpeed and compared bit for bit with DeepSpeed's own zero_to_fp32."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import torchkeep
from conftest import run_cli
from torchkeep.errors import FormatError

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install deepspeed; DS_BUILD_OPS=0 "
                              "installs it without compiling)"),
]
_CACHE: dict[tuple[int, int], str] = {}


def _written(stage: int, world: int, tmp_path_factory) -> str:
    key = (stage, world)
    if key not in _CACHE:
        out = str(tmp_path_factory.mktemp(f"zero{stage}w{world}"))
        port = str(29600 + 10 * stage + world + os.getpid() % 50 * 7)
        p = subprocess.run([sys.executable, os.path.join(HERE, "deepspeed_writer.py"), str(stage),
                            str(world), out, port], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, DS_ACCELERATOR="cpu", DS_BUILD_OPS="0"))
        if p.returncode != 0 or not os.path.exists(os.path.join(out, "reference.pt")):
            pytest.skip(f"DeepSpeed could not train on this machine's CPU: {p.stderr[-600:]}")
        _CACHE[key] = out
    return _CACHE[key]


@pytest.mark.parametrize("stage,world", [(1, 2), (2, 1), (3, 2)])
def test_fp32_weights_equal_zero_to_fp32(stage, world, tmp_path_factory):
    out = _written(stage, world, tmp_path_factory)
    ref = torch.load(os.path.join(out, "reference.pt"))
    run = os.path.join(out, "run")
    for path in (run, os.path.join(run, open(os.path.join(run, "latest")).read().strip())):
        with torchkeep.open(path) as ck:
            assert ck.format == "deepspeed"
            assert ck.metadata["zero_stage"] == stage and ck.metadata["world_size"] == world
            sd = ck.state_dict()
            assert list(sd) == list(ref)
            for k in ref:
                assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
            # Per-parameter optimizer moments, assembled by name like the weights.
            opt = ck.tree["optimizer"]
            assert opt["state"]["fc.weight"]["exp_avg"].shape == (3, 5)
            assert ck.tree["epoch"] == 3 and ck.tree["global_steps"] == 2


@pytest.mark.parametrize("stage,world", [(3, 2)])
def test_convert_consolidate_and_inspect(stage, world, tmp_path_factory, tmp_path):
    out = _written(stage, world, tmp_path_factory)
    ref = torch.load(os.path.join(out, "reference.pt"))
    run = os.path.join(out, "run")
    torchkeep.convert(run, tmp_path / "w.safetensors")
    from safetensors.torch import load_file
    got = load_file(tmp_path / "w.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    p = run_cli("consolidate", run, str(tmp_path / "c.safetensors"), check=True)
    assert "9 model tensors" in p.stdout
    p = run_cli("inspect", run, check=True)
    n = sum(v.numel() for k, v in ref.items() if "running" not in k and "num_batches" not in k)
    assert f"model: {n} parameters" in p.stdout, p.stdout
    assert "optimizer 'optimizer': Adam-style" in p.stdout


def test_zero3_model_states_file_refused_by_convert(tmp_path_factory, tmp_path):
    out = _written(3, 2, tmp_path_factory)
    step = os.path.join(out, "run", "global_step2")
    f = os.path.join(step, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(FormatError, match="ZeRO-3 model-states file"):
        torchkeep.convert(f, tmp_path / "x.safetensors")
    assert not os.path.exists(tmp_path / "x.safetensors")
    p = run_cli("convert", f, str(tmp_path / "y.safetensors"))
    assert p.returncode == 2 and "placeholders" in p.stderr
    p = run_cli("inspect", f, check=True)
    assert "(0,) placeholders" in p.stdout and "model: 0 parameters" in p.stdout


def test_missing_rank_file_is_named(tmp_path_factory, tmp_path):
    import shutil
    out = _written(1, 2, tmp_path_factory)
    run = tmp_path / "run"
    shutil.copytree(os.path.join(out, "run"), run)
    os.remove(run / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(torchkeep.CorruptCheckpointError, match="2 ranks but 1"):
        torchkeep.open(run).state_dict()


@pytest.mark.parametrize("stage,world", [(2, 1), (3, 2)])
def test_without_optimizer_partitions(stage, world, tmp_path_factory, tmp_path, caplog):
    import shutil
    out = _written(stage, world, tmp_path_factory)
    run = tmp_path / "run"
    shutil.copytree(os.path.join(out, "run"), run)
    step = run / "global_step2"
    for f in os.listdir(step):
        if f.endswith("_optim_states.pt"):
            os.remove(step / f)
    if stage == 3:
        with pytest.raises(FormatError, match=r"\(0,\) placeholders"):
            torchkeep.open(run).state_dict()
        return
    ms = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    with caplog.at_level("WARNING"), torchkeep.open(run) as ck:
        sd = ck.state_dict()
        assert "no optimizer partitions" in caplog.text
        assert ck.metadata["weights"] == "model states as saved"
    assert list(sd) == list(ms["module"]) and all(torch.equal(sd[k], ms["module"][k]) for k in sd)
