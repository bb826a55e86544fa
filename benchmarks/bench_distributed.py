"""Sharded checkpoints of an FSDP2 model on 2 CPU ranks (gloo): torchkeep's CheckpointManager
against plain ``torch.distributed.checkpoint`` on the same state, in one run.

    python benchmarks/bench_distributed.py --mb 256

Prints, per rank 0: a synchronous manager save vs ``dcp.save`` of the same get_state_dict
output; the blocking part of an asynchronous manager save vs ``dcp.async_save``'s; restore vs
``dcp.load``. torchkeep adds the sha256 of every shard file (each rank hashes its share), the
manifest and commit record, and on restore the check of those sha256.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(mb: int) -> torch.nn.Module:
    width = 2048
    layers = max(1, int(mb * 2**20 // (3 * 4 * width * width)))  # params + Adam's two moments
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _rank(r: int, n: int, port: int, mb: int, root: str, reps: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torchkeep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=n,
                            timeout=timedelta(seconds=300))
    model = _model(mb)
    mesh = init_device_mesh("cpu", (n,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 2048)).sum().backward()
    opt.step()
    state = torchkeep.TrainState(model=model, optimizer=opt)
    # DCP's async_save runs its final collectives in a background thread; as its docs advise,
    # it gets a gloo group of its own so they never interleave with this process's barriers.
    dcp_async_pg = dist.new_group(backend="gloo")
    nbytes = sum(p.to_local().nbytes for p in model.parameters()) * 3 * n

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    res: dict[str, list[float]] = {}
    for i in range(reps):
        d = os.path.join(root, f"rep{i}")
        msd, osd = get_state_dict(model, opt)
        res.setdefault("dcp.save", []).append(
            timed(lambda: dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{d}/dcp")))
        sync = torchkeep.CheckpointManager(f"{d}/sync", async_save=False)
        res.setdefault("manager.save (sync)", []).append(timed(lambda: sync.save(state, step=1)))
        fut: list = []
        res.setdefault("dcp.async_save (blocking)", []).append(timed(
            lambda: fut.append(dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=f"{d}/dcpa",
                                              process_group=dcp_async_pg))))
        fut[0].result()
        asy = torchkeep.CheckpointManager(f"{d}/async", async_save=True)
        res.setdefault("manager.save (async, blocking)", []).append(timed(lambda: asy.save(state, step=1)))
        asy.wait()
        res.setdefault("dcp.load", []).append(
            timed(lambda: dcp.load({"model": msd, "optim": osd}, checkpoint_id=f"{d}/dcp")))
        res.setdefault("manager.restore", []).append(timed(lambda: sync.restore(state)))
        sync.close()
        asy.close()
        dist.barrier()
        if r == 0:
            shutil.rmtree(d, ignore_errors=True)
    if r == 0:
        print(f"FSDP2 on {n} CPU ranks (gloo), {nbytes / 2**20:.0f} MiB of model + Adam state, "
              f"median of {reps}:")
        base = {"manager.save (sync)": "dcp.save", "manager.save (async, blocking)": "dcp.async_save (blocking)",
                "manager.restore": "dcp.load"}
        for k, v in res.items():
            med = statistics.median(v)
            ratio = f"  ({med / statistics.median(res[base[k]]):.2f}x {base[k]})" if k in base else ""
            print(f"  {k:32s} {med:7.3f} s{ratio}")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", "--size-mb", dest="mb", type=int, default=256, help="model + optimizer state, MiB")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--reps", "--repeat", dest="reps", type=int, default=3)
    args = p.parse_args()
    import torch.multiprocessing as mp

    root = tempfile.mkdtemp(prefix="tk-bench-dist-")
    try:
        mp.start_processes(_rank, args=(args.ranks, _port(), args.mb, root, args.reps),
                           nprocs=args.ranks, start_method="spawn")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
