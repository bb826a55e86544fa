"""CheckpointManager vs torch.save / torch.load, side by side in one run (medians).

    python benchmarks/bench_manager.py --size-mb 1024 --repeat 3

The state is a transformer-like model and its Adam state (about --size-mb MiB in all). Between
saves one optimizer step changes every tensor, as in training. Targets (issue 4):

- async save: time the training thread is blocked (snapshot into reused staging buffers; the
  previous write has finished) <= 0.3x torch.save of the same state;
- sync save (hashing, writing, fsync of every file and folder, commit) <= 1.1x torch.save + fsync;
- fine-tuning with 90% of the bytes frozen: a checkpoint after a step writes <= 15% of the bytes
  and takes <= 25% of the time of a full checkpoint of the same state (both synchronous);
- restore (read, crc32-verify, load into model and optimizer) <= 1.2x torch.load of the
  equivalent torch.save file. torch.load neither checks the bytes nor loads them into the model,
  so torch.load + load_state_dict, and restore without verification, are shown too.

The first async save also allocates the staging buffers; it is shown apart.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop, parser, report, tmpdir  # noqa: E402

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


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(size_mb=1024, repeat=3)
    args = p.parse_args()
    d = tmpdir(args)
    R = args.repeat
    rows = []

    # ------------------------------------------------------------------ a full training state
    model, opt = build(args.size_mb // 3)
    size = nbytes(model, opt)
    print(f"state: {size / 2**20:.0f} MiB in {len(model.state_dict())} model tensors + Adam state",
          flush=True)
    pt = os.path.join(d, "state.pt")
    t_save, t_save_sync = [], []
    for _ in range(R):
        step(opt)
        t = timed(lambda: torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, pt))
        t_save.append(t)
        t_save_sync.append(t + timed(lambda: fsync_path(pt)))
    state = TrainState(model=model, optimizer=opt)

    mgr = CheckpointManager(os.path.join(d, "async"), keep_last=2, async_save=True)
    t_async, first = [], None
    for i in range(R + 1):
        step(opt)
        state.step += 1
        t = timed(lambda: mgr.save(state))
        mgr.wait()
        if i == 0:
            first = t
        else:
            t_async.append(t)
    mgr.close()

    mgr = CheckpointManager(os.path.join(d, "sync"), keep_last=2, async_save=False)
    t_sync = []
    for _ in range(R):
        step(opt)
        state.step += 1
        t_sync.append(timed(lambda: mgr.save(state)))
    mgr.close()

    t_load = [timed(lambda: torch.load(pt, weights_only=True)) for _ in range(R)]

    def load_apply():
        sd = torch.load(pt, weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
    t_load_apply = [timed(load_apply) for _ in range(R)]
    reader = CheckpointManager(os.path.join(d, "sync"))
    t_restore = [timed(lambda: reader.restore(state)) for _ in range(R)]
    t_restore_nv = [timed(lambda: reader.restore(state, verify=False)) for _ in range(R)]
    med = statistics.median
    rows += [
        ("async save: blocking time vs torch.save", med(t_async), med(t_save), "<= 0.30"),
        ("async save: first save (allocates staging) vs torch.save", first, med(t_save), "(info)"),
        ("sync save vs torch.save + fsync", med(t_sync), med(t_save_sync), "<= 1.10"),
        ("restore (verified, applied) vs torch.load", med(t_restore), med(t_load), "<= 1.20"),
        ("restore vs torch.load + load_state_dict", med(t_restore), med(t_load_apply), "(info)"),
        ("restore(verify=False) vs torch.load + load_state_dict", med(t_restore_nv),
         med(t_load_apply), "(info)"),
    ]
    del model, opt, state
    drop(pt)

    # ------------------------------------------------------------------ 90% frozen fine-tuning
    model, opt = build(int(args.size_mb * 28 / 30), trainable="last-mlp")
    size = nbytes(model, opt)
    frozen = sum(p.nbytes for p in model.parameters() if not p.requires_grad)
    print(f"fine-tuning state: {size / 2**20:.0f} MiB, {100 * frozen / size:.1f}% frozen", flush=True)
    state = TrainState(model=model, optimizer=opt)
    t_full, w_full, t_ft, w_ft = [], [], [], []
    for i in range(R):
        mgr = CheckpointManager(os.path.join(d, f"full-{i}"), keep_last=2, async_save=False)
        t_full.append(timed(lambda: mgr.save(state, step=0)))
        w_full.append(mgr.latest().written)
        mgr.close()
    mgr = CheckpointManager(os.path.join(d, "full-0"), keep_last=2, async_save=False)
    for i in range(R):
        step(opt)
        t_ft.append(timed(lambda: mgr.save(state, step=i + 1)))
        w_ft.append(mgr.latest().written)
    mgr.close()
    rows += [("90% frozen: save time vs a full checkpoint", med(t_ft), med(t_full), "<= 0.25")]
    report(f"CheckpointManager, {args.size_mb} MiB state (median of {R})", rows)
    ratio = med(w_ft) / med(w_full)
    print(f"{'90% frozen: bytes written vs a full checkpoint':58} {med(w_ft) / 2**20:7.1f}MiB "
          f"{med(w_full) / 2**20:7.1f}MiB {ratio:7.3f}  <= 0.15")
    drop(d)


if __name__ == "__main__":
    main()
