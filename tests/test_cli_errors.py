"""Every command, fed malformed options, paths of the wrong kind (file for folder, folder for
file, missing, unreadable) and odd values, ends in exactly one line ``torchkeep: error: ...`` on
stderr and exit status 2, never a traceback; and every command's documented exit codes hold.

The cases of a group run in one driver process that imports torch once and forks a separate
process per command line (``cli_driver.py``), so dozens of cases cost seconds, not one torch
import each; a few checks also run ``python -m torchkeep`` itself.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch

from conftest import ROOT, run_cli

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli_driver.py")


def run_many(cases, cwd):
    """[(rc, stdout, stderr)] of each argv in ``cases``, each in its own forked process."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    p = subprocess.run([sys.executable, DRIVER], input=json.dumps(
        [{"argv": list(a), "cwd": str(cwd)} for a in cases]), capture_output=True, text=True,
        env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    return [(r["rc"], r["stdout"], r["stderr"]) for r in json.loads(p.stdout)]

NET_PY = """import torch
class Net(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.fc = torch.nn.Linear(width, 2)
"""


def _lenet_checkpoint(path, epoch, loss, seed):
    from torchkeep.demo.models import LeNet5

    torch.manual_seed(seed)
    m = LeNet5()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    torch.save({"epoch": epoch, "model_state_dict": torch.nn.DataParallel(m).state_dict(),
                "optimizer_state_dict": opt.state_dict(), "loss": loss}, path)
    return m


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A folder holding one of each kind of path the commands take."""
    import torchkeep

    d = tmp_path_factory.mktemp("ws")
    m = _lenet_checkpoint(d / "model.pt", 5, float("nan"), 0)
    _lenet_checkpoint(d / "model2.pt", 6, 0.25, 1)
    torch.save(m, d / "whole.pt")
    (d / "model.pt").read_bytes()
    (d / "broken.pt").write_bytes((d / "model.pt").read_bytes()[:3000])
    (d / "notes.txt").write_text("not a checkpoint\n")
    (d / "existing.safetensors").write_text("keep me\n")
    (d / "mynet.py").write_text(NET_PY)
    (d / "empty").mkdir()
    with torchkeep.CheckpointManager(d / "run", keep_last=None, monitor="loss",
                                     async_save=False) as mgr:
        for step, loss in ((10, 0.5), (20, 0.2), (30, 0.3)):
            mgr.save({"model": m.state_dict(), "epoch": step // 10}, step=step, metrics={"loss": loss})
    return d


def _check_one_line(argv, rc, stderr, must=()):
    err = stderr.strip()
    problems = []
    if rc != 2:
        problems.append(f"exit {rc}, expected 2")
    if "Traceback" in stderr:
        problems.append("traceback")
    if len(err.splitlines()) != 1 or not err.startswith("torchkeep: error: "):
        problems.append("stderr is not one 'torchkeep: error:' line")
    problems += [f"message lacks {m!r}" for m in must if m not in err]
    return f"torchkeep {' '.join(argv)}: {'; '.join(problems)}\n  stderr: {err[:600]}" if problems else None


def _run_all(ws, cases):
    results = run_many([argv for argv, _ in cases], ws)
    failures = [f for (argv, must), (rc, _, err) in zip(cases, results)
                if (f := _check_one_line(argv, rc, err, must))]
    assert not failures, "\n".join(failures)


FACTORY = "mynet.py:Net"

READING_CASES = [
    (["inspect", "model.pt", "--filter", "("], ["--filter", "regular expression"]),
    (["inspect", "model.pt", "--jsn"], ["torchkeep inspect", "did you mean --json"]),
    (["inspect"], ["torchkeep inspect"]),
    (["inspect", "missing.pt"], ["missing.pt"]),
    (["inspect", "empty"], ["empty"]),
    (["inspect", "notes.txt"], ["notes.txt"]),
    (["inspect", "broken.pt"], ["broken.pt"]),
    (["inspect", "model.pt", "--depth", "0"], ["--depth"]),
    (["inspect", "model.pt", "--depth", "x"], ["--depth"]),
    (["inspect", FACTORY, "--kwargs", "{bad"], ["--kwargs"]),
    (["inspect", FACTORY, "--kwargs", "[1]"], ["--kwargs", "JSON object"]),
    (["inspect", FACTORY, "--kwargs", '{"depth": 3}'], ["--kwargs"]),
    (["inspect", "mynet.py:Nope"], ["Nope"]),
    (["inspect", "no_such_module:Net"], ["no_such_module"]),
    (["scan"], ["torchkeep scan"]),
    (["scan", "missing.pt"], ["missing.pt"]),
    (["scan", "empty"], ["empty"]),
    (["diff", "model.pt"], ["torchkeep diff"]),
    (["diff", "model.pt", "missing.pt"], ["missing.pt"]),
    (["diff", "model.pt", "notes.txt"], ["notes.txt"]),
    (["diff", "model.pt", "model2.pt", "--limit", "-1"], ["--limit"]),
    (["report", "missing.pt", "-o", "r1.html"], ["missing.pt"]),
    (["report", "model.pt", "--bins", "0", "-o", "r2.html"], ["--bins"]),
    (["report", "model.pt", "-o", "existing.safetensors"], ["--force"]),
    (["report", "model.pt", "-o", "nodir/r.html"], ["nodir", "does not exist"]),
    (["frob"], ["invalid choice"]),
    (["--nope"], ["--nope"]),
]

WRITING_CASES = [
    (["convert", "model.pt", "/nonexistent/dir/x.safetensors"], ["/nonexistent/dir", "does not exist"]),
    (["convert", "model.pt", "existing.safetensors"], ["--force"]),
    (["convert", "model.pt", "empty"], ["folder", "--force"]),
    (["convert", "model.pt", "o1.safetensors", "--rename", "(=x"], ["--rename"]),
    (["convert", "model.pt", "o2.safetensors", "--rename", "noequals"], ["--rename"]),
    (["convert", "model.pt", "o3.safetensors", "--dtype", "fp8"], ["--dtype"]),
    (["convert", "model.pt", "o4.safetensors", "--max-shard-size", "lots"], ["lots"]),
    (["convert", "empty", "o5.safetensors"], ["empty"]),
    (["transfer", "model.pt"], ["--into"]),
    (["transfer", "model.pt", "--into", FACTORY, "--kwargs", "[1]"], ["--kwargs"]),
    (["transfer", "model.pt", "--into", FACTORY, "--strict"], ["--strict"]),
    (["transfer", "model.pt", "--into", "model.pt", "--out", "existing.safetensors"], ["--force"]),
    (["transfer", "model.pt", "--into", "model.pt", "--rule", "(=x"], ["--rule"]),
    (["transfer", "model.pt", "--into", "model.pt", "--kwargs", "{}"], ["--kwargs"]),
    (["transfer", "model.pt", "--into", FACTORY, "--match", "nope"], ["--match"]),
    (["transfer", "missing.pt", "--into", FACTORY], ["missing.pt"]),
    (["consolidate", "empty", "o6.safetensors"], ["empty"]),
    (["consolidate", "run", "existing.safetensors"], ["--force"]),
    (["consolidate", "run", "o7.safetensors", "--step", "999"], ["999"]),
    (["demo", "--steps", "3", "--dir", "d1"], ["--steps"]),
    (["demo", "--steps", "x"], ["--steps"]),
    (["demo", "--dir", "notes.txt", "--steps", "10"], ["notes.txt"]),
]

FOLDER_CASES = [
    (["ls", "model.pt"], ["is a file, not a folder", "torchkeep inspect"]),
    (["ls", "empty"], ["no checkpoints", "looked for"]),
    (["ls", "empty", "--json"], ["no checkpoints"]),
    (["ls", "missing"], ["missing"]),
    (["ls", "run", "--mode", "best"], ["--mode"]),
    (["verify", "empty"], ["no checkpoints", "looked for"]),
    (["verify", "model.pt"], ["is a file"]),
    (["verify", "missing"], ["missing"]),
    (["doctor", "empty"], ["no checkpoints", "looked for"]),
    (["doctor", "notes.txt"], ["is a file"]),
    (["doctor", "missing"], ["missing"]),
]


def test_reading_commands_fail_in_one_line(ws):
    _run_all(ws, READING_CASES)


def test_writing_commands_fail_in_one_line_and_write_nothing(ws):
    before = sorted(os.listdir(ws))
    _run_all(ws, WRITING_CASES)
    assert (ws / "existing.safetensors").read_text() == "keep me\n"
    assert sorted(os.listdir(ws)) == before, "a failed command left files behind"


def test_folder_commands_fail_in_one_line(ws):
    _run_all(ws, FOLDER_CASES)


def test_unreadable_file(ws, tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root: chmod cannot make a file unreadable (root reads anything)")
    p = tmp_path / "locked.pt"
    shutil.copy(ws / "model.pt", p)
    p.chmod(0)
    _run_all(tmp_path, [(["inspect", str(p)], ["locked.pt"]), (["scan", str(p)], ["locked.pt"])])


def _strict(text):
    def no(x):
        raise AssertionError(f"non-standard JSON constant {x}")
    return json.loads(text, parse_constant=no)


def test_exit_codes_and_strict_json(ws, tmp_path):
    out, page = tmp_path / "w.safetensors", tmp_path / "r.html"
    dmg = tmp_path / "run"
    shutil.copytree(ws / "run", dmg)
    st = next(dmg.glob("step-*30/*.safetensors"))
    raw = bytearray(st.read_bytes())
    raw[-5] ^= 0xFF                                     # damage step 30's tensor bytes
    st.write_bytes(bytes(raw))
    cases = [
        (["inspect", "model.pt"], 0), (["scan", "model.pt"], 0), (["scan", "whole.pt"], 1),
        (["diff", "model.pt", "model.pt"], 0), (["diff", "model.pt", "model2.pt"], 1),
        (["diff", "model.pt", "model2.pt", "--weights-only"], 1),
        (["ls", "run"], 0), (["verify", "run"], 0), (["verify", str(dmg)], 1), (["doctor", "run"], 0),
        (["convert", "model.pt", str(out)], 0), (["convert", "model.pt", str(out)], 2),
        (["convert", "model.pt", str(out), "--force"], 0),
        (["transfer", "model.pt", "--into", "model.pt", "--out", str(out)], 2),
        (["transfer", "model.pt", "--into", "model.pt", "--out", str(out), "--force"], 0),
        (["report", "model.pt", "-o", str(page)], 0), (["report", "model.pt", "-o", str(page)], 2),
        (["report", "model.pt", "-o", str(page), "--force"], 0),
        (["inspect", "model.pt", "--json"], 0), (["diff", "model.pt", "model2.pt", "--json"], 1),
    ]
    results = run_many([a for a, _ in cases], ws)
    wrong = [f"{' '.join(a)}: exit {rc}, expected {want}: {err.strip()[:300]}"
             for (a, want), (rc, _, err) in zip(cases, results) if rc != want]
    assert not wrong, "\n".join(wrong)
    doc = _strict(results[-2][1])
    assert doc["values"]["loss"] is None and doc["values"]["loss_nonfinite"] == "nan"
    d = _strict(results[-1][1])
    assert d["values"]["loss"]["a_nonfinite"] == "nan" and d["values"]["epoch"] == {"a": 5, "b": 6}


def test_the_real_entry_point(ws):
    """``python -m torchkeep`` itself: one line and exit 2 without --debug, a traceback with it."""
    p = run_cli("inspect", "model.pt", "--filter", "(", cwd=str(ws))
    assert _check_one_line(["inspect"], p.returncode, p.stderr, ["--filter"]) is None
    p = run_cli("inspect", "model.pt", "--filter", "(", "--debug", cwd=str(ws))
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_ls_marks_latest_and_best_and_pipes_plain_text(ws):
    (rc, ls, err), (_, js, _), (_, mx, _), (_, df, _) = run_many(
        [["ls", "run"], ["ls", "run", "--json"], ["ls", "run", "--monitor", "loss", "--mode", "max"],
         ["diff", "model.pt", "model2.pt", "--limit", "0"]], ws)
    assert rc == 0, err
    rows = {line.split()[0]: line for line in ls.splitlines() if line.strip()[:1].isdigit()}
    assert rows["20"].rstrip().endswith("ok (best)") and rows["30"].rstrip().endswith("ok (latest)")
    assert "━" not in ls and "│" not in ls                      # plain text when piped
    doc = _strict(js)
    assert [(r["step"], r["latest"], r["best"]) for r in doc] == [(10, False, False), (20, False, True),
                                                                   (30, True, False)]
    assert "ok (best)" in next(line for line in mx.splitlines() if line.strip().startswith("10"))
    lines = df.splitlines()
    assert any(len(line) > 80 for line in lines)                  # nothing cut at 80 columns
    assert all(line == line.rstrip() for line in lines)            # nothing padded


def test_strict_json_helper():
    from torchkeep.cli._render import strict_json

    got = strict_json({"a": math.inf, "b": [1.0, math.nan, -math.inf], "c": {"d": (2, 3)}})
    assert got == {"a": None, "a_nonfinite": "inf", "b": [1.0, None, None],
                   "b_nonfinite": {"1": "nan", "2": "-inf"}, "c": {"d": [2, 3]}}
    json.dumps(got, allow_nan=False)


def test_report_objects_print_readably(ws):
    import torchkeep

    with torchkeep.open(ws / "model.pt") as ck:
        assert str(ck.summary).startswith(f"{ck.path}: torch-zip")
    assert str(torchkeep.scan(str(ws / "model.pt"))).startswith("safe")
    rep = torchkeep.diff(ws / "model.pt", ws / "model2.pt")
    assert "different (whole state)" in str(rep) and "epoch: 5 → 6" in str(rep)
    assert "Report(" not in str(rep)


def test_trust_is_the_one_pickle_opt_in():
    import torchkeep

    assert torchkeep.TrainState(trust=True).trust
    with pytest.warns(DeprecationWarning, match="trust"):
        st = torchkeep.TrainState(allow_pickle=True)
    assert st.trust and st.allow_pickle
