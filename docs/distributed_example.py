"""Train a small model with FSDP2 on every rank, checkpoint with torchkeep, resume where it stopped.

    torchrun --nproc-per-node 2 docs/distributed_example.py --dir runs/fsdp --steps 40

Runs on CPU (gloo) as well as on GPUs (nccl, one GPU per rank). Run it again with more --steps:
it resumes from the newest checkpoint, bit for bit.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import torchkeep

p = argparse.ArgumentParser()
p.add_argument("--dir", default="runs/fsdp")
p.add_argument("--steps", type=int, default=40)
args = p.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)

torch.manual_seed(0)  # the same initial weights on every rank
model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Dropout(0.1),
                            torch.nn.Linear(256, 10)).to(device)
mesh = init_device_mesh(device.type, (dist.get_world_size(),))
for layer in (model[0], model[3]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)          # parameters are now DTensors, each rank holds a shard

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
data = torch.utils.data.TensorDataset(torch.randn(512, 32), torch.randint(0, 10, (512,)))
sampler = torch.utils.data.distributed.DistributedSampler(data, shuffle=True, seed=0)
loader = torch.utils.data.DataLoader(data, batch_size=16, sampler=sampler)
torch.manual_seed(1 + dist.get_rank())  # each rank's own dropout stream (kept in checkpoints)

state = torchkeep.TrainState(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=loader)
with torchkeep.CheckpointManager(args.dir, keep_last=2, every_steps=10) as manager:
    step = manager.restore(state)      # every rank; None in an empty folder
    if dist.get_rank() == 0:
        print(f"resumed from step {step}" if step is not None else "fresh start")
    loss = None
    while state.step < args.steps:
        for x, y in state.batches():   # continues an interrupted epoch with the batches left
            loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if manager.should_save(state.step):
                manager.save(state, metrics={"loss": loss.item()})  # collective: every rank
            if state.step >= args.steps:
                break
    if dist.get_rank() == 0:
        print(f"step {state.step}: loss {loss.item():.4f}" if loss is not None
              else f"step {state.step}: nothing to train (--steps {args.steps} already reached)")
dist.destroy_process_group()
