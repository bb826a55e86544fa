"""CUDA checkpointing: how long a save blocks training, against torch.save and DCP (one GPU).

    python benchmarks/bench_cuda.py --size-mb 4096 --repeat 5

Exits with a message, doing nothing, where CUDA is not available. The state is a transformer-like
model and its Adam state on the GPU (about --size-mb MiB in all); one optimizer step changes every
tensor between saves, as in training. Measured, medians of --repeat runs:

- the physical limit: every tensor copied with ``tensor.to("cpu", non_blocking=True)`` into
  pinned memory (torch's pinned allocator, warmed), then synchronized; and one flat pinned copy
  of the same bytes;
- staging alone (:class:`torchkeep.keep.staging.Stager`): its bandwidth as a fraction of that limit;
- CheckpointManager async save: the time ``save()`` blocks (capture, staging; the previous write
  has finished), against torch.save of the state dicts and ``dcp.async_save`` with pinned
  staging (DefaultStager, staging before it returns: the state may change right after);
- restore onto the GPU against torch.load(map_location="cuda") + load_state_dict.

Targets (issue 18): blocking <= 1.2x the pinned device-to-host copy of the same bytes, and <= the
DCP async blocking time.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_manager import LAYER_BYTES, H, Model  # noqa: E402
from common import drop, parser, report, tmpdir  # noqa: E402

from torchkeep import CheckpointManager, TrainState  # noqa: E402
from torchkeep.keep.staging import Stager  # noqa: E402

med = statistics.median


def build(model_mb: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = max(1, int(model_mb * 2**20 * 0.9 // LAYER_BYTES))
    vocab = max(1, int(model_mb * 2**20 * 0.1 // (H * 4)))
    with torch.device("cuda"):
        model = Model(layers, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return model, opt


def gpu_tensors(model, opt) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for s in opt.state.values():
        out += [v for v in s.values() if isinstance(v, torch.Tensor) and v.is_cuda]
    return out


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def d2h_limit(tensors: list[torch.Tensor], R: int) -> tuple[float, float]:
    """Seconds to copy ``tensors`` to pinned host memory: per tensor with .to(non_blocking) (the
    pinned allocator warmed by a first round), and as one flat copy of the same bytes."""
    def per_tensor():
        outs = [t.to("cpu", non_blocking=True) for t in tensors]
        torch.cuda.synchronize()
        return outs
    per_tensor()
    t_each = [timed(per_tensor) for _ in range(R)]
    total = sum(t.nbytes for t in tensors)
    src = torch.empty(total, dtype=torch.uint8, device="cuda")
    dst = torch.empty(total, dtype=torch.uint8, pin_memory=True)

    def flat():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    flat()
    t_flat = [timed(flat) for _ in range(R)]
    del src, dst
    if hasattr(torch._C, "_host_emptyCache"):   # hand the allocator's pinned blocks back
        torch._C._host_emptyCache()
    return med(t_each), med(t_flat)


def dcp_blocking(sd: dict, d: str, opt, R: int) -> float:
    """dcp.async_save with pinned staging that completes before it returns, reused stager."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: meant

    stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                          use_async_staging=False, use_non_blocking_copy=True))
    times = []
    for i in range(R + 1):
        opt.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=os.path.join(d, f"dcp-{i % 2}"),
                             async_stager=stager, no_dist=True)
        t = time.perf_counter() - t0
        getattr(fut, "upload_completion", fut).result()
        if i:
            times.append(t)  # the first also allocates the staging buffers
    getattr(stager, "close", lambda: None)()
    return med(times)


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(size_mb=4096, repeat=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: skipped, CUDA is not available on this machine (torch "
              f"{torch.__version__}); run it where a GPU is")
        return 0
    R, d = args.repeat, tmpdir(args)
    model, opt = build(args.size_mb // 3)
    tensors = gpu_tensors(model, opt)
    size = sum(t.nbytes for t in tensors)
    print(f"state: {size / 2**30:.2f} GiB on {torch.cuda.get_device_name()} in {len(tensors)} "
          f"tensors (model + Adam)", flush=True)
    t_each, t_flat = d2h_limit(tensors, R)

    stager = Stager()
    stager.stage({str(i): t for i, t in enumerate(tensors)})
    t_stage = med(timed(lambda: stager.stage({str(i): t for i, t in enumerate(tensors)}))
                  for _ in range(R))
    stager.release()

    state = TrainState(model=model, optimizer=opt)
    mgr = CheckpointManager(os.path.join(d, "tk"), keep_last=1, async_save=True)
    t_async = []
    for _ in range(R + 1):
        opt.step()
        state.step += 1
        t_async.append(timed(lambda: mgr.save(state)))
        mgr.wait()
    mgr.close()
    first, t_async = t_async[0], t_async[1:]   # the first save also pins the buffers

    pt = os.path.join(d, "state.pt")
    t_save = med(timed(lambda: torch.save({"model": model.state_dict(),
                                           "optimizer": opt.state_dict()}, pt)) for _ in range(R))
    # DCP gets the same tensors, the optimizer's flattened by name (no int keys or pickled groups)
    moments = {f"{i}.{k}": v for i, s in enumerate(opt.state.values()) for k, v in s.items()
               if isinstance(v, torch.Tensor)}
    t_dcp = dcp_blocking({"model": model.state_dict(), "optimizer": moments}, d, opt, R)

    reader = CheckpointManager(os.path.join(d, "tk"))
    t_restore = med(timed(lambda: (reader.restore(state), torch.cuda.synchronize())) for _ in range(R))

    def torch_restore():
        sd = torch.load(pt, map_location="cuda", weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
        torch.cuda.synchronize()
    t_load = med(timed(torch_restore) for _ in range(R))

    rows = [
        ("async save: blocking vs pinned D2H (.to non_blocking)", med(t_async), t_each, "<= 1.20"),
        ("async save: blocking vs dcp.async_save (pinned staging)", med(t_async), t_dcp, "<= 1.00"),
        ("async save: blocking vs torch.save", med(t_async), t_save, "(info)"),
        ("async save: first save (pins the buffers) vs torch.save", first, t_save, "(info)"),
        ("staging alone vs pinned D2H (.to non_blocking)", t_stage, t_each, "(info)"),
        ("pinned D2H one flat copy vs per tensor", t_flat, t_each, "(info)"),
        ("restore onto the GPU vs torch.load(cuda) + load_state_dict", t_restore, t_load, "(info)"),
    ]
    report(f"CUDA, {size / 2**30:.2f} GiB state (median of {R})", rows)
    gib = size / 2**30
    print(f"staging bandwidth {gib / t_stage:.1f} GiB/s = {t_each / t_stage:.2f} of the pinned "
          f".to(non_blocking) copy ({gib / t_each:.1f} GiB/s; one flat copy {gib / t_flat:.1f} GiB/s)")
    drop(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
