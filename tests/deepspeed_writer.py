"""Write a tiny DeepSpeed ZeRO checkpoint with a real engine on the CPU accelerator (gloo), then
DeepSpeed's own fp32 weights from it (zero_to_fp32), for the reader tests.

usage: python deepspeed_writer.py STAGE WORLD_SIZE OUT_DIR PORT
Writes OUT_DIR/run (the DeepSpeed run folder) and OUT_DIR/reference.pt.
"""
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")
STAGE, WORLD, OUT, PORT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]


def train(rank: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT)
    import deepspeed
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 5)
            self.fc = torch.nn.Linear(5, 3)
            self.bn = torch.nn.BatchNorm1d(3)
            self.head = torch.nn.Linear(3, 7, bias=False)

        def forward(self, x):
            return self.head(self.bn(self.fc(self.emb(x))))

    net = Net()
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": STAGE}, "zero_allow_untested_optimizer": True}
    deepspeed.init_distributed(dist_backend="gloo")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    eng, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    for _ in range(2):
        x = torch.randint(0, 7, (2,))
        loss = eng(x).float().pow(2).mean()
        eng.backward(loss)
        eng.step()
    eng.save_checkpoint(os.path.join(OUT, "run"), client_state={"epoch": 3})


if __name__ == "__main__":
    import torch.multiprocessing as mp

    if WORLD == 1:
        train(0)
    else:
        mp.spawn(train, nprocs=WORLD)
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(os.path.join(OUT, "run"))
    torch.save({k: v.clone() for k, v in sd.items()}, os.path.join(OUT, "reference.pt"))
