"""CheckpointManager vs torch.save / torch.load, side by side in one run (paired ratios).

    python benchmarks/bench_manager.py --size-mb 1024 --repeat 5

The state is a transformer-like model and its Adam state (about --size-mb MiB in all). Between
saves one optimizer step changes every tensor, as in training. Each measurement alternates ours
and the baseline (so both see the same machine load) and reports the median and the range of the
per-pair ratios. Targets (issue 13):

- async save: time the training thread is blocked (snapshot into reused staging buffers; the
  previous write has finished) <= 0.1x torch.save of the same state;
- sync save (xxh3-128 names, xxh3-64 checksums, writing, fsync of every file and folder, two
  sealed commit records; the files of the checkpoint rotation drops are deleted in the
  background after the commit) <= 1.0x torch.save + fsync;
- restore (read, xxh3-verify, load into model and optimizer) <= 1.1x torch.load +
  load_state_dict of the equivalent torch.save file;
- fine-tuning with 90% of the bytes frozen: a checkpoint after the first writes <= 15% of the
  bytes and takes <= 20% of the time of a full checkpoint of the same state (both synchronous).
  The save that first shares the frozen blobs also writes their second copies (once per run;
  shown apart), and the first reuse in a process reads them back once.

The first async save also allocates the staging buffers; it is shown apart. Every timed save
(ours and the baseline) starts after ``os.sync()``, so that neither pays for the other's
deletions still being journaled.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop, parser, tmpdir  # noqa: E402

from torchkeep import CheckpointManager, TrainState
from torchkeep.store.files import fsync_path

H = 1024
LAYER_BYTES = 12 * H * H * 4 + 13 * H * 4


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(H, H) for _ in range(4))
        self.up, self.down = torch.nn.Linear(H, 4 * H), torch.nn.Linear(4 * H, H)
        self.ln1, self.ln2 = torch.nn.LayerNorm(H), torch.nn.LayerNorm(H)


class Model(torch.nn.Module):
    def __init__(self, layers: int, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, H)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(layers))


def build(model_mb: int, trainable: str = "all") -> tuple[Model, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = max(1, int(model_mb * 2**20 * 0.9 // LAYER_BYTES))
    vocab = max(1, int(model_mb * 2**20 * 0.1 // (H * 4)))
    with torch.device("cpu"):
        model = Model(layers, vocab)
    if trainable == "last-mlp":
        model.requires_grad_(False)
        last = model.blocks[-1]
        for m in (last.up, last.down):
            m.weight.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return model, opt


def step(opt: torch.optim.Optimizer) -> None:
    """One optimizer step: every trainable tensor and its Adam state change."""
    opt.step()


def nbytes(model, opt) -> int:
    n = sum(t.nbytes for t in model.state_dict().values())
    for s in opt.state.values():
        n += sum(v.nbytes for v in s.values() if isinstance(v, torch.Tensor))
    return n


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ratios(pairs: list[tuple[float, float]]) -> tuple[float, float, float, float, float]:
    """(median ours, median baseline, median ratio, min ratio, max ratio) of paired timings."""
    r = [o / b for o, b in pairs]
    med = statistics.median
    return med([o for o, _ in pairs]), med([b for _, b in pairs]), med(r), min(r), max(r)


def show(title: str, rows: list[tuple[str, list[tuple[float, float]], str]]) -> None:
    print(f"\n## {title}")
    print(f"{'measure':52} {'ours':>9} {'baseline':>9} {'ratio':>7} {'range':>13}  target")
    for what, pairs, target in rows:
        o, b, r, lo, hi = ratios(pairs)
        print(f"{what:52} {o * 1e3:8.1f}ms {b * 1e3:8.1f}ms {r:7.3f} {lo:6.3f}-{hi:<6.3f}  {target}",
              flush=True)


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(size_mb=1024, repeat=5)
    args = p.parse_args()
    d = tmpdir(args)
    R = args.repeat

    # ------------------------------------------------------------------ a full training state
    model, opt = build(args.size_mb // 3)
    size = nbytes(model, opt)
    print(f"state: {size / 2**20:.0f} MiB in {len(model.state_dict())} model tensors + Adam state",
          flush=True)
    pt = os.path.join(d, "state.pt")
    state = TrainState(model=model, optimizer=opt)

    def torch_save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, pt)

    mgr = CheckpointManager(os.path.join(d, "async"), keep_last=2, async_save=True)
    asyncs, first = [], None
    for i in range(R + 1):
        step(opt)
        state.step += 1
        t = timed(lambda: mgr.save(state))
        mgr.wait()
        base = timed(torch_save)
        if i == 0:
            first = (t, base)
        else:
            asyncs.append((t, base))
    mgr.close()

    mgr = CheckpointManager(os.path.join(d, "sync"), keep_last=2, async_save=False)
    syncs = []
    for _ in range(R):
        step(opt)
        state.step += 1
        os.sync()   # both start on a settled file system (see the fine-tuning pairs below)
        base = timed(torch_save) + timed(lambda: fsync_path(pt))
        os.sync()
        syncs.append((timed(lambda: mgr.save(state)), base))
        mgr.wait()  # the rotated checkpoint's files are deleted in the background
    mgr.close()

    def load_apply():
        sd = torch.load(pt, weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
    reader = CheckpointManager(os.path.join(d, "sync"))
    restores, restores_nv, bare = [], [], []
    for _ in range(R):
        base = timed(load_apply)
        restores.append((timed(lambda: reader.restore(state)), base))
        restores_nv.append((timed(lambda: reader.restore(state, verify=False)), base))
        bare.append((restores[-1][0], timed(lambda: torch.load(pt, weights_only=True))))
    show(f"CheckpointManager, {args.size_mb} MiB state ({R} pairs; median, range of ratios)", [
        ("async save: blocking time / torch.save", asyncs, "<= 0.10"),
        ("async save: first save (allocates staging) / torch.save", [first], "(info)"),
        ("sync save / (torch.save + fsync)", syncs, "<= 1.00"),
        ("restore (verified) / (torch.load + load_state_dict)", restores, "<= 1.10"),
        ("restore(verify=False) / (torch.load + load_state_dict)", restores_nv, "(info)"),
        ("restore (verified) / torch.load alone", bare, "(info)"),
    ])
    del model, opt, state
    drop(pt)

    # ------------------------------------------------------------------ 90% frozen fine-tuning
    model, opt = build(int(args.size_mb * 28 / 30), trainable="last-mlp")
    size = nbytes(model, opt)
    frozen = sum(p.nbytes for p in model.parameters() if not p.requires_grad)
    print(f"\nfine-tuning state: {size / 2**20:.0f} MiB, {100 * frozen / size:.1f}% frozen", flush=True)
    state = TrainState(model=model, optimizer=opt)
    ft = CheckpointManager(os.path.join(d, "ft"), keep_last=2, async_save=False)
    step(opt)
    ft.save(state, step=0)                      # the run's first checkpoint: writes everything
    step(opt)
    t_share = timed(lambda: ft.save(state, step=1))   # first sharing: writes the second copies
    w_share = ft.latest().written
    times, written = [], []
    for i in range(R):
        # Each timed save starts on a settled file system: the deletions before it (the full
        # folder of the last pair, the files rotation dropped) are synced first, for both sides.
        os.sync()
        full = CheckpointManager(os.path.join(d, f"full-{i}"), keep_last=1, async_save=False)
        t_full = timed(lambda: full.save(state, step=0))
        w_full = full.latest().written
        full.close()
        drop(os.path.join(d, f"full-{i}"))
        step(opt)
        os.sync()
        times.append((timed(lambda: ft.save(state, step=i + 2)), t_full))
        written.append((ft.latest().written, w_full))
        ft.wait()   # the rotated checkpoint's files are deleted in the background
    ft.close()
    show("90% frozen fine-tuning (sync saves; full = the same state into an empty folder)", [
        ("save after the first / full checkpoint: time", times, "<= 0.20"),
        ("first sharing save (writes copies) / full: time", [(t_share, times[0][1])], "(info, once)"),
    ])
    o, b, r, lo, hi = ratios(written)
    print(f"{'save after the first / full checkpoint: bytes':52} {o / 2**20:7.1f}MiB {b / 2**20:7.1f}MiB "
          f"{r:7.3f} {lo:6.3f}-{hi:<6.3f}  <= 0.15")
    print(f"{'first sharing save (writes copies) / full: bytes':52} {w_share / 2**20:7.1f}MiB "
          f"{b / 2**20:7.1f}MiB {w_share / b:7.3f}                (info, once)")
    drop(d)


if __name__ == "__main__":
    main()
