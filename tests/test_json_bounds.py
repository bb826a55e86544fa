"""Every JSON file a reader parses is bounded in depth first: deep nesting is a one-line
LimitExceededError naming json_depth (or damage, for torchkeep's own records), never a
RecursionError from json's recursive parser."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import torchkeep
from torchkeep.errors import LimitExceededError

DEEP = "[" * 200_000 + "]" * 200_000   # far past json_depth, and past Python's recursion limit


def _weights(folder):
    os.makedirs(folder, exist_ok=True)
    save_file({"w": torch.ones(2)}, os.path.join(folder, "model.safetensors"))


def _diffusers(d):
    _weights(os.path.join(d, "unet"))
    with open(os.path.join(d, "model_index.json"), "w") as f:
        f.write('{"_class_name": "X", "unet": ["diffusers", "U"], "deep": ' + DEEP + "}")


def _sentence_transformers(d):
    _weights(d)
    with open(os.path.join(d, "modules.json"), "w") as f:
        f.write('[{"idx": 0, "name": "0", "path": "", "type": "x", "deep": ' + DEEP + "}]")


def _tensordict(d):
    os.makedirs(d)
    with open(os.path.join(d, "meta.json"), "w") as f:
        f.write('{"_type": "TensorDict", "deep": ' + DEEP + "}")


@pytest.mark.parametrize("make", [_diffusers, _sentence_transformers, _tensordict])
def test_deep_json_in_a_folder_format_is_refused_by_name(tmp_path, make):
    d = str(tmp_path / "ckpt")
    make(d)
    with pytest.raises(LimitExceededError, match="json_depth") as err:
        torchkeep.open(d).entries()
    assert "TORCHKEEP_MAX_JSON_DEPTH" in str(err.value)


def test_deep_commit_record_is_damage_and_restore_falls_back(tmp_path, caplog):
    model = torch.nn.Linear(2, 2)
    state = torchkeep.TrainState(model=model)
    with torchkeep.CheckpointManager(tmp_path, async_save=False, keep_last=3) as mgr:
        mgr.save(state, step=1)
        mgr.save(state, step=2)
    newest = tmp_path / "step-00000002"
    for name in os.listdir(newest):
        if name.startswith("commit"):
            (newest / name).write_text('{"format": "torchkeep", "x": ' + DEEP + "}")
    mgr = torchkeep.CheckpointManager(tmp_path)
    with caplog.at_level("WARNING"):
        assert mgr.restore(torchkeep.TrainState(model=torch.nn.Linear(2, 2))) == 1
    assert any("step-00000002" in r.getMessage() for r in caplog.records)
    mgr.close()


def test_shallow_json_still_reads(tmp_path):
    d = str(tmp_path / "td")
    os.makedirs(d)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"_type": "TensorDict"}, f)
    ck = torchkeep.open(d)  # an empty tensordict folder: parsed, recognised, nothing refused
    assert ck.format == "tensordict" and ck.entries() == []
