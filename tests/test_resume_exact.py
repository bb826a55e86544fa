"""Exact resume under SIGKILL: a run that is killed at random moments (between steps, in the
middle of a file write, right after a commit, during rotation, on a timer) and restarted until
it finishes ends bit-identical to a run that was never interrupted: parameters, buffers,
optimizer state, scheduler and RNG. ``scripts/kill_stress.py`` runs hundreds of such kill points.

The runs are forked children of the test process (torch already imported: a restart costs
milliseconds); the checkpoints they leave are all they share.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest
import resume_worker as rw
import torch

from torchkeep import CheckpointManager

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

SEED = int(os.environ.get("TORCHKEEP_KILL_SEED", time.time_ns() % 100_000))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in a child too, so both see the same process state)."""
    d = tmp_path_factory.mktemp("reference")
    cfg = rw.Config()
    rw.build(cfg)  # import what the optimizer imports on first use, once, before forking
    out = str(d / "final.pt")
    assert rw.run_killed(str(d / "ckpt"), out, cfg, rw.Kill()) == 0
    return torch.load(out)


def kill_plan(rng: random.Random, cfg: rw.Config) -> list[rw.Kill]:
    """One kill of each kind, each early enough in its run that the run gets there."""
    return [rw.Kill("step", rng.randrange(1, cfg.steps // 3)),
            rw.Kill("timer", rng.randrange(20, 300)),
            rw.Kill("write", rng.randrange(1, 7)),               # a blob, the pack or a manifest
            rw.Kill("commit", rng.randrange(1, 3)),
            rw.Kill(rng.choice(["rmtree", "blobdel"]), 1)]


def run_until_done(directory: str, out: str, cfg: rw.Config, plan: list[rw.Kill]) -> list[str]:
    """Run with each kill of ``plan`` in turn, then without: how each run ended."""
    log = []
    for kill in plan + [rw.Kill()]:
        status = rw.run_killed(directory, out, cfg, kill)
        log.append(f"{kill.what}:{kill.n}->{status}")
        assert status in (0, -signal.SIGKILL), f"run crashed ({log}, seed {SEED})"
        # Whatever the moment of death, every committed checkpoint is whole.
        infos = CheckpointManager(directory).verify()
        damaged = [(i.step, i.problems) for i in infos if i.status == "damaged"]
        assert not damaged, f"{log} seed {SEED}: {damaged}"
        if status == 0 and kill.what != "none":
            continue  # the kill point was not reached; the next run starts from a finished run
    assert os.path.exists(out)
    return log


def test_sigkill_at_random_moments_resumes_bit_identical(tmp_path, reference):
    cfg = rw.Config()
    plan = kill_plan(random.Random(SEED), cfg)
    out = str(tmp_path / "final.pt")
    log = run_until_done(str(tmp_path / "ckpt"), out, cfg, plan)
    got = torch.load(out)
    assert sum(s.endswith("->-9") for s in log) >= 3, log
    diff = rw.same(reference, got)
    assert not diff, f"differs after {log} (seed {SEED}): {diff[:5]}"


def test_workers_and_sync_saves_resume_bit_identical(tmp_path, reference):
    """num_workers=2 and synchronous saves: the same bits (the order does not depend on workers)."""
    cfg = rw.Config(workers=2, async_save=False)
    rng = random.Random(SEED + 1)
    plan = [rw.Kill("step", rng.randrange(2, cfg.steps)), rw.Kill("write", rng.randrange(1, 12))]
    out = str(tmp_path / "final.pt")
    log = run_until_done(str(tmp_path / "ckpt"), out, cfg, plan)
    diff = rw.same(reference, torch.load(out))
    assert not diff, f"differs after {log} (seed {SEED}): {diff[:5]}"


def test_resumed_epoch_trains_on_exactly_the_remaining_samples(tmp_path):
    """In one process: the samples after a restore are the ones the interrupted epoch had left,
    each once; with workers, too."""
    cfg = rw.Config(workers=2, steps=16, every=5)
    full = rw.train(str(tmp_path / "full"), str(tmp_path / "full.pt"), cfg)
    d = str(tmp_path / "part")
    part = rw.train(d, str(tmp_path / "part.pt"), cfg, stop_after=5)   # mid-epoch (11 per epoch)
    rest = rw.train(d, str(tmp_path / "rest.pt"), cfg)
    assert len(part) == 5 * cfg.batch and part + rest == full
    assert not rw.same(torch.load(str(tmp_path / "full.pt")), torch.load(str(tmp_path / "rest.pt")))
