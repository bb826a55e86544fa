"""`torchkeep inspect` and `torchkeep scan` as a user runs them (subprocesses)."""
from __future__ import annotations

import json
import os

import torch
from conftest import SmallNet, run_cli


def _ckpt(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.DataParallel(SmallNet())
    path = tmp_path / "run.pt"
    torch.save({"epoch": 7, "loss": 0.125, "model_state_dict": net.state_dict()}, path)
    return path


def test_inspect_table(tmp_path):
    p = run_cli("inspect", str(_ckpt(tmp_path)), check=True)
    out = p.stdout
    assert "torch-zip" in out and "safe" in out
    assert "model weights: 'model_state_dict'" in out and "prefixes stripped: module." in out
    assert "model_state_dict.module.conv" in out and "model_state_dict.module.fc" in out
    assert "total: 9 tensors · 779 parameters" in out
    assert "epoch = 7" in out and "loss = 0.125" in out


def test_inspect_json_and_filter(tmp_path):
    p = run_cli("inspect", str(_ckpt(tmp_path)), "--json", "--filter", r"\.fc\.", check=True)
    data = json.loads(p.stdout)
    assert data["format"] == "torch-zip" and data["safe"] is True
    assert data["wrapper"] == "model_state_dict" and data["prefixes"] == ["module."]
    assert [e["name"] for e in data["entries"]] == ["model_state_dict.module.fc.weight",
                                                      "model_state_dict.module.fc.bias"]
    assert data["entries"][0]["shape"] == [10, 64]


def test_inspect_large_counts_use_separators(tmp_path):
    torch.save({"w": torch.zeros(1200, 1000)}, tmp_path / "big.pt")
    p = run_cli("inspect", str(tmp_path / "big.pt"), check=True)
    assert "1,200,000 parameters" in p.stdout


def test_inspect_tree_and_depth(tmp_path):
    path = _ckpt(tmp_path)
    p = run_cli("inspect", str(path), "--tree", check=True)
    assert "weight: float32(4, 3, 3, 3)" in p.stdout and "epoch = 7" in p.stdout
    p = run_cli("inspect", str(path), "--depth", "1", check=True)
    import re
    assert re.search(r"^\s*model_state_dict\s*│\s*9\s*│\s*779\s*│", p.stdout, re.M), p.stdout


def test_errors_are_one_line_exit_2(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    p = run_cli("inspect", str(tmp_path / "notes.pt"))
    assert p.returncode == 2
    assert p.stderr.startswith("torchkeep: error: ") and p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr
    for args in (("--debug", "inspect", str(tmp_path / "notes.pt")),
                 ("inspect", str(tmp_path / "notes.pt"), "--debug")):
        p = run_cli(*args)
        assert p.returncode != 0 and "Traceback" in p.stderr and "FormatError" in p.stderr


def test_scan_exit_codes(tmp_path):
    good = _ckpt(tmp_path)
    torch.save(SmallNet(), tmp_path / "whole.pt")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04garbage")
    assert run_cli("scan", str(good)).returncode == 0
    p = run_cli("scan", str(good), str(tmp_path / "whole.pt"))
    assert p.returncode == 1 and "conftest.SmallNet" in p.stdout
    p = run_cli("scan", str(good), str(tmp_path / "broken.pt"))
    assert p.returncode == 2 and "broken.pt" in p.stderr
    p = run_cli("scan", "--json", str(tmp_path / "whole.pt"))
    data = json.loads(p.stdout)
    assert data["safe"] is False and any(g["global"] == "conftest.SmallNet" for g in data["unknown"])


def test_python_dash_m_and_console_script(tmp_path):
    import shutil
    import subprocess
    import sys
    exe = os.path.join(os.path.dirname(sys.executable), "torchkeep")
    if shutil.which(exe):
        p = subprocess.run([exe, "--version"], capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.startswith("torchkeep ")
    assert run_cli("--version", check=True).stdout.startswith("torchkeep ")
