"""The ZeRO partition layouts, simulated for any shapes and world size (no DeepSpeed needed):
assembling the partitions gives every parameter back exactly."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

from torchkeep.read.formats.base import ref_of
from torchkeep.read.formats.deepspeed import DeepSpeedReader, _zero12_plans, _zero3_plans

shapes_st = hst.lists(hst.lists(hst.integers(1, 5), min_size=0, max_size=3).map(tuple),
                      min_size=1, max_size=6)


def _reader() -> DeepSpeedReader:
    r = DeepSpeedReader.__new__(DeepSpeedReader)
    r.path = r.folder = "<test>"
    r.trust = False
    r.metadata = {}
    r._readers = {}
    return r


def _params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def _assemble(plans, params):
    r = _reader()
    refs = {n: r._ref(pieces, shape, pieces[0].src if pieces else ref_of(torch.zeros(0)), None)
            for n, (pieces, shape) in plans.items()}
    got = r.load(list(refs.values()))
    return dict(zip(refs, got))


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_st, world=hst.integers(1, 4), split=hst.integers(0, 6), seed=hst.integers(0, 99))
def test_zero3_layout_round_trip(shapes, world, split, seed):
    params = _params(shapes, seed)
    names = list(params)
    groups = [names[:split], names[split:]] if 0 < split < len(names) else [names]
    flats = []
    for rank in range(world):
        per_group = []
        for g in groups:
            chunks = []
            for n in g:
                t = params[n].reshape(-1)
                part = math.ceil(t.numel() / world)
                padded = torch.cat([t, torch.zeros(part * world - t.numel())])
                chunks.append(padded[rank * part:(rank + 1) * part])
            per_group.append(ref_of(torch.cat(chunks) if chunks else torch.zeros(0)))
        flats.append(per_group)
    shapes_by_group = [{n: tuple(params[n].shape) for n in g} for g in groups]
    got = _assemble(_zero3_plans(flats, shapes_by_group, "<test>"), params)
    assert list(got) == names
    for n in names:
        assert torch.equal(got[n], params[n])


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_st, world=hst.integers(1, 4), seed=hst.integers(0, 99),
       pads=hst.lists(hst.integers(0, 3), min_size=6, max_size=6))
def test_zero12_layout_round_trip(shapes, world, seed, pads):
    params = _params(shapes, seed)
    names = list(params)
    pieces, gpads = [], []
    for i, n in enumerate(names):
        pieces += [params[n].reshape(-1), torch.zeros(pads[i])]
        gpads.append(pads[i])
    flat = torch.cat(pieces)
    align = 2 * world
    flat = torch.cat([flat, torch.zeros(align * math.ceil(flat.numel() / align) - flat.numel())])
    part = flat.numel() // world
    flats = [[ref_of(flat[r * part:(r + 1) * part].clone())] for r in range(world)]
    plans = _zero12_plans(flats, [{n: tuple(params[n].shape) for n in names}], [gpads], world, "<test>")
    got = _assemble(plans, params)
    for n in names:
        assert torch.equal(got[n], params[n])
