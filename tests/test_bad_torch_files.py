"""Damaged torch.save files get one clear torchkeep error: never a crash, hang or huge allocation."""
from __future__ import annotations

import zipfile

import pytest
import torch

import torchkeep
from torchkeep.errors import CorruptCheckpointError, FormatError, TorchkeepError


def _write(tmp_path, legacy=False):
    torch.manual_seed(0)
    obj = {"epoch": 2, "model": {"a.weight": torch.randn(32, 16), "a.bias": torch.randn(32),
                                 "b.weight": torch.randn(8, 32)}}
    path = tmp_path / ("legacy.pt" if legacy else "zip.pt")
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path, obj


def _read_everything(path):
    ck = torchkeep.open(path)
    ck.entries()
    return ck.state_dict()


def test_empty_file(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        torchkeep.open(tmp_path / "e.pt")


def test_text_file_named_pt(tmp_path):
    (tmp_path / "notes.pt").write_text("these are my training notes\n")
    with pytest.raises(FormatError, match="text file"):
        torchkeep.open(tmp_path / "notes.pt")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_at_every_region(tmp_path, legacy):
    path, obj = _write(tmp_path, legacy)
    data = path.read_bytes()
    cut_points = sorted({1, 2, 10, 40, 64, 100, 200, 500} | {len(data) * k // 23 for k in range(1, 23)}
                        | {len(data) - 1, len(data) - 22, len(data) - 100})
    for cut in cut_points:
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        try:
            sd = _read_everything(bad)
        except TorchkeepError as e:
            assert str(bad) in str(e), e  # the message names the file
            continue
        # A cut that leaves every byte the weights need (only trailing records lost) may read
        # fine; then it must read the right values.
        for k, v in obj["model"].items():
            assert torch.equal(sd[k], v), (cut, k)


def test_zip_member_shorter_than_its_tensor(tmp_path):
    path, _ = _write(tmp_path)
    src = zipfile.ZipFile(path)
    out_path = tmp_path / "short.pt"
    with zipfile.ZipFile(out_path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/0"):
                data = data[: len(data) // 2]
            out.writestr(info.filename, data)
    ck = torchkeep.open(out_path)
    assert len(ck.entries()) == 3  # the listing needs no tensor bytes
    with pytest.raises(CorruptCheckpointError, match="holds .* bytes but its tensors need"):
        ck.state_dict()


def test_missing_storage_member(tmp_path):
    path, _ = _write(tmp_path)
    src = zipfile.ZipFile(path)
    out_path = tmp_path / "missing.pt"
    with zipfile.ZipFile(out_path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            if not info.filename.endswith("data/1"):
                out.writestr(info.filename, src.read(info))
    with pytest.raises(CorruptCheckpointError, match="missing from the archive"):
        torchkeep.open(out_path).state_dict()


def test_recompressed_archive_still_reads(tmp_path):
    path, obj = _write(tmp_path)
    src = zipfile.ZipFile(path)
    out_path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(out_path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))
    sd = torchkeep.open(out_path).state_dict()
    for k, v in obj["model"].items():
        assert torch.equal(sd[k], v)


def test_zip_without_data_pkl(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(FormatError, match="without data.pkl"):
        torchkeep.open(tmp_path / "other.pt").entries()


def test_bit_flips_in_pickle_give_clear_errors(tmp_path):
    path, _ = _write(tmp_path, legacy=True)
    data = bytearray(path.read_bytes())
    for pos in range(20, 400, 7):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        p = tmp_path / "flip.pt"
        p.write_bytes(bytes(bad))
        try:
            _read_everything(p)
        except TorchkeepError:
            pass
