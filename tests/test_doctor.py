"""The resume doctor: each mistake a resumed run can make is caused on purpose and named in words
(right after the restore or at the first batch, in the log, in the next checkpoint and by
``torchkeep doctor DIR``); a correct resume yields no finding at all."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchkeep import CheckpointManager, TrainState
from torchkeep.keep.doctor import live as doctor
from torchkeep.keep.doctor.fingerprint import _digest
from torchkeep.keep.doctor.folder import diagnose_folder
from torchkeep.keep.doctor.live import diagnose, fmt

SAVE_AT = 13  # epoch 1, batch 3 of 10


class Indexed(Dataset):
    """Sample i is (features, label, i): the batches show which indices they hold."""

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(7)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Net(nn.Module):
    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        layers = [nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2)]
        if extra:
            layers += [nn.ReLU(), nn.Linear(2, 2)]
        self.fc = nn.Sequential(*layers)

    def forward(self, x):
        return self.fc(x)


def make(n: int = 40, extra: bool = False, scheduler: bool = True) -> TrainState:
    torch.manual_seed(0)
    model = Net(extra)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40) if scheduler else None
    scaler = torch.amp.GradScaler("cpu", init_scale=1024, growth_interval=2)
    dl = DataLoader(Indexed(n), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    return TrainState(model, opt, sched, scaler, dataloader=dl)


def step(state: TrainState, batch) -> None:
    x, y, _ = batch
    loss = nn.functional.cross_entropy(state.model(x), y)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad()
    if state.scheduler is not None:
        state.scheduler.step()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The original run: saves at step 13 and notes the indices of the batch that came next."""
    folder = tmp_path_factory.mktemp("doctor") / "ckpt"
    state = make()
    served = []
    with CheckpointManager(folder, async_save=False) as mgr:
        for _ in range(2):
            for batch in state.batches():
                if state.step == SAVE_AT + 1:
                    served = batch[2].tolist()
                step(state, batch)
                if state.step == SAVE_AT:
                    mgr.save(state)
    return folder, served


def resume(folder, state: TrainState, *, migrate: bool = False, strict: bool = True,
           mistake=lambda s: None) -> list:
    """Restore, make the mistake, take the first batch: every finding of the resume."""
    mgr = CheckpointManager(folder)
    assert mgr.restore(state, migrate=migrate, strict=strict) == SAVE_AT
    mistake(state)
    batch = next(iter(state.batches()))
    step(state, batch)
    return [f.message for f in doctor.findings(state)]


def test_fingerprint_is_recorded_with_the_checkpoint(original):
    folder, served = original
    from torchkeep.read.formats import native
    from torchkeep.store.backends import storage_for

    storage, root = storage_for(str(folder))
    (_, path), = native.committed_steps(storage, root)
    fp = native.read_commit(storage, path)["doctor"]
    assert (fp["step"], fp["epoch"], fp["position"]) == (SAVE_AT, 1, 3)
    assert fp["params"] == {"fc.0.weight": [8, 4], "fc.0.bias": [8], "fc.2.weight": [2, 8], "fc.2.bias": [2]}
    assert fp["optimizers"]["optimizer"]["step"] == SAVE_AT
    assert fp["scalers"]["scaler"]["scale"] == 1024 * 2 ** 6
    assert set(fp["rng"]) >= {"python", "numpy", "torch"}
    # The hash of the next batch is the hash of the indices the run really got next.
    assert fp["loaders"]["dataloader"]["next_batch"] == _digest(served)
    assert fp["loaders"]["dataloader"]["next_at"] == [1, 3]


def test_a_correct_resume_has_no_finding(original, caplog):
    folder, served = original
    state = make()
    with caplog.at_level(logging.INFO, logger="torchkeep.keep.doctor.live"):
        mgr = CheckpointManager(folder)
        mgr.restore(state)
        assert mgr.findings == [] and mgr.doctor(state) == []
        batch = next(iter(state.batches()))
    assert batch[2].tolist() == served
    assert doctor.findings(state) == []
    assert not [r for r in caplog.records if r.name == "torchkeep.keep.doctor.live"]


def test_scheduler_rebuilt(original, caplog):
    folder, _ = original
    expected = make()
    CheckpointManager(folder).restore(expected)
    lr = expected.optimizer.param_groups[0]["lr"]

    rebuilt = []

    def rebuild(state):  # the classic: the scheduler built again after the restore
        rebuilt.append(torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda s: 1.0))

    with caplog.at_level(logging.WARNING, logger="torchkeep.keep.doctor.live"):
        found = resume(folder, make(), mistake=rebuild)
    assert found == [f"the scheduler was rebuilt, not restored: LR 1e-3, expected {fmt(lr)}; a new "
                     "LambdaLR at step 0 drives the optimizer, not the restored one"]
    assert "at its first batch" in caplog.text and "rebuilt, not restored" in caplog.text
    # Left out of the state altogether (strict=False): said at once.
    state = make(scheduler=False)
    mgr = CheckpointManager(folder)
    mgr.restore(state, strict=False)
    assert [f.message for f in mgr.findings] == [
        f"the scheduler was not restored (this state has none): the checkpoint's schedule is at "
        f"step {SAVE_AT}, a rebuilt one starts over"]


def test_data_order_changed(original):
    folder, _ = original
    found = resume(folder, make(n=41))
    assert found == ["the data order differs from the original run from batch 3 of epoch 1 (the dataset "
                     "has 41 samples, the original run's 40; 11 batches per epoch, the original run had 10)"]


def test_rng_restored_at_the_wrong_moment(original):
    folder, _ = original
    found = resume(folder, make(), mistake=lambda s: torch.manual_seed(1234))
    assert len(found) == 1
    assert found[0].startswith("the torch RNG was restored at the wrong moment: at the first batch it "
                               "differs from the checkpoint's")
    # Not restored at all (a state without RNG): said right after the restore.
    state = make()
    state.capture_rng = False
    mgr = CheckpointManager(folder)
    mgr.restore(state)
    assert [f.kind for f in mgr.findings] == ["rng"] and "rng=False" in mgr.findings[0].message


def test_scaler_reset(original):
    folder, _ = original

    def reset(state):
        state.scaler = torch.amp.GradScaler("cpu", init_scale=1024, growth_interval=2)

    found = resume(folder, make(), mistake=reset)
    assert found == ["the GradScaler was reset, not restored: scale 1024, expected 65536"]


def test_parameters_gained(original):
    folder, _ = original
    state = make(extra=True)
    found = resume(folder, state, migrate=True)
    assert found == ["2 parameters gained: fc.4.weight, fc.4.bias; optimizer state fresh for them"]
    assert doctor.findings(state)[0].severity == "info"  # migrate=True asked for the change
    # Without a migration (strict=False), the same change is a problem.
    rec = {"params": {"fc.0.weight": [8, 4]}}
    (f,) = diagnose(rec, {"params": {"fc.0.weight": [8, 4], "fc.4.bias": [2]}})
    assert f.severity == "warning" and f.message == "1 parameter gained: fc.4.bias"


def test_doctor_cli_reads_the_resume_from_the_folder(original, tmp_path, cli):
    folder, _ = original
    bad, good = tmp_path / "bad", tmp_path / "good"
    shutil.copytree(folder, bad)
    shutil.copytree(folder, good)
    rebuilt = []
    for where, mistake in ((bad, lambda s: rebuilt.append(
                                torch.optim.lr_scheduler.LambdaLR(s.optimizer, lambda e: 1.0))),
                           (good, lambda s: None)):
        state = make()
        with CheckpointManager(where, async_save=False) as mgr:
            mgr.restore(state)
            mistake(state)
            for batch in state.batches():
                step(state, batch)
                if state.step == SAVE_AT + 4:
                    mgr.save(state)
                    break
    p = cli("doctor", str(bad))
    assert p.returncode == 1, p.stderr
    assert f"step {SAVE_AT + 4}: resumed from step {SAVE_AT} (checked at its first batch)" in p.stdout
    assert "the scheduler was rebuilt, not restored: LR 1e-3, expected" in p.stdout
    assert "1 problem found" in p.stdout
    rep = diagnose_folder(good)  # the same report in-process (one subprocess is enough)
    assert rep.ok and [(b.kind, b.step, b.resumed_from) for b in rep.boundaries] == [
        ("resume", SAVE_AT + 4, SAVE_AT)]
    assert rep.verdict() == "every resume continues its checkpoint exactly"
    assert rep.to_dict()["boundaries"][0]["findings"] == []


def test_diagnose_words_a_restart_and_a_rebuilt_optimizer():
    rec = {"step": 420, "epoch": 3, "position": 17, "params": {"w": [2]},
           "optimizers": {"optimizer": {"type": "AdamW", "step": 420, "lr": [4.2e-4], "initial_lr": [1e-3]}}}
    obs = {"step": 420, "epoch": 3, "position": 17, "params": {"w": [2]},
           "optimizers": {"optimizer": {"type": "AdamW", "step": None, "lr": [1e-3], "initial_lr": [1e-3]}}}
    msgs = [f.message for f in diagnose(rec, obs)]
    assert msgs == ["the optimizer state was not restored: AdamW step count 0, expected 420 (its moments "
                    "start from zero)", "the scheduler was rebuilt, not restored: LR 1e-3, expected 4.2e-4"]
    assert diagnose(rec, rec) == []
    assert (fmt(4.2e-4), fmt(0.1), fmt(65536.0)) == ("4.2e-4", "0.1", "65536")
