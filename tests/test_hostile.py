"""The hostile corpus (tests/hostile_corpus.py): no file runs code, every malicious one scans
unsafe naming its globals, every benign one scans safe; torchkeep never misses what
torch.load(weights_only=True) or picklescan catch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import hostile_corpus as H
import torchkeep
from conftest import ROOT, run_cli
from torchkeep.errors import TorchkeepError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    marker = str(tmp / "MARKER")
    mal = H.malicious(str(tmp), marker)
    ben_dir = tmp / "benign"
    ben_dir.mkdir()
    return mal, H.benign(str(ben_dir)), marker


def _named(rep) -> set[str]:
    return {g.qualname for g in rep.unsafe + rep.unknown}


def test_every_malicious_file_scans_unsafe_naming_its_globals(corpus):
    mal, _, marker = corpus
    wrong = []
    for name, (path, expect) in mal.items():
        rep = torchkeep.scan(path)
        if rep.verdict != "unsafe" or not _named(rep) & set(expect):
            wrong.append(f"{name}: {rep.verdict} {sorted(_named(rep))} (expected one of {expect})")
    assert not wrong, "\n".join(wrong)
    assert not os.path.exists(marker)
    assert len(mal) >= 38  # every class of the issue is in the corpus


def test_every_benign_file_scans_safe(corpus):
    _, ben, _ = corpus
    wrong = [f"{n}: {r.verdict} {sorted(_named(r))} {r.errors}" for n, r in
             ((n, torchkeep.scan(p)) for n, p in ben.items()) if not r.safe]
    assert not wrong, "\n".join(wrong)
    assert len(ben) >= 18


def test_opening_and_reading_malicious_files_never_runs_them(corpus):
    mal, _, marker = corpus
    for name, (path, _) in mal.items():
        try:
            ck = torchkeep.open(path)
            ck.entries()
            str(ck.summary)
            ck.state_dict()
        except TorchkeepError:
            pass  # refusing is fine; running is not
        assert not os.path.exists(marker), name


def test_damage_is_reported_beside_the_globals(corpus):
    mal, _, _ = corpus
    rep = torchkeep.scan(mal["pkl_broken_after_payload"][0])
    assert rep.verdict == "unsafe" and any("damaged pickle" in e for e in rep.errors)
    rep = torchkeep.scan(mal["zip_bad_crc"][0])
    assert any("CRC mismatch" in e and "would still run" in e for e in rep.errors)
    rep = torchkeep.scan(mal["zip_duplicate_names"][0])
    assert any("holds this name twice" in n for n in rep.notes)
    rep = torchkeep.scan(mal["zip_flag_0x1"][0])
    assert any("encrypted" in u for u in rep.uninspected)


def test_cli_exit_codes_on_the_corpus(corpus):
    mal, ben, _ = corpus
    for name in ("pkl_broken_after_payload", "zip_bad_crc", "legacy_paren_first", "npz_object",
                 "training_args_beside_weights"):
        path, expect = mal[name]
        p = run_cli("scan", path)
        assert p.returncode == 1, (name, p.stdout, p.stderr)
        assert any(e in p.stdout for e in expect), (name, p.stdout)
    p = run_cli("scan", ben["zip.pt"], ben["plain_p0.pkl"], ben["plain.npz"], ben["timm_args.pt"])
    assert p.returncode == 0, p.stdout + p.stderr
    p = run_cli("scan", "--json", mal["pkl_broken_after_payload"][0])
    data = json.loads(p.stdout)
    assert data["verdict"] == "unsafe" and data["errors"]


def test_7z_without_a_reader_is_unsafe_not_safe(corpus):
    mal, ben, _ = corpus
    if "sevenz" not in mal:
        pytest.skip("py7zr is not installed: the corpus has no 7z files")
    code = ("import sys; sys.modules['py7zr'] = None\n"
            "from torchkeep.cli import main; sys.exit(main(['scan', sys.argv[1]]))")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    for path in (mal["sevenz"][0], ben["packed.7z"]):
        p = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env)
        assert p.returncode == 1 and "install py7zr" in p.stdout, p.stdout + p.stderr


def _torch_weights_only_refuses(path: str) -> bool:
    import torch

    try:
        torch.load(path, weights_only=True)
        return False
    except Exception:
        return True


def test_never_the_one_that_misses(corpus):
    """Where torch.load(weights_only=True) refuses a malicious file or picklescan flags it,
    torchkeep says unsafe too (it flags every file of the corpus, which neither of them does)."""
    mal, ben, marker = corpus
    try:
        from picklescan.scanner import scan_file_path
    except ImportError:
        scan_file_path = None
    missed, table = [], []
    for name, (path, _) in mal.items():
        if os.path.isdir(path):
            continue
        ours = torchkeep.scan(path).verdict
        torch_refuses = _torch_weights_only_refuses(path)
        ps = None
        if scan_file_path is not None:
            r = scan_file_path(path)
            ps = bool(r.issues_count or r.scan_err)
        table.append(f"{name:32} torchkeep={ours:7} weights_only_refuses={torch_refuses} picklescan={ps}")
        if ours != "unsafe" and (torch_refuses or ps):
            missed.append(name)
    assert not os.path.exists(marker)
    assert not missed, "torchkeep missed what others caught:\n" + "\n".join(table)
    if scan_file_path is None:
        pytest.skip("picklescan is not installed: compared with torch.load(weights_only=True) only")


def test_globals_of_a_cut_archive_are_still_reported(tmp_path):
    """A zip cut before its central directory: torch.load cannot open it, but its pickle is
    found from the local headers and its globals reported with the damage (exit 1)."""
    import torch

    marker = tmp_path / "MARKER"
    torch.save({"w": torch.ones(1000), "evil": H.Payload(str(marker))}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    for cut in (len(data) - 200, len(data) // 2):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        rep = torchkeep.scan(str(tmp_path / "cut.pt"))
        assert rep.verdict == "unsafe" and "posix.system" in [g.qualname for g in rep.unsafe]
        assert any("torch.load cannot open it" in e for e in rep.errors)
    torch.save({"w": torch.ones(1000)}, tmp_path / "clean.pt")
    data = (tmp_path / "clean.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:-200])
    p = run_cli("scan", str(tmp_path / "cut.pt"))
    assert p.returncode == 2 and "damaged" in p.stdout, p.stdout + p.stderr
    assert not marker.exists()


def test_folder_scan_covers_pickles_of_any_name(tmp_path):
    import hostile_corpus as H2
    from safetensors.torch import save_file
    import torch

    marker = tmp_path / "MARKER"
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "notes.txt").write_text("cos\nsystem\n")  # a text file by name: not probed
    (tmp_path / "README").write_text("Apache License\n")
    assert torchkeep.scan(str(tmp_path)).safe
    (tmp_path / "state").write_bytes(H2.raw_pickles(str(marker))["p0_inst"][0])  # no suffix, protocol 0
    rep = torchkeep.scan(str(tmp_path))
    assert rep.verdict == "unsafe" and any(g.member.startswith("state:") for g in rep.unsafe)
    assert not marker.exists()
