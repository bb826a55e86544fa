"""Position-embedding resampling through transfer: grids keep their class/register tokens,
sequences are interpolated or cut, and every case is named in the report and can be switched off."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchkeep
from torchkeep.carry.adapters import ADAPTERS
from torchkeep import transfer


class PatchModel(nn.Module):
    """A ViT-like stem: class + register tokens before a square grid of patch positions."""

    def __init__(self, grid: int, prefix: int = 1, d: int = 8) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, prefix + grid * grid, d))
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.head = nn.Linear(d, 3)


def reference_grid(pos: torch.Tensor, prefix: int, new: int) -> torch.Tensor:
    old = int((pos.shape[1] - prefix) ** 0.5)
    grid = pos[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True)
    return torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


@pytest.mark.parametrize("prefix,old,new", [(1, 4, 6), (0, 6, 3), (5, 3, 5)])
def test_grid_is_resampled_keeping_prefix_tokens(prefix, old, new):
    torch.manual_seed(0)
    src, dst = PatchModel(old, prefix), PatchModel(new, prefix)
    report = transfer(dst, src)
    assert report.ok, str(report)
    assert report.adapted["pos_embed"] == (f"pos_embed: grid {old}x{old} -> {new}x{new} (bicubic), "
                                           f"{prefix} prefix tokens kept")
    assert torch.allclose(dst.pos_embed, reference_grid(src.pos_embed.detach(), prefix, new), atol=1e-6)
    assert torch.equal(dst.pos_embed[:, :prefix], src.pos_embed[:, :prefix])


def test_grid_that_is_not_square_is_refused_and_adapter_can_be_disabled():
    src = {"pos_embed": torch.randn(1, 197, 8)}
    dst = {"pos_embed": torch.zeros(1, 200, 8), "x.weight": torch.zeros(2)}
    report = transfer(dst, {**src, "x.weight": torch.ones(2)})
    assert "pos_embed" in report.missing
    assert "no count of class/register tokens leaves a square grid" in report.unused["pos_embed"]
    off = transfer(PatchModel(6), PatchModel(4), adapt=set(ADAPTERS) - {"pos_embed"},
                   dry_run=True)
    assert off.unused["pos_embed"].endswith("(adapter 'pos_embed' disabled)")


def test_feature_map_positions_are_resampled():
    src = {"absolute_pos_embed": torch.randn(1, 8, 4, 4)}
    dst = {"absolute_pos_embed": torch.zeros(1, 8, 7, 7)}
    report = transfer(dst, src)
    assert report.adapted["absolute_pos_embed"] == "pos_embed: grid 4x4 -> 7x7 (bicubic)"
    expected = F.interpolate(src["absolute_pos_embed"], size=(7, 7), mode="bicubic", antialias=True)
    assert torch.allclose(dst["absolute_pos_embed"], expected)


class Seq(nn.Module):
    def __init__(self, positions: int, d: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, d)
        self.wpe = nn.Embedding(positions, d)


def test_sequence_positions_are_interpolated_when_longer_and_cut_when_shorter():
    torch.manual_seed(1)
    src = Seq(16)
    longer, shorter = Seq(40), Seq(10)
    r1 = transfer(longer, src)
    r2 = transfer(shorter, src)
    assert r1.adapted["wpe.weight"] == "pos_embed: sequence 16 -> 40 (linear interpolation)"
    expected = F.interpolate(src.wpe.weight.detach().T.unsqueeze(0), size=40, mode="linear").squeeze(0).T
    assert torch.allclose(longer.wpe.weight, expected)
    assert torch.allclose(longer.wpe.weight[0], src.wpe.weight[0])  # ends stay where they were
    assert r2.adapted["wpe.weight"] == "pos_embed: first 10 of 16 positions"
    assert torch.equal(shorter.wpe.weight, src.wpe.weight[:10])
    assert torch.equal(longer.wte.weight, src.wte.weight)


def test_ambiguous_grid_or_sequence_is_not_guessed():
    # 50 = 1 + 7x7 and 197 = 1 + 14x14: a CLIP-like grid with a class token, or a sequence?
    report = transfer({"positional_embedding": torch.zeros(197, 8)},
                      {"positional_embedding": torch.randn(50, 8)}, allow_empty=True)
    assert not report.loaded
    assert "could be a grid (with class tokens) or a sequence; not guessed" in report.unused["positional_embedding"]
