"""The loop that reads like the task: ``for batch in state.batches(max_steps=N)`` runs across
epochs up to a step budget, and ``manager.step_done(state)`` saves when the policy says so (and
at the last step). A run written this way, SIGKILLed at random moments and restarted until it
finishes, ends bit-identical to the classic epoch-and-batch loop that was never interrupted."""
from __future__ import annotations

import os
import random
import signal

import pytest
import resume_worker as rw
import torch
from conftest import forked

from torchkeep import CheckpointManager, TrainState
from torchkeep.errors import StateError


def _loader(n: int = 22, batch: int = 4, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.arange(n))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=g)


def _plain_order(epochs: int, **kw) -> list[list[int]]:
    dl = _loader(**kw)
    return [b[0].tolist() for _ in range(epochs) for b in dl]


@pytest.mark.parametrize("budget", [0, 1, 5, 6, 7, 13, 18])
def test_batches_runs_across_epochs_to_the_budget(budget):
    st = TrainState(dataloader=_loader())           # 6 batches per epoch (the last one short)
    got = [b[0].tolist() for b in st.batches(max_steps=budget)]
    assert got == _plain_order(4)[:budget]
    assert st.step == budget == st.max_steps
    # Stopping at the budget inside an epoch leaves its position; at an epoch's last batch too.
    assert (st.epoch, st.position) == ((budget - 1) // 6, (budget - 1) % 6 + 1) if budget else (0, 0)


def test_raising_the_budget_continues_where_it_stopped():
    st = TrainState(dataloader=_loader())
    first = [b[0].tolist() for b in st.batches(max_steps=8)]
    rest = [b[0].tolist() for b in st.batches(max_steps=15)]
    assert first + rest == _plain_order(3)[:15]
    assert [b for b in st.batches(max_steps=15)] == []      # budget reached: nothing more


def test_budget_on_an_empty_dataloader_is_an_error_not_a_hang():
    st = TrainState(dataloader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.arange(3)), batch_size=4, drop_last=True))
    with pytest.raises(StateError, match="no batches"):
        list(st.batches(max_steps=5))


def test_budget_names_the_main_loader_only():
    st = TrainState(dataloader={"a": _loader(), "b": _loader()})
    with pytest.raises(StateError, match="first dataloader"):
        st.batches("b", max_steps=3)
    assert len(list(st.batches("a", max_steps=3))) == 3


def test_step_done_saves_on_policy_and_at_the_last_step(tmp_path):
    model = torch.nn.Linear(2, 2)
    st = TrainState(model=model, dataloader=_loader())
    saved = []
    with CheckpointManager(tmp_path / "c", every_steps=4, keep_last=None) as mgr:
        for _ in st.batches(max_steps=10):
            if mgr.step_done(st, metrics={"s": st.step}):
                saved.append(st.step)
        assert not mgr.step_done(st)                     # the same step is never saved twice
        mgr.wait()
        assert saved == [4, 8, 10]
        assert [c.step for c in mgr.list()] == [4, 8, 10]
        assert mgr.list()[-1].metrics == {"s": 10}
    with pytest.raises(StateError, match="TrainState"):
        CheckpointManager(tmp_path / "d").step_done({"model": model})


def test_step_done_after_restore_continues_the_schedule(tmp_path):
    st = TrainState(model=torch.nn.Linear(2, 2), dataloader=_loader())
    with CheckpointManager(tmp_path, every_steps=3, keep_last=None, async_save=False) as mgr:
        for _ in st.batches(max_steps=7):
            mgr.step_done(st)
    st2 = TrainState(model=torch.nn.Linear(2, 2), dataloader=_loader())
    with CheckpointManager(tmp_path, every_steps=3, keep_last=None, async_save=False) as mgr:
        assert mgr.restore(st2) == 7
        for _ in st2.batches(max_steps=12):
            mgr.step_done(st2)
        assert [c.step for c in mgr.list()] == [3, 6, 7, 9, 12]


# -- exact resume under SIGKILL with the one-`for` loop ------------------------------------------

def one_for_train(directory: str, out: str, cfg: rw.Config, kill: rw.Kill) -> None:
    """resume_worker's job written as the README loop: one ``for``, one ``step_done``."""
    torch.set_num_threads(1)
    rw._install(kill)
    state = rw.build(cfg)
    model, opt, sched = state.model, state.optimizer, state.scheduler
    done = 0
    with CheckpointManager(directory, keep_last=cfg.keep_last, every_steps=cfg.every,
                           async_save=cfg.async_save) as mgr:
        mgr.restore(state)
        model.train()
        for x, y, idx in state.batches(max_steps=cfg.steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            state.extras["seen"] += len(idx)
            done += 1
            if kill.what == "step" and done == kill.n:
                rw._die()
            mgr.step_done(state, metrics={"loss": loss.item()})
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                "step": state.step, "seen": state.extras["seen"]}, out)




def _classic_reference(cfg: rw.Config, d: str) -> dict:
    out = os.path.join(d, "classic.pt")
    assert forked(rw.train, os.path.join(d, "classic"), out, cfg) == 0
    ref = torch.load(out)
    ref.pop("epoch")
    return ref


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_one_for_loop_killed_and_resumed_is_bit_identical_to_the_classic_loop(tmp_path):
    cfg = rw.Config()
    rw.build(cfg)  # import what the optimizer imports on first use, before forking
    ref = _classic_reference(cfg, str(tmp_path))
    rng = random.Random(os.environ.get("TORCHKEEP_KILL_SEED", 7))
    plan = [rw.Kill("step", rng.randrange(2, cfg.steps // 2)), rw.Kill("write", rng.randrange(1, 6)),
            rw.Kill("commit", 1), rw.Kill()]
    d, out, log = str(tmp_path / "ckpt"), str(tmp_path / "final.pt"), []
    for kill in plan:
        status = forked(one_for_train, d, out, cfg, kill)
        log.append(f"{kill.what}:{kill.n}->{status}")
        assert status in (0, -signal.SIGKILL), log
    assert sum(s.endswith("->-9") for s in log) >= 2, log
    got = torch.load(out)
    got.pop("epoch", None)
    assert not rw.same(ref, got), (log, rw.same(ref, got)[:5])
    steps = [c.step for c in CheckpointManager(d).list()]
    assert steps[-1] == cfg.steps and len(steps) <= cfg.keep_last
