#!/usr/bin/env python
"""Hundreds of storage faults against a CheckpointManager folder: a flipped byte or a deleted file
anywhere, a file that cannot be read (EACCES), and crash images (every durable state POSIX allows
after a power cut at a random moment of a recorded run). After each fault the folder must still
restore its newest surviving checkpoint bit-exact, lose at most one kept checkpoint, and
``verify`` must report every flipped byte and deleted file (no silent damage).

    python scripts/fault_stress.py --trials 300              # about 300 faults
    python scripts/fault_stress.py --trials 50 --seed 7      # replay a seed

Prints a summary; exits 1 on any failure (with the seed and trial to replay it).
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "src")]

import crashsim  # noqa: E402
import test_faults as tf  # noqa: E402
from torchkeep import CheckpointManager  # noqa: E402
from torchkeep.store.backends import LocalStorage  # noqa: E402

KINDS = ["flip", "delete", "eacces", "crash"]


def base_run(d: str, rng: random.Random) -> tuple[list, dict, dict, int]:
    """A recorded run: (storage ops, {kept step: model state}, {every saved step: model
    state}, keep_last)."""
    keep_last = rng.randrange(1, 4)
    st = tf.make_state(seed=rng.randrange(1000))
    mgr = CheckpointManager(d, keep_last=keep_last, async_save=False)
    rec = crashsim.RecordingStorage()
    crashsim.install(mgr, rec)
    saved = {}
    for _ in range(rng.randrange(2, 6)):
        tf.train_step(st)
        saved[st.step] = tf.model_copy(st)
        mgr.save(st)
        rec.mark(st.step)
    mgr.close()
    kept = {i.step for i in CheckpointManager(d).list()}
    return rec.ops, {s: v for s, v in saved.items() if s in kept}, saved, keep_last


def check_folder(d: str, saved: dict, expect_report: bool) -> str | None:
    ok = tf.restorable(d, saved)
    if len(ok) < len(saved) - 1:
        return f"lost {sorted(set(saved) - set(ok))} of {sorted(saved)}"
    if ok:
        try:
            got, tree = tf.load_good(d)
        except Exception as e:  # noqa: BLE001 - a failure to report
            return f"load failed although steps {ok} are restorable: {e}"
        if got != max(ok) or not tf.same(tree, saved[got]):
            return f"newest load gave step {got}, restorable were {ok}"
    if expect_report and all(i.status == "ok" for i in CheckpointManager(d).verify()):
        return "verify reported nothing"
    return None


def fault_on_file(kind: str, src: str, d: str, saved: dict, rng: random.Random) -> str | None:
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    files = tf.files_of(d)
    p = rng.choice(files)
    where = os.path.relpath(p, d)
    if kind == "flip":
        size = os.path.getsize(p)
        tf.flip(p, rng.randrange(size) if size else 0)
        problem = check_folder(d, saved, expect_report=True)
    elif kind == "delete":
        os.unlink(p)
        # the newest checkpoint without commit.copy.json is also what a crash between its two
        # commit writes leaves: not damage (the writer's next start rewrites the copy)
        newest = os.path.join(tf.native.step_dirname(max(saved)), "commit.copy.json")
        problem = check_folder(d, saved, expect_report=where != newest)
    else:
        problem = _eacces(p, d, saved)
    return None if problem is None else f"{kind} {where}: {problem}"


def _eacces(path: str, d: str, saved: dict) -> str | None:
    import torchkeep.read.formats.nativeblobs as nb

    def deny(p: str) -> None:
        if os.path.abspath(p) == path:
            raise PermissionError(13, "Permission denied", p)
    real_open, real_read = LocalStorage.open_read, LocalStorage.read_bytes
    LocalStorage.open_read = lambda self, p: (deny(p), real_open(self, p))[1]  # type: ignore
    LocalStorage.read_bytes = lambda self, p: (deny(p), real_read(self, p))[1]  # type: ignore
    nb.open = lambda p, *a: (deny(p), open(p, *a))[1]  # type: ignore[attr-defined]
    try:
        return check_folder(d, saved, expect_report=False)
    finally:
        LocalStorage.open_read, LocalStorage.read_bytes = real_open, real_read  # type: ignore
        del nb.open


def crash(ops: list, src: str, work: str, rng: random.Random, saved_all: dict) -> str | None:
    k = rng.randrange(len(ops) + 1)
    fs = list(crashsim.images(ops, k, os.path.dirname(src), rng, randoms=1))
    image = rng.choice(fs)
    img = os.path.join(work, "image")
    crashsim.materialize(image, src, img)
    done = [op[2] for op in ops[:k] if op[0] == "mark"]
    mgr = CheckpointManager(img, async_save=False)
    bad = [(i.step, i.problems) for i in mgr.verify() if i.status == "damaged"
           and not all("crash came between the two commit writes" in p for p in i.problems)]
    if bad:
        return f"crash after op {k}: damaged {bad}"
    got = mgr.load()
    if done and got is None:
        return f"crash after op {k}: nothing to restore although step {done[-1]} was saved"
    if got is not None and not tf.same(got[1], saved_all[got[0]]):
        return f"crash after op {k}: step {got[0]} restored wrong bytes"
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--per-run", type=int, default=20, help="faults per recorded run")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    logging.disable(logging.CRITICAL)   # the fallbacks' warnings are expected by the thousand
    counts: collections.Counter = collections.Counter()
    failures = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="torchkeep-faults-") as tmp:
        trial = 0
        while trial < args.trials:
            rng = random.Random(seed * 1000 + trial)
            src = os.path.join(tmp, f"run-{trial}", "ckpt")
            ops, saved, saved_all, keep_last = base_run(src, rng)
            for _ in range(min(args.per_run, args.trials - trial)):
                kind = rng.choice(KINDS)
                d = os.path.join(tmp, "work", "ckpt")
                if kind == "crash":
                    problem = crash(ops, src, os.path.join(tmp, "work"), rng, saved_all)
                else:
                    problem = fault_on_file(kind, src, d, saved, rng)
                counts[kind] += 1
                if problem:
                    failures.append(f"seed {seed} trial {trial} (keep_last={keep_last}): {problem}")
                trial += 1
            shutil.rmtree(os.path.join(tmp, f"run-{trial - 1}"), ignore_errors=True)
            print(f"{trial:4d} faults, {len(failures)} failures, {time.time() - t0:.0f} s", flush=True)
    print(f"\n{args.trials} faults ({', '.join(f'{k} {counts[k]}' for k in KINDS)}), "
          f"{time.time() - t0:.0f} s, seed {seed}")
    for f in failures[:20]:
        print("FAIL", f)
    print("every fault left the newest surviving checkpoint restorable, lost at most one, "
          "and was reported" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
