"""`torchkeep inspect` and `torchkeep scan` as a user runs them (subprocesses)."""
from __future__ import annotations

import json
import os

import pytest
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
    # Rows show the names with the announced prefix stripped.
    assert "module.conv" not in out and "\nconv " in out and "\nfc " in out  # plain rows when piped
    # 779 elements = 770 parameters + BatchNorm's running stats (8) and counter (1).
    assert "model: 770 parameters" in out and "buffers: 3 tensors, 9 elements" in out
    assert "in the file: 9 tensors · 779 elements" in out
    assert "progress: epoch=7" in out and "loss = 0.125" in out


def test_inspect_json_and_filter(tmp_path):
    p = run_cli("inspect", str(_ckpt(tmp_path)), "--json", "--filter", r"\.fc\.", check=True)
    data = json.loads(p.stdout)
    assert data["format"] == "torch-zip" and data["safe"] is True
    assert data["wrapper"] == "model_state_dict" and data["prefixes"] == ["module."]
    assert [e["name"] for e in data["entries"]] == ["model_state_dict.module.fc.weight",
                                                      "model_state_dict.module.fc.bias"]
    assert data["entries"][0]["shape"] == [10, 64]
    assert data["model"]["parameters"] == 770 and data["progress"] == {"epoch": 7}
    # The model weights carry clean names ('fc.weight'): the filter matches none of them.
    assert data["model"]["weights"] == []


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
    assert re.search(r"^\s*bn\s+5\s+17\s", p.stdout, re.M), p.stdout  # plain text when piped


def test_inspect_training_dict_optimizer_by_name_tied_and_long_keys(tmp_path):
    torch.manual_seed(0)
    net = SmallNet()
    net.extra = torch.nn.Linear(64, 10)
    net.extra.weight = net.fc.weight  # tied: stored once, two names
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    sch = torch.optim.lr_scheduler.StepLR(opt, 3)
    long_key = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, " \
               "'every_n_epochs': 1, 'train_time_interval': None}"
    path = tmp_path / "train.pt"
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler":
                sch.state_dict(), "global_step": 12, "epoch": 2,
                "ema": {k: v.clone() for k, v in net.state_dict().items()},
                "callbacks": {long_key: {"best_model_score": 0.5}}}, path)
    p = run_cli("inspect", str(path), check=True)
    out = p.stdout
    n = sum(q.numel() for q in net.parameters())  # parameters() yields the tied weight once
    assert f"model: {n:,} parameters" in out, out
    assert "tied: 1 names" in out
    assert "optimizer 'optimizer': SGD-style (momentum_buffer)" in out
    assert "fc.weight: momentum_buffer float32(10, 64)" in out
    assert "scheduler 'lr_scheduler': last_epoch=0" in out
    assert "progress: epoch=2, global_step=12" in out or "progress: global_step=12, epoch=2" in out
    assert long_key not in out and "…" in out
    assert all(len(line) <= 160 for line in out.splitlines())
    data = json.loads(run_cli("inspect", str(path), "--json", check=True).stdout)
    assert data["model"]["parameters"] == n and data["optimizer"][0]["family"] == "SGD-style"
    assert data["optimizer"][0]["names_from"] == "the model's parameter order"


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_inspect_flags_missing_or_short_storage(tmp_path, damage):
    import zipfile
    src = tmp_path / "ok.pt"
    torch.save({"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(3)}, src)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data/0"):
                if damage == "missing":
                    continue
                data = data[:40]
            zout.writestr(info.filename, data)
    p = run_cli("inspect", str(bad))
    assert p.returncode == 2, p.stdout + p.stderr
    assert ("is missing from the archive" if damage == "missing" else "holds 40 bytes but its "
            "tensors need 400") in p.stdout
    data = json.loads(run_cli("inspect", str(bad), "--json").stdout)
    assert data["problems"]


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
