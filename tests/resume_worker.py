"""A small training job for the exact-resume tests and ``scripts/kill_stress.py``.

``train()`` trains a model with dropout and BatchNorm, Adam, a OneCycle LR schedule and a shuffled
DataLoader, checkpointing with a CheckpointManager and resuming from it; a :class:`Kill` plan makes
the process SIGKILL itself at one chosen moment (after a training step, in the middle of a file
write, right after a commit, during rotation). ``run_killed()`` runs it in a forked child (torch
is already imported, so a restart costs milliseconds instead of an interpreter start-up) and
returns how the child ended.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch

from torchkeep import CheckpointManager, TrainState
from torchkeep.read.formats import native
from torchkeep.store import backends as store
from torchkeep.store import blobs


@dataclass(frozen=True)
class Kill:
    """Where the process kills itself: ``what`` is 'step' (after its ``n``-th training step), 'write'
    (inside the n-th file write, after its first chunk), 'commit' (right after the n-th commit
    record), 'rmtree' (the n-th folder deletion, after its commit record is gone), 'blobdel'
    (the n-th blob deletion) or 'timer' (after ``n`` milliseconds)."""

    what: str = "none"
    n: int = 0


@dataclass(frozen=True)
class Config:
    steps: int = 36
    every: int = 4
    batch: int = 8
    samples: int = 88          # 11 batches per epoch: saves fall at every position in the epoch
    hidden: int = 256          # 64x256 float32 weights: 64 KiB, stored as deduplicated blobs
    workers: int = 0
    async_save: bool = True
    keep_last: int = 2
    seed: int = 1234
    device: str = "cpu"        # 'cuda': deterministic kernels, set up by deterministic_cuda()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(kill: Kill) -> None:
    if kill.what == "timer":
        threading.Timer(kill.n / 1000, _die).start()
        return
    count = {"n": 0}

    def hit() -> bool:
        count["n"] += 1
        return count["n"] == kill.n

    if kill.what == "write":
        orig = store.LocalStorage.write_file

        def write_file(self, path, chunks, **kw):
            if not hit():
                return orig(self, path, chunks, **kw)

            def dying():
                for c in chunks:
                    yield c
                    _die()
            return orig(self, path, dying(), **kw)
        store.LocalStorage.write_file = write_file
    elif kill.what == "commit":
        orig_commit = native.commit

        def commit(*a, **kw):
            orig_commit(*a, **kw)
            if hit():
                _die()
        native.commit = commit
    elif kill.what == "rmtree":
        orig_rmtree = store.LocalStorage.rmtree

        def rmtree(self, path):
            if hit():
                _die()
            return orig_rmtree(self, path)
        store.LocalStorage.rmtree = rmtree
    elif kill.what == "blobdel":
        orig_delete = blobs.BlobStore.delete

        def delete(self, digest):
            if hit():
                _die()
            return orig_delete(self, digest)
        blobs.BlobStore.delete = delete


class Net(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(64, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)
        self.drop = torch.nn.Dropout(0.2)
        self.out = torch.nn.Linear(hidden, 4)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.bn(self.inp(x)))))


class Samples(torch.utils.data.Dataset):
    """Fixed random samples; each item also returns its index so tests can see the order."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(99)
        self.x = torch.randn(n, 64, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def build(cfg: Config) -> TrainState:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = Net(cfg.hidden).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=cfg.steps + 1)
    loader = torch.utils.data.DataLoader(Samples(cfg.samples), batch_size=cfg.batch, shuffle=True,
                                         num_workers=cfg.workers)
    return TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader,
                      extras={"seen": 0})


def deterministic_cuda() -> None:
    """Bit-reproducible CUDA kernels: cuBLAS's fixed workspace (set before CUDA starts) and
    deterministic algorithms only (an op without one raises instead of drifting)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def train(directory: str, out: str, cfg: Config = Config(), kill: Kill = Kill(),
          stop_after: int = 0) -> list[int]:
    """Train to ``cfg.steps`` (resuming from ``directory``), save the final state to ``out``
    with torch.save; returns the sample indices this process trained on. ``stop_after`` ends
    the process's work early (after that step and its save), like a job that ran out of time."""
    if cfg.device.startswith("cuda"):
        deterministic_cuda()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(directory, out, cfg, kill, stop_after)
    finally:
        torch.set_num_threads(threads)


def _train(directory: str, out: str, cfg: Config, kill: Kill, stop_after: int) -> list[int]:
    _install(kill)
    state = build(cfg)
    model, opt, sched = state.model, state.optimizer, state.scheduler
    seen: list[int] = []
    with CheckpointManager(directory, keep_last=cfg.keep_last, every_steps=cfg.every,
                           async_save=cfg.async_save) as mgr:
        mgr.restore(state)
        model.train()
        while state.step < cfg.steps and not (stop_after and state.step >= stop_after):
            for x, y, idx in state.batches():
                x, y = x.to(cfg.device), y.to(cfg.device)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen.extend(idx.tolist())
                state.extras["seen"] += len(idx)
                if kill.what == "step" and len(seen) == kill.n * cfg.batch:
                    _die()
                if mgr.should_save(state.step):
                    mgr.save(state, metrics={"loss": loss.item()})
                if state.step >= cfg.steps or (stop_after and state.step >= stop_after):
                    break
    final = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "step": state.step, "epoch": state.epoch, "seen": state.extras["seen"]}
    if cfg.device.startswith("cuda"):
        final["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(final, out)
    return seen


def run_killed(directory: str, out: str, cfg: Config, kill: Kill) -> int:
    """Run :func:`train` in a forked child; its wait status as a signal number (negative) or
    exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            train(directory, out, cfg, kill)
            code = 0
        except BaseException:  # noqa: BLE001 - report and exit with a failure code
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def same(a, b, path: str = "") -> list[str]:
    """Paths where two nested results differ (tensors compared bit for bit, dtype included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
              and a.shape == b.shape and torch.equal(_bits(a), _bits(b)))
        return [] if ok else [path or "<root>"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat


def main(argv: list[str] | None = None) -> int:
    """``python tests/resume_worker.py --dir D --out O [--kill what:n] ...``: one run in a fresh
    interpreter (what ``scripts/kill_stress.py --spawn`` starts)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kill", default="none:0")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--sync", action="store_true")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (a fresh interpreter: no fork)")
    a = p.parse_args(argv)
    what, _, n = a.kill.partition(":")
    cfg = Config(workers=a.workers, async_save=not a.sync, keep_last=a.keep_last, device=a.device)
    train(a.dir, a.out, cfg, Kill(what, int(n or 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
