"""`torchkeep demo` end to end in a subprocess, and the shipped digits data set it runs on."""
from __future__ import annotations

import gzip
import hashlib
import os
import re
from importlib import resources

import pytest
import torch
from conftest import run_cli

import torchkeep
from torchkeep.cli import main
from torchkeep.demo.datasets import load_digits, split
from torchkeep.demo.models import LeNet5

DEMO_STEPS = "40"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One small demo run shared by the tests below: (folder, finished process)."""
    root = tmp_path_factory.mktemp("demo")
    folder = os.path.join(root, "run")
    p = run_cli("demo", "--dir", folder, "--steps", DEMO_STEPS, cwd=str(root), timeout=180)
    return folder, p


def _percent(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no match for {pattern!r} in:\n{text}"
    return float(m.group(1)) / 100


def test_demo_exits_zero_and_resumes_bit_identically(demo):
    folder, p = demo
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    m = re.search(r"B: SIGKILLed after step (\d+)", out)
    assert m, out
    killed = int(m.group(1))
    m = re.search(r"C: restored step (\d+), trained to step (\d+)", out)
    assert m, out
    restored, final = int(m.group(1)), int(m.group(2))
    assert 0 < restored <= killed < final == int(DEMO_STEPS)
    m = re.search(r"✓ bit-identical: C's final checkpoint equals A's in all (\d+) tensors", out)
    assert m and int(m.group(1)) >= 30, out   # 10 LeNet5 tensors, Adam's 2x10 moments, RNG, ...
    assert "NOT bit-identical" not in out


def test_demo_accuracies_are_above_chance(demo):
    _, p = demo
    out = p.stdout
    lenet5 = _percent(r"fresh LeNet5: test accuracy ([\d.]+)%", out)
    before = _percent(r"LeNet6 test accuracy: ([\d.]+)% after transfer", out)
    after = _percent(r"→ ([\d.]+)% after \d+ fine-tuning steps", out)
    assert lenet5 > 0.5, out                       # 10 classes: chance is 0.1
    assert after > 0.3, out
    assert 0.0 <= before <= 1.0
    assert "loaded 8 of 12 target tensors" in out  # conv.* and fc.1/fc.3 carried, fc.5/fc.7 not
    assert "froze 8 tensors; training fc.5.weight, fc.5.bias, fc.7.weight, fc.7.bias" in out


def test_demo_leaves_checkpoints_that_the_cli_reads(demo):
    folder, p = demo
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("ckpt", "reference", "finetune", "lenet5.safetensors"):
        assert os.path.exists(os.path.join(folder, name)), name
    assert "torchkeep ls" in p.stdout and "torchkeep inspect" in p.stdout
    ls = run_cli("ls", os.path.join(folder, "ckpt"))
    assert ls.returncode == 0, ls.stdout + ls.stderr
    assert re.search(rf"\b{DEMO_STEPS}\b", ls.stdout), ls.stdout   # the final step is kept
    with torchkeep.open(os.path.join(folder, "lenet5.safetensors")) as ck:
        assert sorted(ck.state_dict()) == sorted(LeNet5().state_dict())


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--dir", str(tmp_path), "--steps", "10"]) == 2
    assert "not a previous demo's folder" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_digits_are_the_shipped_uci_file():
    raw = resources.files("torchkeep.demo").joinpath("data", "digits.csv.gz").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == \
        "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
    assert len(gzip.decompress(raw).splitlines()) == 1797
    assert "CC BY 4.0" in resources.files("torchkeep.demo").joinpath("data", "ATTRIBUTION.md").read_text()
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_split_is_deterministic_stratified_and_disjoint():
    images, labels = load_digits()
    a = split(images, labels, test_fraction=0.2, seed=3)
    b = split(images, labels, test_fraction=0.2, seed=3)
    c = split(images, labels, test_fraction=0.2, seed=4)
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.train_labels, b.train_labels)
    assert not torch.equal(a.test_images, c.test_images)
    assert len(a.train_labels) + len(a.test_labels) == 1797
    counts = torch.bincount(a.test_labels, minlength=10).float()
    assert ((counts / torch.bincount(labels).float()) - 0.2).abs().max() < 0.01
    # no image is in both parts: compare rows as bytes
    train_rows = {r.numpy().tobytes() for r in a.train_images.flatten(1)}
    overlap = sum(r.numpy().tobytes() in train_rows for r in a.test_images.flatten(1))
    assert overlap == 0
    with pytest.raises(ValueError):
        split(images, labels, test_fraction=1.0)
