"""Key mappings that a model's own library declares, applied as renames before matching.

transformers models declare how names in older checkpoints map to their current ones (v5:
``conversion_mapping.get_model_conversion_mapping``, renamings such as
``attention.query -> q_proj``; v4: the ``_checkpoint_conversion_mapping`` class attribute).
When the *target* is such a model, :func:`library_renames` applies that mapping to the source's
names, as ``from_pretrained`` would. Only the library the target already comes from is
consulted (it is imported already, since the model is an instance of it); nothing named by the
checkpoint is ever imported. Weight *converters* (fusing or splitting tensors) are not applied:
the tensors they would take are named in a note and left to the other matchers.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Any, Sequence

__all__ = ["library_renames"]

log = logging.getLogger(__name__)


def _is_transformers_model(model: Any) -> bool:
    tf = sys.modules.get("transformers")
    if tf is None or not type(model).__module__.startswith("transformers"):
        return False
    base = getattr(tf, "PreTrainedModel", None)
    return base is not None and isinstance(model, base)


def _v5_mapping(model: Any) -> tuple[list, list] | None:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return None
    transforms = get_model_conversion_mapping(model, add_legacy=True)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _v5_renames(names: Sequence[str], renamings: list, converters: list
                ) -> tuple[dict[str, str], list[str]]:
    from transformers.core_model_loading import apply_converters, apply_renamings
    out: dict[str, str] = {}
    converted: list[str] = []
    for n in names:
        new = apply_renamings(n, renamings)
        if new != n:
            out[n] = new
        if converters and apply_converters(new, converters)[1] is not None:
            converted.append(n)
    return out, converted


def _v4_renames(names: Sequence[str], mapping: dict[str, str]) -> dict[str, str]:
    out = {}
    for n in names:
        for pattern, repl in mapping.items():
            new, k = re.subn(pattern, repl, n)
            if k:
                if new != n:
                    out[n] = new
                break
    return out


def library_renames(model: Any, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``(source name -> name the model's library gives it, notes for the report)``; empty when
    the target is no library model with a key mapping."""
    if not _is_transformers_model(model):
        return {}, []
    label = f"transformers {type(model).__name__}"
    found = _v5_mapping(model)
    if found is not None:
        renamings, converters = found
        renames, converted = _v5_renames(names, renamings, converters)
        notes = []
        if renames:
            notes.append(f"library key mapping: {label} declares {len(renamings)} renaming rules; "
                         f"applied before matching, they renamed {len(renames)} source names")
        if converted:
            notes.append(f"library key mapping: {label} would convert {len(converted)} source tensors "
                         f"({', '.join(converted[:3])}{', ...' if len(converted) > 3 else ''}) with "
                         "weight converters, which torchkeep does not apply; they are matched as stored")
            log.warning("%s", notes[-1])
        return renames, notes
    mapping = getattr(model, "_checkpoint_conversion_mapping", None)
    if not isinstance(mapping, dict) or not mapping:
        return {}, []
    renames = _v4_renames(names, mapping)
    notes = [f"library key mapping: {label}._checkpoint_conversion_mapping ({len(mapping)} rules) "
             f"applied before matching, renamed {len(renames)} source names"] if renames else []
    return renames, notes
