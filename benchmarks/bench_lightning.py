"""Lightning: TorchkeepCheckpointIO against Lightning's default TorchCheckpointIO, side by side.

    python benchmarks/bench_lightning.py --size-mb 1024 --repeat 3

A frozen backbone (--size-mb / 16 MiB, at least 8) under a small trained head, 4 epochs of 2
steps, ModelCheckpoint(save_top_k=2, save_last=True): every epoch writes a checkpoint and
rotation deletes one. Runs alternate (default plugin, then torchkeep) and the medians of the fit
time and of the disk the checkpoint folder takes are compared. torchkeep stores the backbone
once for all checkpoints (its second copy once it is shared), and fsyncs and verifies what it
writes; Lightning's default writes every checkpoint whole, without fsync.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop, parser, tmpdir  # noqa: E402

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - lightning is in the test extra
    pl = None

import torch  # noqa: E402


def _module(width: int) -> "pl.LightningModule":
    class Frozen(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Linear(width, width)
            self.backbone.requires_grad_(False)
            self.head = torch.nn.Linear(width, 2)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.head(self.backbone(x)), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.head.parameters(), 1e-3)
    return Frozen()


def _disk(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs
               if not os.path.islink(os.path.join(r, f)))


def _fit(kind: str, folder: str, width: int) -> tuple[float, int]:
    from torchkeep.integrations.lightning import TorchkeepCheckpointIO

    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, width), torch.randint(0, 2, (16,)))
    trainer = pl.Trainer(
        max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[TorchkeepCheckpointIO()] if kind == "torchkeep" else [],
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=folder, save_top_k=2, monitor="step",
                                                mode="max", save_last=True)])
    t0 = time.perf_counter()
    trainer.fit(_module(width), torch.utils.data.DataLoader(data, batch_size=8))
    return time.perf_counter() - t0, _disk(folder)


def main() -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    if pl is None:
        print("skipped: lightning is not installed (pip install lightning)")
        return
    warnings.simplefilter("ignore")
    d = tmpdir(args)
    mib = max(8, args.size_mb // 16)
    width = int((mib * 2**20 / 4) ** 0.5)
    runs: dict[str, list[tuple[float, int]]] = {"torch": [], "torchkeep": []}
    for kind in runs:                       # warm-up, not counted: imports and first calls
        _fit(kind, os.path.join(d, kind), 64)
    for _ in range(args.repeat):
        for kind in runs:
            runs[kind].append(_fit(kind, os.path.join(d, kind), width))
    med = statistics.median
    t_base, t_ours = med(t for t, _ in runs["torch"]), med(t for t, _ in runs["torchkeep"])
    b_base, b_ours = med(b for _, b in runs["torch"]), med(b for _, b in runs["torchkeep"])
    print(f"\n## Lightning, frozen {mib} MiB backbone, 4 epochs, top-2 + last "
          f"(median of {args.repeat}, alternating)")
    print(f"{'measure':40} {'torchkeep':>11} {'default':>11} {'ratio':>7}")
    print(f"{'fit time (saves included)':40} {t_ours:10.2f}s {t_base:10.2f}s {t_ours / t_base:7.3f}")
    print(f"{'checkpoint folder on disk':40} {b_ours / 2**20:8.1f}MiB {b_base / 2**20:8.1f}MiB "
          f"{b_ours / b_base:7.3f}")
    drop(d)


if __name__ == "__main__":
    main()
