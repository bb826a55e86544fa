"""freeze / unfreeze / trainable / param_groups / summary and surgery on real models."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep import SurgeryError
from torchkeep.demo.models import LeNet6, TinyBertClassifier, TinyResNet
from torchkeep.shape import (ModelSummary, freeze, is_eval_locked, param_groups, remove, replace,
                             summary, trainable, truncate, unfreeze)


def grads(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def step_stats(model: nn.Module) -> None:
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8) * 2 + 1)


# ------------------------------------------------------------------------------ freeze
def test_freeze_by_glob_module_name_type_and_instance():
    m = TinyResNet()
    assert freeze(m, "layer1.*") == [n for n in grads(m) if n.startswith("layer1.")]
    frozen = freeze(m, "conv1")                    # a module name selects its parameters
    assert frozen == ["conv1.weight"]
    freeze(m, nn.Linear)                            # a module type
    assert not m.fc.weight.requires_grad
    freeze(m, m.layer2[0].downsample)               # a module instance
    assert not m.layer2[0].downsample[0].weight.requires_grad
    assert m.layer2[0].conv1.weight.requires_grad
    assert set(torchkeep.trainable(m)) == {p for n, p in m.named_parameters()
                                            if n.startswith(("layer2", "layer3", "bn1"))
                                            and not n.startswith("layer2.0.downsample")}


def test_freeze_until_and_bracket_globs():
    m = LeNet6()
    frozen = freeze(m, until="fc.3")
    assert frozen == ["conv.0.weight", "conv.0.bias", "conv.3.weight", "conv.3.bias",
                      "fc.1.weight", "fc.1.bias", "fc.3.weight", "fc.3.bias"]
    assert [n for n, g in grads(m).items() if g] == ["fc.5.weight", "fc.5.bias", "fc.7.weight", "fc.7.bias"]
    bert = TinyBertClassifier(layers=4)
    freeze(bert, "bert.encoder.layer.[0-1].*", "bert.embeddings")
    g = grads(bert)
    assert not g["bert.encoder.layer.1.output.dense.weight"]
    assert g["bert.encoder.layer.2.output.dense.weight"] and g["classifier.weight"]
    assert not g["bert.embeddings.word_embeddings.weight"]


def test_freeze_of_nothing_is_an_error_not_a_silent_no_op():
    m = LeNet6()
    with pytest.raises(SurgeryError, match="matches no parameter or module") as e:
        freeze(m, "fc.9.*")
    assert "did you mean" in str(e.value)
    with pytest.raises(SurgeryError, match="no module 'fc.9'"):
        freeze(m, until="fc.9")
    with pytest.raises(SurgeryError, match="no BatchNorm2d"):
        freeze(m, nn.BatchNorm2d)
    assert all(grads(m).values())


def test_frozen_batchnorm_stays_in_eval_across_train_and_unfreeze_undoes_it():
    torch.manual_seed(0)
    m = TinyResNet()
    freeze(m, "conv1", "bn1", "layer1")
    m.train()
    assert not m.bn1.training and not m.layer1[0].bn2.training
    assert m.layer2[0].bn1.training and m.training
    frozen_stats = m.layer1[0].bn1.running_mean.clone()
    free_stats = m.layer2[0].bn1.running_mean.clone()
    count = int(m.bn1.num_batches_tracked)
    step_stats(m)
    assert torch.equal(m.layer1[0].bn1.running_mean, frozen_stats)
    assert int(m.bn1.num_batches_tracked) == count
    assert not torch.equal(m.layer2[0].bn1.running_mean, free_stats)
    assert list(m.state_dict()) == list(TinyResNet().state_dict())   # state dict untouched
    assert summary(m).locked_norms == 3

    unfreeze(m, "layer1")
    assert not is_eval_locked(m.layer1[0].bn1) and m.layer1[0].bn1.training
    assert m.layer1[0].conv1.weight.requires_grad
    assert is_eval_locked(m.bn1) and not m.bn1.training
    unfreeze(m)
    m.eval()
    m.train()
    assert all(mod.training for mod in m.modules()) and all(grads(m).values())


def test_eval_lock_survives_pickle_deepcopy_and_torch_save():
    m = TinyResNet()
    freeze(m)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        clone.train()
        assert not clone.bn1.training and is_eval_locked(clone.bn1)
        assert clone.bn1.__dict__["train"].module is clone.bn1
        unfreeze(clone)
        clone.train()
        assert clone.bn1.training
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded.train()
    assert not loaded.layer3[0].bn2.training


def test_bn_keep_leaves_statistics_moving():
    m = TinyResNet()
    freeze(m, bn="keep")
    before = m.bn1.running_mean.clone()
    step_stats(m)
    assert not torch.equal(m.bn1.running_mean, before)
    with pytest.raises(ValueError, match="bn="):
        freeze(m, bn="frozen")


# ------------------------------------------------------------------------ param groups
def test_param_groups_first_match_wins_and_feed_an_optimizer():
    m = TinyBertClassifier()
    freeze(m, "bert.embeddings")
    groups = param_groups(m, {"bert.encoder.*": {"lr": 1e-5}, "bert.*": {"lr": 1e-4},
                              "*": {"lr": 1e-3, "weight_decay": 0.0}})
    names = {id(p): n for n, p in m.named_parameters()}
    g0 = [names[id(p)] for p in groups[0]["params"]]
    g1 = [names[id(p)] for p in groups[1]["params"]]
    g2 = [names[id(p)] for p in groups[2]["params"]]
    assert all(n.startswith("bert.encoder.") for n in g0) and g0
    assert g1 == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    assert g2 == ["classifier.weight", "classifier.bias"]
    assert len(g0) + len(g1) + len(g2) == len(trainable(m))   # each trainable once, frozen left out
    opt = torch.optim.AdamW(groups)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 1e-4, 1e-3]


def test_param_groups_reject_unmatched_and_unknown_patterns():
    m = LeNet6()
    with pytest.raises(SurgeryError, match="4 trainable parameters match no group: fc.5.weight"):
        param_groups(m, {"conv.*": {"lr": 1}, "fc.[13].*": {"lr": 2}})
    with pytest.raises(SurgeryError, match="'decoder.*' matches no parameter"):
        param_groups(m, {"decoder.*": {"lr": 1}, "*": {}})
    freeze(m, "fc.7")
    groups = param_groups(m, {"fc.7": {"lr": 1}, "*": {"lr": 2}})
    assert groups[0]["params"] == [] and len(groups[1]["params"]) == 10   # empty group kept


# ----------------------------------------------------------------------------- summary
def test_summary_counts_by_top_level_module():
    m = LeNet6()
    freeze(m, "conv")
    s = summary(m)
    assert isinstance(s, ModelSummary)
    rows = {r.name: r for r in s.rows}
    assert rows["conv"].params == rows["conv"].frozen == 6 * 25 + 6 + 16 * 6 * 25 + 16
    assert rows["fc"].trainable == 400 * 120 + 120 + 120 * 84 + 84 + 84 * 64 + 64 + 64 * 10 + 10
    assert s.total == sum(p.numel() for p in m.parameters()) == s.trainable + s.frozen
    text = str(s)
    assert text.splitlines()[0] == "LeNet6"
    assert "conv" in text and "total" in text and f"{s.total:,}" in text


# ----------------------------------------------------------------------------- surgery
def test_remove_replace_truncate_on_sequential_modulelist_moduledict():
    m = LeNet6()
    removed = remove(m, "fc.6")
    assert isinstance(removed, nn.ReLU) and len(m.fc) == 7
    assert isinstance(m.fc[6], nn.Linear)                       # renumbered, like del seq[6]
    old = replace(m, "fc.-1", nn.Linear(64, 3))
    assert old.out_features == 10 and m.fc[6].out_features == 3
    dropped = truncate(m, "fc", keep=-2)
    assert [type(d).__name__ for d in dropped] == ["Linear", "Linear"] and len(m.fc) == 5
    assert m(torch.randn(1, 1, 28, 28)).shape == (1, 84)

    bert = TinyBertClassifier(layers=3)
    truncate(bert, "bert.encoder.layer", keep=1)
    assert len(bert.bert.encoder.layer) == 1
    assert bert(torch.randint(0, 100, (2, 5))).shape == (2, 2)

    d = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    holder = nn.Module()
    holder.heads = d
    assert isinstance(remove(holder, "heads.a"), nn.Linear) and list(d) == ["b"]
    replace(holder, "heads.b", nn.Identity())
    assert isinstance(d["b"], nn.Identity)
    remove(m, "conv")
    assert not hasattr(m, "conv")


def test_surgery_errors_name_the_closest_paths():
    m = LeNet6()
    with pytest.raises(SurgeryError) as e:
        remove(m, "fc.9")
    assert "no module at 'fc.9'" in str(e.value) and "closest existing paths: fc.7" in str(e.value)
    with pytest.raises(SurgeryError, match="closest existing paths: conv"):
        replace(m, "conf.0", nn.Identity())
    with pytest.raises(SurgeryError, match="truncate needs a Sequential or ModuleList"):
        truncate(m, "fc.1", keep=1)
    with pytest.raises(SurgeryError, match="out of range"):
        truncate(m, "fc", keep=-20)
    with pytest.raises(SurgeryError, match="must be an nn.Module"):
        replace(m, "fc.1", "linear")
    assert len(m.fc) == 8
