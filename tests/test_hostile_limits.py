"""Resource-exhaustion inputs are answered within bounds: each `scan`, `inspect` and full read in
a fresh process, timed and measured (peak RSS over the process's baseline after import), must
finish in <= 10 s with <= 512 MiB more memory (peak RSS, its high-water mark reset after the
imports), and refuse with one line naming the limit."""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib

import pytest
import torch

from conftest import ROOT

SECONDS, EXTRA_MIB = 10.0, 512

_CHILD = r"""
import contextlib, io, json, sys, time
import torch, torchkeep
import torchkeep.cli.inspect, torchkeep.cli.scan, torchkeep.read.scanner, torchkeep.read.checkpoint
from torchkeep.cli import main
from torchkeep.errors import TorchkeepError
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
try:  # reset the high-water mark left by the imports, so the peak is the work's own
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = kib("VmRSS")
out = {}
for mode in sys.argv[2].split(","):
    err = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        if mode == "read":
            try:
                ck = torchkeep.open(sys.argv[1]); ck.entries(); ck.state_dict(); rc = 0
            except TorchkeepError as e:
                print(f"torchkeep: error: {e}", file=sys.stderr); rc = 2
        else:
            rc = main([mode, sys.argv[1]])
    out[mode] = {"rc": rc, "s": time.perf_counter() - t, "err": err.getvalue()}
out["extra_mib"] = (max(kib("VmHWM"), kib("VmRSS")) - base) / 1024
print(json.dumps(out))
"""


def _measure(path, modes="scan,inspect,read", env=None):
    e = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), **(env or {}))
    p = subprocess.run([sys.executable, "-c", _CHILD, str(path), modes], capture_output=True,
                       text=True, env=e, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"\nMEASURED {os.path.basename(str(path))}: " + " ".join(
        f"{k}=rc{v['rc']}/{v['s']:.2f}s" for k, v in res.items() if k != "extra_mib")
        + f" extra={res['extra_mib']:.0f}MiB")  # shown with pytest -s
    return res


def _assert_bounded(res, refused_by=None, modes=("inspect",)):
    assert res["extra_mib"] <= EXTRA_MIB, res
    for mode, r in res.items():
        if mode == "extra_mib":
            continue
        assert r["s"] <= SECONDS, (mode, res)
        assert "Traceback" not in r["err"], r["err"]
        if r["rc"] == 2:
            assert r["err"].startswith("torchkeep: error: ") and r["err"].count("\n") == 1, r["err"]
    for mode in modes:
        r = res[mode]
        assert r["rc"] == 2, (mode, res)
        if refused_by:
            assert refused_by in r["err"] and "TORCHKEEP_MAX_" in r["err"], r["err"]


def test_billion_laughs_memo_dag(tmp_path):
    data = bytearray(b"\x80\x02]q\x00K\x01a")  # memo 0 = [1]
    for level in range(1, 40):
        data += b"(" + (b"h" + bytes([level - 1])) * 10 + b"lq" + bytes([level])
    data += b"."
    (tmp_path / "laughs.pkl").write_bytes(bytes(data))
    res = _measure(tmp_path / "laughs.pkl")
    _assert_bounded(res, "nodes", modes=("inspect", "read"))
    assert res["scan"]["rc"] == 0  # no global: nothing would run, and the scan never expands


def test_forty_million_element_list(tmp_path):
    (tmp_path / "big.pkl").write_bytes(b"\x80\x02](" + b"K\x01" * 40_000_000 + b"e.")
    _assert_bounded(_measure(tmp_path / "big.pkl"), "pickle_ops", modes=("scan", "inspect", "read"))


def test_lazy_range_turned_into_a_list(tmp_path):
    # builtins.list(range(40M)) from a few bytes: the Builder refuses lazy iterables.
    data = b"\x80\x02c__builtin__\nlist\nc__builtin__\nxrange\nJ\x00\x5a\x62\x02\x85R\x85R."
    (tmp_path / "range.pkl").write_bytes(data)
    _assert_bounded(_measure(tmp_path / "range.pkl", "inspect,read"), modes=("inspect", "read"))


@pytest.mark.parametrize("kind,n", [("lists", 200_000), ("dicts", 5_000)])
def test_deep_nesting(tmp_path, kind, n):
    if kind == "lists":
        data = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."
    else:
        data = b"\x80\x02}" + b"K\x00}" * (n - 1) + b"s" * (n - 1) + b"."
    (tmp_path / "deep.pkl").write_bytes(data)
    _assert_bounded(_measure(tmp_path / "deep.pkl"), "depth", modes=("inspect", "read"))


def test_deep_json_in_a_safetensors_header(tmp_path):
    header = ('{"x":' * 100_000 + "1" + "}" * 100_000).encode()
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    res = _measure(tmp_path / "deep.safetensors")
    _assert_bounded(res, "json_depth", modes=("inspect", "read"))
    assert res["scan"]["rc"] == 0  # no pickle in a safetensors file: scan never parses the JSON


def test_deep_index_json(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, tmp_path / "model-00001-of-00001.safetensors")
    doc = '{"weight_map": {"w": "model-00001-of-00001.safetensors"}, "m": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (tmp_path / "model.safetensors.index.json").write_text(doc)
    _assert_bounded(_measure(tmp_path, "inspect"), "json_depth", modes=("inspect",))


def _bomb_zip(path, member_size, *, storage=False):
    """A torch zip whose data.pkl (or a storage) inflates to ``member_size`` bytes."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            target = info.filename.endswith("data/0") if storage else info.filename.endswith("data.pkl")
            if not target:
                out.writestr(info.filename, src.read(info))
                continue
            with out.open(info.filename, "w", force_zip64=True) as f:
                if not storage:
                    f.write(b"\x80\x04\x8e" + struct.pack("<Q", member_size))
                chunk = b"\x00" * (1 << 24)
                left = member_size
                while left > 0:
                    f.write(chunk[:left])
                    left -= len(chunk)
                if not storage:
                    f.write(b".")


def test_zip_bomb_pickle(tmp_path):
    _bomb_zip(tmp_path / "bomb.pt", 300 << 20)
    _assert_bounded(_measure(tmp_path / "bomb.pt"), "pickle_bytes", modes=("scan", "inspect", "read"))


def test_zip_bomb_storage(tmp_path):
    _bomb_zip(tmp_path / "bomb.pt", 600 << 20, storage=True)
    res = _measure(tmp_path / "bomb.pt")
    _assert_bounded(res, "decompressed", modes=("read",))
    assert res["scan"]["rc"] == 0 and res["inspect"]["rc"] == 0  # listing needs no storage bytes


def test_too_many_members(tmp_path):
    with zipfile.ZipFile(tmp_path / "many.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        for i in range(300):
            z.writestr(f"archive/x/{i}", b"")
    _assert_bounded(_measure(tmp_path / "many.pt", "scan", env={"TORCHKEEP_MAX_MEMBERS": "100"}),
                    "members", modes=("scan",))


def test_legacy_file_claiming_four_terabytes(tmp_path):
    big = b"\x8a\x06" + (1 << 40).to_bytes(6, "little")  # LONG1 2**40
    obj = (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
           b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
           + big + b"NtQK\x00" + big + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs.")
    data = (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps({}, protocol=2) + obj + pickle.dumps(["0"], protocol=2)
            + struct.pack("<q", 2) + b"\x00" * 8)
    (tmp_path / "huge.pt").write_bytes(data)
    res = _measure(tmp_path / "huge.pt")
    _assert_bounded(res, modes=("read",))
    assert "claims" in res["read"]["err"] and res["inspect"]["rc"] == 0, res


def test_limits_name_their_variable_and_can_be_raised(tmp_path, monkeypatch):
    from torchkeep.errors import LimitExceededError
    from torchkeep.read.unpickler import restricted_loads

    deep = pickle.dumps(_nest(150), protocol=2)
    with pytest.raises(LimitExceededError, match="TORCHKEEP_MAX_DEPTH"):
        restricted_loads(deep)
    monkeypatch.setenv("TORCHKEEP_MAX_DEPTH", "400")
    assert restricted_loads(deep) == _nest(150)
    monkeypatch.setenv("TORCHKEEP_MAX_DEPTH", "many")
    with pytest.raises(LimitExceededError, match="not an integer"):
        restricted_loads(deep)


def _nest(n):
    x: list = []
    for _ in range(n - 1):
        x = [x]
    return x


__all__ = ["zlib"]
