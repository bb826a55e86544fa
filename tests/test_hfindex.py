"""Hugging Face style folders written by the real writers: transformers' save_pretrained (with
and without sharding) and huggingface_hub's save_torch_state_dict (torch.save shards)."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import torchkeep
from torchkeep.errors import CorruptCheckpointError, FormatError

transformers = pytest.importorskip("transformers")
hub = pytest.importorskip("huggingface_hub")


def _bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=40)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def bert():
    return _bert()


def _save_pretrained(model, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **kw)


def _equal_state(got, want):
    assert set(got) == set(want), set(got) ^ set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_pretrained(bert, tmp_path, safe, shard):
    kw = {"max_shard_size": shard} if shard else {}
    _save_pretrained(bert, tmp_path, safe_serialization=safe, **kw)
    ck = torchkeep.open(tmp_path)
    assert ck.format == "hf-sharded"
    _equal_state(ck.state_dict(), bert.state_dict())
    files = ck.reader.files()
    if shard:
        assert os.path.basename(files[0]).endswith(".index.json") and len(files) > 2
        assert ck.metadata["shards"] == len(files) - 1
        # the index file itself opens the same checkpoint
        ck2 = torchkeep.open(files[0])
        assert ck2.format == "hf-sharded" and len(ck2.entries()) == len(ck.entries())
    else:
        assert len(files) == 1 and files[0].endswith((".safetensors", ".bin"))
    # the weights load into a fresh model and give the same outputs
    fresh = transformers.BertModel(bert.config).eval()
    fresh.load_state_dict(ck.state_dict())
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(fresh(ids).last_hidden_state, bert(ids).last_hidden_state)


@pytest.mark.parametrize("shard", ["20KB", "5GB"])
def test_torch_save_shards(bert, tmp_path, shard):
    sd = bert.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hub.save_torch_state_dict(sd, tmp_path, safe_serialization=False, max_shard_size=shard)
    ck = torchkeep.open(tmp_path)
    assert ck.format == "hf-sharded"
    _equal_state(ck.state_dict(), sd)
    shards = [f for f in ck.reader.files() if f.endswith(".bin")]
    assert shards and all(torchkeep.open(f).format == "torch-zip" for f in shards)
    assert (len(shards) > 1) == (shard == "20KB")
    report = torchkeep.scan(str(tmp_path))
    assert report.safe, report.to_dict()


@pytest.fixture
def sharded(bert, tmp_path):
    _save_pretrained(bert, tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    return tmp_path, index, json.loads(index.read_text())


def test_missing_shard(sharded):
    folder, index, doc = sharded
    victim = sorted(set(doc["weight_map"].values()))[-1]
    os.unlink(folder / victim)
    with pytest.raises(CorruptCheckpointError) as ei:
        torchkeep.open(folder).entries()
    msg = str(ei.value)
    assert str(index) in msg and f"shard '{victim}'" in msg and "missing" in msg


def test_tensor_listed_but_absent_from_its_shard(sharded):
    folder, index, doc = sharded
    doc["weight_map"]["encoder.ghost.weight"] = sorted(set(doc["weight_map"].values()))[0]
    index.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="'encoder.ghost.weight'.*no such tensor"):
        torchkeep.open(folder).entries()


def test_index_escaping_the_folder_is_refused(sharded):
    folder, index, doc = sharded
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = "../elsewhere.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="not a file name inside the folder"):
        torchkeep.open(folder).entries()


def test_lazy_subset_reads_one_shard(sharded):
    folder, index, doc = sharded
    ck = torchkeep.open(folder)
    name = "encoder.layer.1.output.dense.weight"
    got = ck.tensors([name])
    assert got[name].shape == (32, 64)
    mapped = [r for r in ck.reader._shards.values() if getattr(r, "_mm", None) is not None]
    assert [os.path.basename(r.path) for r in mapped] == [doc["weight_map"][name]]


def test_folders_that_are_not_checkpoints(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(FormatError, match="not a checkpoint folder"):
        torchkeep.open(tmp_path)
    two = tmp_path / "two"
    two.mkdir()
    from safetensors.torch import save_file
    save_file({"a": torch.ones(1)}, two / "a.safetensors")
    save_file({"b": torch.ones(1)}, two / "b.safetensors")
    with pytest.raises(FormatError, match="several weights files and no index"):
        torchkeep.open(two).entries()
