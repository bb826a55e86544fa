"""Writes tests/data/dcp_2ranks: a DCP checkpoint saved by two gloo ranks, with DTensors sharded
by rows and by columns (two chunks each), a replicated plain tensor and a plain value.

Regenerate with:  python tests/data/make_dcp_2ranks.py tests/data/dcp_2ranks   (about a minute)
test_dcp_format.py rebuilds the expected tensors from the same seed.
"""
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh


def expected():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g)
    return {"w": w, "v": torch.arange(10.0), "col": w.clone(), "b": torch.ones(3), "step": 7}


def main(rank, world, out, initfile):
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{initfile}")
    mesh = init_device_mesh("cpu", (world,))
    e = expected()
    sd = {"w": distribute_tensor(e["w"], mesh, [Shard(0)]),
          "v": distribute_tensor(e["v"], mesh, [Shard(0)]),
          "col": distribute_tensor(e["col"], mesh, [Shard(1)]),
          "b": e["b"], "step": e["step"]}
    dcp.save(sd, checkpoint_id=out)
    dist.destroy_process_group()


if __name__ == "__main__":
    out = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(main, args=(2, out, os.path.join(tmp, "init")), nprocs=2)
