"""Run every benchmark in this folder, one after the other, with the same size and repeat.

    python benchmarks/run.py [--size-mb 1024] [--repeat 5] [--only NAME]

Each script measures torchkeep and its baseline (torch.save / torch.load / safetensors / dd)
side by side in the same run and prints medians and ratios: the machines are shared and noisy,
so the ratios are the figures to compare, never a lone absolute time. bench_cuda.py runs only
where CUDA is available and is skipped, saying so, elsewhere.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_ONLY = {"bench_cuda.py"}


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--only", action="append", default=[], help="run only bench_NAME.py (repeatable)")
    args = p.parse_args()
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if args.only:
        scripts = [s for s in scripts if os.path.basename(s)[6:-3] in args.only]
    status = 0
    for script in scripts:
        print(f"\n# {os.path.basename(script)}", flush=True)
        if os.path.basename(script) in CUDA_ONLY and not cuda_available():
            print("skipped: CUDA is not available on this machine", flush=True)
            continue
        rc = subprocess.call([sys.executable, script, "--size-mb", str(args.size_mb),
                              "--repeat", str(args.repeat)])
        status = status or rc
    return status


if __name__ == "__main__":
    raise SystemExit(main())
