"""What tensor names say about which module is which, apart from their order.

Structural matching uses this where the source's order is no evidence (safetensors, sharded
indexes and DCP store keys sorted or unordered). Three kinds of evidence, all from names alone:

* **name tokens**, canonicalised through a small vocabulary of common spellings
  (``query``/``q``/``q_proj``/``wq`` -> ``q``; ``attention.output`` / ``out_proj`` / ``o_proj``
  -> ``o``; ``ln``/``bn``/``layernorm``/``norm`` -> ``norm``; ``layernorm_before``/``ln_1``/
  ``norm1``/``input_layernorm`` -> first norm ...);
* **contradictions**: two names that carry different attention roles (``q`` vs ``k``) or
  different ordinals of the same stem (``norm1`` vs ``norm2``, ``conv1`` vs ``conv2``) are
  never paired;
* **indices**: each pure-number segment (``layer.3``) as its rank among its siblings and the
  number of siblings (the module tree's shape). Levels of equal sibling count are compared from
  the innermost out; differing ranks there contradict, equal ranks support.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["Features", "contradiction", "features", "level_relation", "name_relation", "relation",
           "support"]

_WORD = re.compile(r"[a-z]+|\d+")

ROLES = frozenset({"q", "k", "v", "o"})

# Whole segments with a fixed meaning (after lower-casing and 'layer_norm' -> 'layernorm').
_SEGMENTS: dict[str, tuple[str, ...]] = {
    **{s: ("q",) for s in ("query", "q", "q_proj", "wq", "to_q", "q_lin", "query_proj")},
    **{s: ("k",) for s in ("key", "k", "k_proj", "wk", "to_k", "k_lin", "key_proj")},
    **{s: ("v",) for s in ("value", "v", "v_proj", "wv", "to_v", "v_lin", "value_proj")},
    **{s: ("o",) for s in ("o", "o_proj", "out_proj", "wo", "to_out", "out_lin", "output_proj")},
    **{s: ("norm", "norm#1") for s in ("layernorm_before", "input_layernorm", "pre_layernorm",
                                       "attention_norm", "ln_attn")},
    **{s: ("norm", "norm#2") for s in ("layernorm_after", "post_attention_layernorm",
                                       "ffn_norm", "ln_mlp")},
    **{s: ("norm", "final") for s in ("ln_f", "final_layernorm", "norm_f", "final_norm")},
}

# Single words with common synonyms.
_WORDS: dict[str, str] = {
    "layernorm": "norm", "ln": "norm", "bn": "norm", "batchnorm": "norm", "gn": "norm",
    "layers": "layer", "blocks": "block", "attn": "attention", "ffn": "mlp", "feedforward": "mlp",
    "dense": "fc", "linear": "fc", "lin": "fc", "convolution": "conv", "embeddings": "embedding",
    "embed": "embedding", "emb": "embedding", "stages": "stage", "heads": "head",
}

# Inside an attention module these segments are its output projection.
_ATTENTION_OUT = frozenset({"output", "out", "proj", "c_proj"})


@dataclass(frozen=True)
class Features:
    """The evidence one module path carries (see the module docstring)."""

    tokens: frozenset[str]
    roles: frozenset[str]
    ordinals: tuple[tuple[str, str], ...]      # (stem, ordinal), e.g. ('norm', '1')
    levels: tuple[tuple[int, int], ...]         # (rank among siblings, number of siblings)
    # The same with the numbers inside names ('layer2', 'blocks_0_attn') as levels too.
    all_levels: tuple[tuple[int, int], ...] = ()


@functools.lru_cache(maxsize=16384)
def _segment_tokens(seg: str, in_attention: bool) -> tuple[str, ...]:
    return tuple(_tokens_of(seg, in_attention))


def _tokens_of(seg: str, in_attention: bool) -> list[str]:
    s = seg.lower().replace("layer_norm", "layernorm").replace("feed_forward", "feedforward")
    if in_attention and s in _ATTENTION_OUT:
        return ["o"]
    if s in _SEGMENTS:
        return list(_SEGMENTS[s])
    out: list[str] = []
    stem = None
    for w in _WORD.findall(s):
        if w.isdigit():
            if stem is not None:
                out.append(f"{stem}#{int(w)}")
            continue
        stem = _WORDS.get(w, w)
        out.append(stem)
    return out


_DIGITS = re.compile(r"\d+")


def _numbered(seg: str) -> tuple[str, int] | None:
    """``(template, number)`` for a segment with exactly one run of digits ('3' -> ('#', 3),
    'layer2' -> ('layer#', 2), 'blocks_0_attn' -> ('blocks_#_attn', 0)), else None."""
    runs = _DIGITS.findall(seg)
    if len(runs) != 1:
        return None
    return _DIGITS.sub("#", seg), int(runs[0])


def _sibling_index(paths: Iterable[str]) -> dict[tuple[str, str], list[int]]:
    """(parent prefix, segment template) -> sorted numbers, over every module path given."""
    kids: dict[tuple[str, str], set[int]] = {}
    for p in paths:
        segs = p.split(".") if p else []
        for i, seg in enumerate(segs):
            num = _numbered(seg)
            if num is not None:
                kids.setdefault((".".join(segs[:i]), num[0]), set()).add(num[1])
    return {k: sorted(v) for k, v in kids.items()}


def features(paths: Sequence[str], all_paths: Iterable[str]) -> dict[str, Features]:
    """Evidence for each module path in ``paths``; sibling counts come from ``all_paths`` (every
    module of the same model, matched or not, so ranks do not shift as names are claimed).
    A number in a name is an index level where siblings share the rest of the name
    (``layer.3``; ``layer1``..``layer4``; ``blocks_0_attn``..``blocks_11_attn``)."""
    siblings = _sibling_index(all_paths)
    out: dict[str, Features] = {}
    for path in paths:
        segs = path.split(".") if path else []
        tokens: list[str] = []
        levels, all_levels = [], []
        for i, seg in enumerate(segs):
            num = _numbered(seg)
            if num is not None:
                sib = siblings.get((".".join(segs[:i]), num[0]), [num[1]])
                level = (sib.index(num[1]) if num[1] in sib else 0, len(sib))
                if seg.isdigit():
                    levels.append(level)
                if seg.isdigit() or len(sib) > 1:
                    all_levels.append(level)
            if seg.isdigit():
                continue
            tokens += _segment_tokens(seg, "attention" in tokens)
        toks = frozenset(tokens)
        ords = tuple(sorted(tuple(t.split("#", 1)) for t in toks if "#" in t))  # type: ignore[misc]
        out[path] = Features(toks, toks & ROLES, ords, tuple(levels), tuple(all_levels))
    return out


def _levels_by_count(levels: tuple[tuple[int, int], ...]) -> dict[int, list[int]]:
    by: dict[int, list[int]] = {}
    for rank, n in reversed(levels):  # innermost first
        by.setdefault(n, []).append(rank)
    return by


@functools.lru_cache(maxsize=65536)
def _name_relation(ta: frozenset[str], oa: tuple[tuple[str, str], ...],
                   tb: frozenset[str], ob: tuple[tuple[str, str], ...]) -> tuple[str | None, int]:
    ra, rb = ta & ROLES, tb & ROLES
    if ra and rb and ra != rb:
        return f"names say {'/'.join(sorted(ra))} vs {'/'.join(sorted(rb))}", 0
    ao, bo = dict(oa), dict(ob)
    for stem in ao.keys() & bo.keys():
        if ao[stem] != bo[stem] and sum(s == stem for s, _ in oa) == 1 == sum(s == stem for s, _ in ob):
            return f"names say {stem}{ao[stem]} vs {stem}{bo[stem]}", 0
    return None, len(ta & tb)


@functools.lru_cache(maxsize=65536)
def _level_relation(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]
                    ) -> tuple[str | None, int]:
    """Levels of equal sibling count are compared innermost first, where both sides have the
    same number of them (otherwise which level is which is unknown: no evidence)."""
    la, lb = _levels_by_count(a), _levels_by_count(b)
    agree = 0
    for n in la.keys() & lb.keys():
        if len(la[n]) != len(lb[n]):
            continue
        for ra, rb in zip(la[n], lb[n]):
            if ra != rb:
                return f"indices differ (position {ra} vs {rb} of {n})", 0
        agree += len(la[n])
    return None, agree


def name_relation(a: Features, b: Features) -> tuple[str | None, int]:
    """What the name tokens alone say: ``(why they rule the pair out, 0)`` or ``(None, shared)``."""
    return _name_relation(a.tokens, a.ordinals, b.tokens, b.ordinals)


def level_relation(a: Features, b: Features) -> tuple[str | None, int]:
    """What the indices alone say: ``(why they rule the pair out, 0)`` or ``(None, agreeing
    levels)``. Container indices (``layer.3``) are compared, and separately all numbers
    including those inside names; either may rule a pair out, the better agreement counts."""
    why, agree = _level_relation(a.levels, b.levels)
    if why is not None or a.all_levels == a.levels and b.all_levels == b.levels:
        return why, agree
    why, agree_all = _level_relation(a.all_levels, b.all_levels)
    return (why, 0) if why is not None else (None, max(agree, agree_all))


def relation(a: Features, b: Features) -> tuple[str | None, int]:
    """``(why the names rule the pair out, None)`` or ``(None, support)``: shared canonical tokens
    plus index levels that agree."""
    why, shared = _name_relation(a.tokens, a.ordinals, b.tokens, b.ordinals)
    if why is not None:
        return why, 0
    why, agree = level_relation(a, b)
    return (why, 0) if why is not None else (None, shared + agree)


def contradiction(a: Features, b: Features) -> str | None:
    """Why two modules cannot be counterparts by their names alone, or None."""
    return relation(a, b)[0]


def support(a: Features, b: Features) -> int:
    """How much the names agree (0 where they contradict)."""
    return relation(a, b)[1]
