"""Whole-file checksums: DCP shard files of a rank-sharded checkpoint and the files of a sealed
folder are recorded with their xxh3-128 and size; records written before hold sha256 and are
still checked. Every kind of damage is named: a flipped bit, a truncation, a missing file, a
record without a checksum."""
from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as hs

from torchkeep.integrations import sealed
from torchkeep.read.formats import nativeshards as sharded
from torchkeep.store.backends import LocalStorage
from torchkeep.store.checksums import file_record, record_mismatch

ALGOS = ["xxh3_128", "sha256"]


@settings(max_examples=50, deadline=None)
@given(data=hs.binary(max_size=5000), chunk=hs.integers(1, 700))
def test_file_record_is_the_digest_of_the_whole_file_whatever_the_chunks(data, chunk):
    rec = file_record(io.BytesIO(data), "xxh3_128", chunk=chunk)
    assert rec == {"xxh3_128": xxhash.xxh3_128_hexdigest(data), "size": len(data)}
    old = file_record(io.BytesIO(data), "sha256", chunk=chunk)
    assert old == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert record_mismatch(rec, rec) is None and record_mismatch(old, old) is None


def _shards(tmp_path, algo):
    folder = tmp_path / "step-00000002"
    (folder / "shards").mkdir(parents=True)
    payload = os.urandom(10_000)
    (folder / "shards" / "__0_0.distcp").write_bytes(payload)
    rec = file_record(io.BytesIO(payload), algo)
    manifest = {"distributed": {"world_size": 1, "shards": "shards",
                                "files": {"shards/__0_0.distcp": rec}}}
    return str(folder), manifest, folder / "shards" / "__0_0.distcp"


@pytest.mark.parametrize("algo", ALGOS)
def test_shard_files_verify_with_either_record(tmp_path, algo):
    folder, manifest, victim = _shards(tmp_path, algo)
    st = LocalStorage()
    assert sharded.verify(st, folder, manifest) == []
    data = bytearray(victim.read_bytes())
    data[1234] ^= 0x08
    victim.write_bytes(bytes(data))
    (bad,) = sharded.verify(st, folder, manifest)
    assert f"{algo} is" in str(bad) and "__0_0.distcp" in str(bad)
    victim.write_bytes(bytes(data[:-1]))
    (bad,) = sharded.verify(st, folder, manifest)
    assert "9999 bytes, the manifest says 10000" in str(bad)
    victim.unlink()
    (bad,) = sharded.verify(st, folder, manifest)
    assert "missing" in str(bad)


def test_a_shard_record_without_a_checksum_is_a_problem(tmp_path):
    folder, manifest, _ = _shards(tmp_path, "xxh3_128")
    manifest["distributed"]["files"]["shards/__0_0.distcp"] = {"size": 10_000}
    (bad,) = sharded.verify(LocalStorage(), folder, manifest)
    assert "holds no checksum" in str(bad)


def _sealed_folder(tmp_path):
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "trainer_state.json").write_text('{"global_step": 4}')
    sealed.seal(folder)
    return folder


def test_a_new_seal_records_xxh3_128(tmp_path):
    folder = _sealed_folder(tmp_path)
    files = json.loads((folder / sealed.MANIFEST).read_text())["files"]
    assert set(files) == {"model.safetensors", "trainer_state.json"}
    assert all(set(r) == {"xxh3_128", "size"} for r in files.values())
    assert sealed.problems(folder) == []


def test_a_folder_sealed_with_sha256_still_verifies(tmp_path):
    """A folder sealed before xxh3-128 (sha256 records) is good while its files are, and damage
    in it is found and named."""
    folder = _sealed_folder(tmp_path)
    manifest = json.loads((folder / sealed.MANIFEST).read_text())
    for rel in manifest["files"]:
        with open(folder / rel, "rb") as f:
            manifest["files"][rel] = file_record(f, "sha256")
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    (folder / sealed.MANIFEST).write_bytes(data)
    rec = json.loads((folder / sealed.COMMIT).read_text())
    rec["manifest_sha256"] = hashlib.sha256(data).hexdigest()
    (folder / sealed.COMMIT).write_text(json.dumps(rec))
    assert sealed.problems(folder) == []
    assert sealed.verify(folder).status == "ok"
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    (bad,) = sealed.problems(folder)
    assert "model.safetensors: sha256 is" in bad and "damaged on disk" in bad
    assert sealed.verify(folder).status == "damaged"


def test_an_unknown_file_checksum_is_refused():
    with pytest.raises(ValueError, match="unknown file checksum 'md5'"):
        file_record(io.BytesIO(b"x"), "md5")
