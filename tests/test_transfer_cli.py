"""``torchkeep transfer`` in a subprocess, on files written by torch.save and safetensors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from torchkeep.demo.models import LeNet5, LeNet6


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "torchkeep", "transfer", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_plan_into_a_factory_prints_every_fate(tmp_path):
    src = tmp_path / "lenet5.pt"
    torch.save(nn.DataParallel(LeNet5()).state_dict(), src)
    p = cli(str(src), "--into", "torchkeep.demo.models:LeNet6", "--kwargs", '{"num_classes": 10}')
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "loaded 8 of 12 target tensors, 90.9% of the elements (0 adapted), 4 missing" in out
    assert "source prefixes stripped: module." in out
    lines = out.splitlines()
    assert sum(line.startswith("loaded ") for line in lines) == 8
    assert sum(line.startswith("missing ") for line in lines) == 4
    assert any(line.startswith("unused ") and "fc.5.weight" in line and "[10, 84]" in line for line in lines)
    assert "plan only" in out


def test_out_writes_the_full_target_state_dict(tmp_path):
    torch.manual_seed(0)
    src_model, dst_model = LeNet5(), LeNet6()
    src = tmp_path / "lenet5.pt"
    torch.save({"epoch": 7, "model_state_dict": src_model.state_dict()}, src)
    target = tmp_path / "lenet6.safetensors"
    save_file(dst_model.state_dict(), str(target))
    out = tmp_path / "out.safetensors"
    p = cli(str(src), "--into", str(target), "--out", str(out), "--json", "--rule", r"^fc\.5\.=head.")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["out"] == str(out)
    assert report["counts"]["loaded"] == 8 and report["counts"]["missing"] == 4
    assert "renamed it to 'head.weight'" in report["unused"]["fc.5.weight"]
    written = load_file(str(out))
    assert set(written) == set(dst_model.state_dict())
    for name, value in written.items():
        expected = src_model.state_dict()[name] if name in report["loaded"] else dst_model.state_dict()[name]
        assert torch.equal(value, expected), name
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_strict_fails_with_every_problem_and_writes_nothing(tmp_path):
    src = tmp_path / "lenet5.safetensors"
    save_file(LeNet5().state_dict(), str(src))
    out = tmp_path / "out.safetensors"
    p = cli(str(src), "--into", "torchkeep.demo.models:LeNet6", "--strict", "--out", str(out))
    assert p.returncode == 2
    assert p.stderr.startswith("torchkeep: error: transfer")
    for problem in ("missing fc.7.weight", "missing fc.5.bias", "unused fc.5.weight"):
        assert problem in p.stderr
    assert not out.exists()


def test_nothing_to_transfer_fails_unless_allowed_and_counts_elements(tmp_path):
    src = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.randn(7, 7)}, str(src))
    out = tmp_path / "out.safetensors"
    p = cli(str(src), "--into", "torchkeep.demo.models:LeNet5", "--out", str(out))
    assert p.returncode == 2 and not out.exists()
    assert "loaded nothing" in p.stderr and "--allow-empty" in p.stderr
    p = cli(str(src), "--into", "torchkeep.demo.models:LeNet5", "--out", str(out), "--allow-empty")
    assert p.returncode == 0, p.stderr
    assert "loaded 0 of 10 target tensors, 0% of the elements" in p.stdout
    assert "largest kept at init: fc.1.weight [120, 400] (48,000 elements)" in p.stderr  # the warning
    assert out.exists()
