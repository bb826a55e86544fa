"""convert vs the disk: write bandwidth of `torchkeep convert` against `dd conv=fsync`, same run.

    python benchmarks/bench_convert.py --size-mb 1024

Target (issue 2): convert >= 0.8x the sequential write bandwidth that
`dd if=/dev/zero of=... bs=1M count=N conv=fsync` reaches for the same number of bytes in the
same folder. The convert time includes everything the command does: reading the source, writing
the safetensors file under a temporary name with fsync, re-reading and verifying every tensor
against the source, and the rename. dd and convert runs alternate, so both see the same disk.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop, parser, small_tensors_state, tmpdir, transformer_state  # noqa: E402

from torchkeep.look.conversion import convert


def dd(path: str, nbytes: int) -> float:
    count = max(1, -(-nbytes // 2**20))
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}", "conv=fsync"],
                   check=True, capture_output=True)
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt * nbytes / (count * 2**20)  # seconds for exactly nbytes


def bench(label: str, src: str, d: str, repeat: int, target: str = ">= 0.80", **kw) -> tuple:
    dst = os.path.join(d, "out.safetensors")
    t_dd, t_cv, nbytes = [], [], 0
    for _ in range(repeat):
        drop(dst)
        t0 = time.perf_counter()
        res = convert(src, dst, **kw)
        t_cv.append(time.perf_counter() - t0)
        nbytes = os.path.getsize(dst)
        drop(dst)
        t_dd.append(dd(os.path.join(d, "dd.bin"), nbytes))
    cv, base = statistics.median(t_cv), statistics.median(t_dd)
    assert res.verified
    return label, nbytes, cv, base, target


def main() -> None:
    args = parser(__doc__).parse_args()
    d = tmpdir(args)
    sd = transformer_state(args.size_mb)
    st_src = os.path.join(d, "src.safetensors")
    pt_src = os.path.join(d, "src.pt")
    save_file(sd, st_src)
    torch.save(sd, pt_src)
    del sd
    small = os.path.join(d, "small.safetensors")
    save_file(small_tensors_state(2000), small)
    rows = [bench(f"{args.size_mb} MiB safetensors -> safetensors", st_src, d, args.repeat),
            bench(f"{args.size_mb} MiB torch.save -> safetensors", pt_src, d, args.repeat),
            bench(f"{args.size_mb} MiB safetensors -> bf16 safetensors", st_src, d, args.repeat,
                  "(info: reads 2x what it writes)", dtype="bf16"),
            bench("2,000 small tensors safetensors -> safetensors", small, d, args.repeat,
                  "(info: per-tensor cost)")]
    print(f"\n## convert vs dd conv=fsync (median of {args.repeat}, alternating runs)")
    print(f"{'measure':52} {'bytes':>11} {'convert':>9} {'dd':>9} {'MB/s':>7} {'dd MB/s':>8} {'ratio':>6}  target (bandwidth ratio)")
    for label, nbytes, cv, base, target in rows:
        print(f"{label:52} {nbytes:11,} {cv * 1e3:8.0f}ms {base * 1e3:8.0f}ms {nbytes / cv / 1e6:7.0f} "
              f"{nbytes / base / 1e6:8.0f} {base / cv:6.2f}  {target}")
    drop(d)


if __name__ == "__main__":
    main()
