"""EMA copies of a model carried through the same transfer plan as its weights."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchkeep.carry.migration.report import _shape

if TYPE_CHECKING:  # pragma: no cover
    from torchkeep.carry.report import TransferReport


# ----------------------------------------------------------------------------------- EMA
def plan_ema(ema: nn.Module | Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
             mapping: Mapping[str, tuple[str, Any]], reasons: Mapping[str, str], label: str
             ) -> tuple["TransferReport", dict[str, tuple[torch.Tensor, torch.Tensor, Any]]]:
    """Carry EMA weights through the model's plan: the EMA copy of target ``t`` takes the EMA
    copy of the source that ``t`` took its weight from, adapted the same way.

    Returns the report and ``ema name -> (source tensor, target tensor, adaptation)``.
    """
    from torchkeep.carry.report import TransferReport

    if isinstance(ema, nn.Module):
        tensors = {k: v for k, v in ema.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    else:
        tensors = {k: v for k, v in ema.items() if isinstance(v, torch.Tensor)}
    tmap, _ = _unwrap_ema(list(tensors))        # 'module.fc.weight' -> 'fc.weight'
    smap, stripped = _unwrap_ema(list(source))
    src = {smap[k]: v for k, v in source.items()}
    rep = TransferReport(source=label, target=f"EMA {type(ema).__name__}", stripped=stripped,
                         target_shapes={k: tuple(v.shape) for k, v in tensors.items()},
                         source_shapes={k: tuple(v.shape) for k, v in src.items()})
    actions: dict[str, tuple[torch.Tensor, torch.Tensor, Any]] = {}
    used: set[str] = set()
    for name, t in tensors.items():
        bare = tmap[name]
        act = mapping.get(bare)
        if act is None:
            if bare in src and tuple(src[bare].shape) == tuple(t.shape):
                act = (bare, None)   # an EMA-only tensor (AveragedModel's n_averaged)
            else:
                rep.missing.append(name)
                rep.why_missing[name] = "its model weight had no source"
                continue
        s, ad = act
        if s not in src:
            rep.missing.append(name)
            rep.why_missing[name] = f"the source EMA has no {s}"
            continue
        if ad is None and tuple(src[s].shape) != tuple(t.shape):
            rep.missing.append(name)
            rep.why_missing[name] = f"source EMA {s} is {_shape(src[s].shape)}"
            continue
        used.add(s)
        rep.loaded[name] = s
        rep.reasons[name] = f"{reasons.get(bare, 'exact').split(':')[0]} (the model's plan)"
        if ad is not None and getattr(ad, "how", ""):
            rep.adapted[name] = ad.how
        actions[name] = (src[s], t, ad)
    rep.unused = {s: "no EMA tensor of the target takes it" for s in src if s not in used}
    return rep, actions


def _unwrap_ema(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Names without wrapper prefixes; an EMA wrapper (AveragedModel, timm's ModelEma) keeps its
    model under ``module.`` next to its own counters, so ``module.`` goes wherever it stands."""
    from torchkeep.read import keys
    mapping, stripped = keys.unwrap_names(names)
    bare = {k: keys.strip_prefix(v, "module") for k, v in mapping.items()}
    if bare != mapping and len(set(bare.values())) == len(bare):
        return bare, stripped + ["module."]
    return mapping, stripped


def apply_ema(actions: Mapping[str, tuple[torch.Tensor, torch.Tensor, Any]]) -> None:
    with torch.no_grad():
        for src, dst, ad in actions.values():
            if ad is None:
                dst.copy_(src)
            else:
                ad.write(src.to(dst.device), dst)
