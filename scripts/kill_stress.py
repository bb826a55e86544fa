#!/usr/bin/env python
"""Hundreds of SIGKILLs: train, die at a random moment, restart, die again..., finish, and check
that every run ends bit-identical to one that was never interrupted.

    python scripts/kill_stress.py --trials 60 --kills 5        # about 300 kill points
    python scripts/kill_stress.py --spawn --trials 3            # fresh interpreters (slow)

Kill points: after a training step, in the middle of a file write (blob, pack, manifest, commit
record), right after a commit, while rotation deletes a folder or a blob, and on a timer (any
moment: snapshot, hashing, fsync, restore). Configurations vary: async or synchronous saves,
DataLoader workers 0 or 2, keep_last 1-3. After every kill, each committed checkpoint must
verify. Prints a summary; exits 1 on any difference or damaged checkpoint (with the seed to
replay it).
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "src")]

import resume_worker as rw  # noqa: E402
import torch  # noqa: E402

from torchkeep import CheckpointManager

KINDS = ["step", "write", "commit", "rmtree", "blobdel", "timer"]


def random_kill(rng: random.Random, cfg: rw.Config) -> rw.Kill:
    kind = rng.choice(KINDS)
    n = {"step": lambda: rng.randrange(1, cfg.steps // 2),
         "write": lambda: rng.randrange(1, 10),
         "commit": lambda: rng.randrange(1, 4),
         "rmtree": lambda: rng.randrange(1, 3),
         "blobdel": lambda: rng.randrange(1, 4),
         "timer": lambda: rng.randrange(5, 1500)}[kind]()
    return rw.Kill(kind, n)


def run_spawned(directory: str, out: str, cfg: rw.Config, kill: rw.Kill) -> int:
    cmd = [sys.executable, os.path.join(ROOT, "tests", "resume_worker.py"), "--dir", directory,
           "--out", out, "--kill", f"{kill.what}:{kill.n}", "--workers", str(cfg.workers),
           "--keep-last", str(cfg.keep_last)] + ([] if cfg.async_save else ["--sync"])
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    return subprocess.run(cmd, env=env).returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--kills", type=int, default=5, help="kill points per trial")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--spawn", action="store_true", help="fresh interpreters instead of forks")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    run = run_spawned if args.spawn else rw.run_killed
    base = rw.Config()
    rw.build(base)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="torchkeep-stress-") as tmp:
        ref_out = os.path.join(tmp, "reference.pt")
        assert run(os.path.join(tmp, "reference"), ref_out, base, rw.Kill()) == 0
        reference = torch.load(ref_out)
        landed: collections.Counter = collections.Counter()
        tried: collections.Counter = collections.Counter()
        failures = []
        for trial in range(args.trials):
            rng = random.Random(seed * 1000 + trial)
            cfg = rw.Config(async_save=rng.random() < 0.7, workers=rng.choice([0, 0, 0, 2]),
                            keep_last=rng.randrange(1, 4))
            d = os.path.join(tmp, f"trial-{trial}")
            out = os.path.join(d, "final.pt")
            log = []
            for kill in [random_kill(rng, cfg) for _ in range(args.kills)] + [rw.Kill()]:
                status = run(os.path.join(d, "ckpt"), out, cfg, kill)
                tried[kill.what] += 1
                if status == -signal.SIGKILL:
                    landed[kill.what] += 1
                log.append(f"{kill.what}:{kill.n}->{status}")
                if status not in (0, -signal.SIGKILL):
                    failures.append(f"trial {trial}: run crashed: {log}")
                    break
                bad = [(i.step, i.problems) for i in CheckpointManager(os.path.join(d, "ckpt")).verify()
                       if i.status == "damaged"]
                if bad:
                    failures.append(f"trial {trial}: damaged checkpoint after {log}: {bad}")
                    break
            else:
                diff = rw.same(reference, torch.load(out))
                if diff:
                    failures.append(f"trial {trial} ({cfg}): differs after {log}: {diff[:4]}")
            print(f"trial {trial:3d}: {' '.join(log)}", flush=True)
    total = sum(landed.values())
    print(f"\n{args.trials} trials, {total} SIGKILLs landed "
          f"({', '.join(f'{k} {landed[k]}/{tried[k]}' for k in KINDS + ['none'] if tried[k])}), "
          f"{time.time() - t0:.0f} s, seed {seed}")
    for f in failures:
        print("FAIL", f)
    print("all runs bit-identical to the uninterrupted one" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
