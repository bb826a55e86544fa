"""Shared helpers for the benchmarks: realistic state dicts, medians, ratio tables."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import torch


def transformer_state(target_mb: int, hidden: int = 1024, seed: int = 0) -> dict[str, torch.Tensor]:
    """A transformer-like state dict of about ``target_mb`` MiB (float32): embeddings, per-layer
    attention and MLP matrices, biases and layer norms."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    per_layer = (4 * hidden * hidden + 8 * hidden * hidden) * 4
    layers = max(1, int(target_mb * 2**20 * 0.9 // per_layer))
    sd["embed.weight"] = torch.randn(int(target_mb * 2**20 * 0.1 // (hidden * 4)) or 1, hidden, generator=g)
    for i in range(layers):
        p = f"layers.{i}."
        for n in ("q", "k", "v", "o"):
            sd[p + f"attn.{n}.weight"] = torch.randn(hidden, hidden, generator=g)
            sd[p + f"attn.{n}.bias"] = torch.randn(hidden, generator=g)
        sd[p + "mlp.up.weight"] = torch.randn(4 * hidden, hidden, generator=g)
        sd[p + "mlp.up.bias"] = torch.randn(4 * hidden, generator=g)
        sd[p + "mlp.down.weight"] = torch.randn(hidden, 4 * hidden, generator=g)
        sd[p + "mlp.down.bias"] = torch.randn(hidden, generator=g)
        for ln in ("ln1", "ln2"):
            sd[p + f"{ln}.weight"] = torch.ones(hidden)
            sd[p + f"{ln}.bias"] = torch.zeros(hidden)
    return sd


def small_tensors_state(n: int = 2000, seed: int = 0) -> dict[str, torch.Tensor]:
    """About ``n`` small tensors (a wide, shallow model): the per-tensor overhead case."""
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i // 4}.m{i % 4}.weight": torch.randn(16, 8 + i % 5, generator=g) for i in range(n)}


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def touch(tensors) -> None:
    """Read every byte of every tensor (so lazy/mmap loads pay for their I/O)."""
    for t in tensors:
        if t.numel():
            t.reshape(-1).view(torch.uint8).max() if t.is_contiguous() else t.contiguous().view(torch.uint8).max()


def tmpdir(args) -> str:
    return tempfile.mkdtemp(prefix="tk-bench-", dir=args.dir)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size-mb", type=int, default=256, help="size of the large state dict (MiB)")
    p.add_argument("--repeat", type=int, default=5, help="runs per measurement (median reported)")
    p.add_argument("--dir", default=None, help="where to write the files (default: system temp)")
    return p


def report(title: str, rows: list[tuple[str, float, float, str]]) -> None:
    """rows: (what, ours seconds, baseline seconds, target) -> a table of ratios."""
    print(f"\n## {title}")
    print(f"{'measure':58} {'ours':>9} {'baseline':>9} {'ratio':>7}  target")
    for what, ours, base, target in rows:
        ratio = ours / base if base else float("nan")
        print(f"{what:58} {ours * 1e3:8.1f}ms {base * 1e3:8.1f}ms {ratio:7.3f}  {target}")


def drop(path: str) -> None:
    if os.path.isdir(path):
        import shutil
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)
