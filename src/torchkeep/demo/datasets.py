"""Small real data shipped inside the package, so the demo and the tests run with no download.

``load_digits`` reads the UCI 8×8 handwritten digits (1,797 samples, CC BY 4.0; see
``torchkeep/demo/data/ATTRIBUTION.md``). ``split`` makes a deterministic, stratified train/test split.
"""
from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

DIGITS_FILE = "digits.csv.gz"
N_DIGITS = 1797
PIXEL_MAX = 16.0


@dataclass(frozen=True)
class Split:
    """A train/test split of images and labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as ``(images, labels)``: images float32 ``[N, 1, 8, 8]`` scaled to
    [0, 1], labels int64 ``[N]`` in 0..9, in the file's order."""
    raw = resources.files("torchkeep.demo").joinpath("data", DIGITS_FILE).read_bytes()
    with gzip.open(io.BytesIO(raw), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (N_DIGITS, 65):
        raise ValueError(f"torchkeep/data/{DIGITS_FILE}: expected {N_DIGITS} rows of 65 values, "
                         f"found shape {table.shape} (damaged package data? reinstall torchkeep)")
    images = torch.from_numpy(table[:, :64].astype(np.float32) / PIXEL_MAX).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(table[:, 64].copy())
    return images, labels


def split(images: torch.Tensor, labels: torch.Tensor, test_fraction: float = 0.2,
          seed: int = 0) -> Split:
    """A stratified split: ``test_fraction`` of each class goes to the test set, chosen by a
    permutation from ``seed`` alone, so the same arguments always give the same split on any
    machine (the global RNG is not touched)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    gen = torch.Generator().manual_seed(seed)
    test_idx: list[torch.Tensor] = []
    train_idx: list[torch.Tensor] = []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = torch.cat(train_idx).sort().values
    test = torch.cat(test_idx).sort().values
    return Split(images[train], labels[train], images[test], labels[test])
