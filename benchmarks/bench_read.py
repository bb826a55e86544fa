"""Reading safetensors files: torchkeep vs torch.load and safetensors, side by side in one run.

    python benchmarks/bench_read.py --size-mb 1024

Targets (issue 2): entries() <= 2% of torch.load for the same weights (here: the torch.save
file of the same state dict); state_dict() <= 1.1x safetensors.torch.load_file, each followed by
touching every byte. Also shown: a sharded HF folder of the same weights.
"""
from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (drop, median_time, parser, report, small_tensors_state, tmpdir,  # noqa: E402
                    touch, transformer_state)

import torchkeep  # noqa: E402
from torchkeep.look.conversion import convert


def bench(label: str, sd: dict, d: str, repeat: int) -> list:
    st_path = os.path.join(d, f"{label}.safetensors")
    pt_path = os.path.join(d, f"{label}.pt")
    save_file(sd, st_path)
    torch.save(sd, pt_path)
    shards = os.path.join(d, f"{label}-sharded")
    size = sum(t.nbytes for t in sd.values())
    convert(sd, shards, max_shard_size=max(1, size // 4))
    del sd
    t_load = median_time(lambda: torch.load(pt_path, weights_only=True), repeat)
    t_entries = median_time(lambda: torchkeep.open(st_path).entries(), repeat)
    t_lf = median_time(lambda: touch(load_file(st_path).values()), repeat)
    t_sd = median_time(lambda: touch(torchkeep.open(st_path).state_dict().values()), repeat)
    t_sh = median_time(lambda: touch(torchkeep.open(shards).state_dict().values()), repeat)
    t_lf_only = median_time(lambda: load_file(st_path), repeat)
    t_entries_sh = median_time(lambda: torchkeep.open(shards).entries(), repeat)
    for p in (st_path, pt_path, shards):
        drop(p)
    return [
        (f"{label}: entries() vs torch.load (same weights)", t_entries, t_load,
         "<= 0.02" if size >= 2**29 else "(info: the 2% target is for ~1 GiB)"),
        (f"{label}: entries() vs load_file (no touch)", t_entries, t_lf_only, "(info)"),
        (f"{label}: state_dict()+touch vs load_file+touch", t_sd, t_lf, "<= 1.10"),
        (f"{label}: 4 shards: entries() vs torch.load", t_entries_sh, t_load, "(info)"),
        (f"{label}: 4 shards: state_dict()+touch vs load_file+touch", t_sh, t_lf, "(info)"),
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    d = tmpdir(args)
    rows = bench(f"transformer {args.size_mb} MiB", transformer_state(args.size_mb), d, args.repeat)
    rows += bench("2,000 small tensors", small_tensors_state(2000), d, args.repeat)
    report(f"safetensors reading (median of {args.repeat})", rows)
    drop(d)


if __name__ == "__main__":
    main()
