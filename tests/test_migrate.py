"""Name-aware optimizer-state migration: a refactored model resumes with the Adam moments, SGD
momentum, step counts, param-group settings and EMA copies of every parameter that is still
there, bit for bit; reshaped, new and removed parameters are reported."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep import CheckpointManager, TrainState, TransferError
from torchkeep.carry.migration.optimizer import migrate_optimizer
from torchkeep.demo.models import LeNet5, LeNet5Moon, LeNet6
from torchkeep.keep.migrating import Migration


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3, sched=None, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def saved_state(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's state by parameter name, cloned."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture
def lenet_run(tmp_path):
    """LeNet5 trained 3 steps with AdamW and a cosine schedule, saved by a manager."""
    torch.manual_seed(0)
    model = LeNet5()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    train(model, opt, 3, sched)
    with CheckpointManager(tmp_path / "ckpt", async_save=False) as mgr:
        mgr.save(TrainState(model, opt, sched), step=3)
    return tmp_path / "ckpt", model, opt, sched


def test_extra_layer_keeps_the_moments_of_every_unchanged_parameter(lenet_run):
    folder, old, old_opt, old_sched = lenet_run
    before = saved_state(old_opt, old)
    torch.manual_seed(1)
    new = LeNet6()
    opt = torch.optim.AdamW(new.parameters(), lr=5e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    mgr = CheckpointManager(folder)
    assert mgr.restore(TrainState(new, opt, sched), migrate=True) == 3
    rep = mgr.migration.optimizers[""]
    kept = ["conv.0.weight", "conv.0.bias", "conv.3.weight", "conv.3.bias",
            "fc.1.weight", "fc.1.bias", "fc.3.weight", "fc.3.bias"]
    assert rep.names("carried") == kept
    assert rep.names("fresh") == ["fc.5.weight", "fc.5.bias", "fc.7.weight", "fc.7.bias"]
    assert [p.name for p in rep.params if p.fate == "removed"] == ["fc.5.weight", "fc.5.bias"]
    assert "source fc.5.weight is [10, 84]" in rep.fate("fc.5.weight").detail
    assert rep.fate("fc.7.weight").detail == "new parameter"
    params = dict(new.named_parameters())
    for n in kept:
        assert_same_state(opt.state[params[n]], before[n])          # moments and step, bit for bit
        assert torch.equal(params[n], dict(old.named_parameters())[n])
    assert not opt.state[params["fc.7.weight"]]
    # Hyper-parameters and the schedule are the checkpoint's; training goes on.
    assert opt.param_groups[0]["lr"] == old_opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["weight_decay"] == 0.05
    assert sched.last_epoch == old_sched.last_epoch
    train(new, opt, 1, sched)
    assert opt.state[params["fc.7.weight"]]["step"].item() == 1
    assert opt.state[params["conv.0.weight"]]["step"].item() == 4
    assert "4 fresh" in str(mgr.migration) and not mgr.migration.exact


def test_renamed_module_carries_everything_by_structure(lenet_run):
    folder, old, old_opt, _ = lenet_run
    before = saved_state(old_opt, old)
    new = LeNet5Moon()
    opt = torch.optim.AdamW(new.parameters(), lr=5e-2)
    mgr = CheckpointManager(folder)
    mgr.restore(TrainState(new, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)),
                migrate=True)
    rep = mgr.migration.optimizers[""]
    assert rep.counts == {"carried": 10, "adapted": 0, "reset": 0, "fresh": 0, "removed": 0}
    renamed = mgr.migration.renamed()
    assert renamed["moon.0.weight"] == "conv.0.weight" and renamed["moon.11.bias"] == "fc.5.bias"
    params = dict(new.named_parameters())
    for t, s in renamed.items():
        assert_same_state(opt.state[params[t]], before[s])
    assert rep.groups[0].changed["lr"][1] == old_opt.param_groups[0]["lr"]


def test_frozen_backbone_and_a_new_group_layout(lenet_run):
    """The resumed run freezes the convolutions (its optimizer holds the head only): the head's
    moments are carried, the backbone's state is reported as removed because it is not trained.
    Then a run that splits the parameters in two groups: the scheduler's lists follow."""
    folder, old, old_opt, old_sched = lenet_run
    before = saved_state(old_opt, old)
    new = LeNet5()
    for p in new.conv.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in new.parameters() if p.requires_grad], lr=5e-2)
    mgr = CheckpointManager(folder)
    mgr.restore(TrainState(new, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)),
                migrate=True)
    rep = mgr.migration.optimizers[""]
    assert rep.names("carried") == [n for n, _ in new.fc.named_parameters(prefix="fc")]
    removed = {p.name: p.detail for p in rep.params if p.fate == "removed"}
    assert set(removed) == {"conv.0.weight", "conv.0.bias", "conv.3.weight", "conv.3.bias"}
    assert "which this optimizer does not hold (frozen?)" in removed["conv.0.weight"]
    params = dict(new.named_parameters())
    for n in rep.names("carried"):
        assert_same_state(opt.state[params[n]], before[n])
    assert torch.equal(params["conv.0.weight"], dict(old.named_parameters())["conv.0.weight"])

    split = LeNet5()
    opt2 = torch.optim.AdamW([{"params": split.conv.parameters(), "lr": 1e-5},
                              {"params": split.fc.parameters()}], lr=5e-2)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    mgr.restore(TrainState(split, opt2, sched2), migrate=True)
    groups = mgr.migration.optimizers[""].groups
    assert [(g.source, g.votes, g.size) for g in groups] == [(0, 4, 4), (0, 6, 6)]
    assert sched2.base_lrs == [old_sched.base_lrs[0]] * 2
    assert "scheduler" in mgr.migration.schedulers
    train(split, opt2, 1, sched2)


def test_unchanged_model_with_migrate_resumes_exactly(lenet_run):
    folder, old, old_opt, _ = lenet_run

    def resumed(migrate: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(5)
        m = LeNet5()
        o = torch.optim.AdamW(m.parameters(), lr=5e-2)
        s = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)
        mgr = CheckpointManager(folder)
        mgr.restore(TrainState(m, o, s), migrate=migrate)
        if migrate:
            assert mgr.migration.exact
        train(m, o, 2, s, seed=9)
        return {**m.state_dict(), **{f"opt.{i}.{k}": v for i, st in enumerate(o.state.values())
                                     for k, v in st.items()}}

    a, b = resumed(False), resumed(True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transfer_with_optimizer_from_a_torch_save_file(tmp_path, small_net):
    """A plain torch.save checkpoint: saved names inferred from the model's order (BatchNorm
    buffers left out), SGD momentum carried by name into a model whose head grew 10 -> 12."""
    opt = torch.optim.SGD(small_net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        small_net(torch.randn(2, 3, 6, 6)).sum().backward()
        opt.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": small_net.state_dict(), "optimizer": opt.state_dict(), "epoch": 2}, path)
    from conftest import SmallNet

    dst = SmallNet(classes=12)
    opt2 = torch.optim.SGD(dst.parameters(), lr=0.5, momentum=0.9)
    rep = torchkeep.transfer(dst, path, optimizer=opt2)
    o = rep.optimizer
    assert o.names_from.startswith("inferred from the model's order and shapes")
    assert o.names("carried") == ["conv.weight", "conv.bias", "bn.weight", "bn.bias"]
    assert o.names("adapted") == ["fc.weight", "fc.bias"]
    src_mom = opt.state[small_net.fc.weight]["momentum_buffer"]
    new_mom = opt2.state[dst.fc.weight]["momentum_buffer"]
    assert torch.equal(new_mom[:10], src_mom) and torch.count_nonzero(new_mom[10:]) == 0
    assert torch.equal(opt2.state[dst.conv.weight]["momentum_buffer"],
                       opt.state[small_net.conv.weight]["momentum_buffer"])
    assert opt2.param_groups[0]["lr"] == 0.1
    assert "rows: 10 copied" in o.fate("fc.weight").detail
    # reshaped='reset': the grown head starts over instead.
    dst2 = SmallNet(classes=12)
    opt3 = torch.optim.SGD(dst2.parameters(), lr=0.5, momentum=0.9)
    rep = torchkeep.transfer(dst2, path, optimizer=opt3, reshaped="reset")
    assert rep.optimizer.names("reset") == ["fc.weight", "fc.bias"]
    assert dst2.fc.weight not in opt3.state
    assert "optimizer SGD" in str(rep) and rep.to_dict()["optimizer"]["counts"]["reset"] == 2


def test_inferred_names_for_an_optimizer_over_a_subset(small_net):
    """The original run trained only the head: the saved shapes fit the model's tensors one way."""
    opt = torch.optim.Adam(small_net.fc.parameters(), lr=1e-3)
    small_net(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    ck = {"model": small_net.state_dict(), "optimizer": opt.state_dict()}
    from conftest import SmallNet

    dst = SmallNet()
    opt2 = torch.optim.Adam(dst.parameters(), lr=1e-3)
    rep = torchkeep.transfer(dst, ck, optimizer=opt2)
    assert "the optimizer held 2 of 6 parameters" in rep.optimizer.names_from
    assert rep.optimizer.names("carried") == ["fc.weight", "fc.bias"]
    assert torch.equal(opt2.state[dst.fc.weight]["exp_avg"], opt.state[small_net.fc.weight]["exp_avg"])
    # The state of a live mapping is copied, not shared with the source optimizer.
    assert opt2.state[dst.fc.weight]["exp_avg"] is not opt.state[small_net.fc.weight]["exp_avg"]

    # Two same-shaped candidates and no names: no guessing.
    twins = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    o = torch.optim.Adam(twins[1].parameters())
    twins(torch.randn(2, 4)).sum().backward()
    o.step()
    with pytest.raises(TransferError, match="more than one reading"):
        torchkeep.transfer(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                           {"model": twins.state_dict(), "optimizer": o.state_dict()},
                           optimizer=torch.optim.Adam(twins.parameters()))


def test_ema_copy_follows_the_same_plan():
    torch.manual_seed(0)
    src = LeNet5()
    ema = torch.optim.swa_utils.AveragedModel(src)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    ck = {"model": src.state_dict(), "ema": ema.state_dict()}
    dst = LeNet5Moon()
    dst_ema = torch.optim.swa_utils.AveragedModel(dst)
    rep = torchkeep.transfer(dst, ck, ema=dst_ema)
    assert rep.ema.applied and not rep.ema.missing
    assert rep.ema.loaded["module.moon.0.weight"] == "conv.0.weight"
    assert torch.equal(dst_ema.module.moon[0].weight, ema.module.conv[0].weight)
    assert torch.equal(dst.moon[0].weight, src.conv[0].weight)
    assert rep.ema.loaded["n_averaged"] == "n_averaged"


def test_migrate_optimizer_with_explicit_names_and_errors():
    a = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    o = torch.optim.Adam(a.parameters(), lr=3e-4)
    a(torch.randn(2, 3)).sum().backward()
    o.step()
    b = nn.Sequential(nn.Linear(3, 2))
    ob = torch.optim.Adam(b.parameters(), lr=1.0)
    rep = migrate_optimizer(ob, o.state_dict(), {"0.weight": "1.weight", "0.bias": "1.bias"}, model=b,
                            source_names=["0.weight", "0.bias", "1.weight", "1.bias"])
    assert rep.names("carried") == ["0.weight", "0.bias"] and ob.param_groups[0]["lr"] == 3e-4
    assert torch.equal(ob.state[b[0].weight]["exp_avg_sq"], o.state[a[1].weight]["exp_avg_sq"])
    with pytest.raises(TransferError, match="holds no optimizer state"):
        torchkeep.transfer(b, {"w": torch.zeros(1)}, optimizer=ob)
    with pytest.raises(ValueError, match="reshaped="):
        migrate_optimizer(ob, o.state_dict(), model=b, source_names=["a", "b", "c", "d"], reshaped="x")
    assert Migration().reshaped == "adapt"
