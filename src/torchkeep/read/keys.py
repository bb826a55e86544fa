"""Pure functions on key names: wrapper prefixes, rename rules, prefix alignment."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

V = TypeVar("V")

# Leading segments added by wrappers rather than by the model: DataParallel / DDP ('module')
# and torch.compile ('_orig_mod', which also appears mid-name when a submodule was compiled).
WRAPPER_SEGMENTS = ("module", "_orig_mod")


def strip_prefix(name: str, prefix: str) -> str:
    """``name`` without ``prefix`` (given with or without its trailing dot) if it has it."""
    p = prefix if prefix.endswith(".") or not prefix else prefix + "."
    return name[len(p):] if p and name.startswith(p) else name


def add_prefix(name: str, prefix: str) -> str:
    if not prefix:
        return name
    return prefix + name if prefix.endswith(".") else f"{prefix}.{name}"


def common_first_segment(names: Iterable[str]) -> str | None:
    """The first dotted segment every name shares (and that is not the whole name), else None."""
    first = None
    for n in names:
        head, sep, _ = n.partition(".")
        if not sep:
            return None
        if first is None:
            first = head
        elif head != first:
            return None
    return first


def unwrap_names(names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Map each name to its form without DataParallel/DDP/compile wrapper segments.

    Returns ``(old -> new, stripped prefixes)``. A leading ``module.`` is stripped only when every
    name has it (the whole model was wrapped); ``_orig_mod.`` is removed wherever it stands,
    since torch.compile is its only source. Names are never merged: if stripping would make two
    names equal the stripping is not done.
    """
    mapping = {n: n for n in names}
    stripped: list[str] = []
    changed = True
    while changed and mapping:
        changed = False
        head = common_first_segment(mapping.values())
        if head in WRAPPER_SEGMENTS:
            new = {k: strip_prefix(v, head) for k, v in mapping.items()}
            if len(set(new.values())) == len(new):
                mapping = new
                stripped.append(head + ".")
                changed = True
    if any("._orig_mod." in v for v in mapping.values()):
        new = {k: v.replace("._orig_mod.", ".") for k, v in mapping.items()}
        if len(set(new.values())) == len(new):
            mapping = new
            stripped.append("._orig_mod.")
    return mapping, stripped


def unwrap(state: Mapping[str, V]) -> tuple[dict[str, V], list[str]]:
    """``state`` with wrapper prefixes removed (see :func:`unwrap_names`), and what was removed."""
    mapping, stripped = unwrap_names(list(state))
    return {mapping[k]: v for k, v in state.items()}, stripped


def compile_rules(rules: Iterable[tuple[str, str] | str] | None) -> list[tuple[re.Pattern, str]]:
    """Rules as (compiled regex, replacement). A rule may be given as 'REGEX=REPL'."""
    out = []
    for rule in rules or ():
        if isinstance(rule, str):
            if "=" not in rule:
                raise ValueError(f"rename rule {rule!r} must look like REGEX=REPLACEMENT")
            pat, repl = rule.split("=", 1)
        else:
            pat, repl = rule
        try:
            out.append((re.compile(pat), repl))
        except re.error as e:
            raise ValueError(f"rename rule {pat!r} is not a valid regular expression: {e}") from None
    return out


def apply_rules(name: str, rules: Sequence[tuple[re.Pattern, str]]) -> str:
    """``name`` after every rule in order (each rule rewrites the result of the one before)."""
    for pat, repl in rules:
        name = pat.sub(repl, name)
    return name


def module_path(name: str) -> str:
    """The module part of a parameter name: 'encoder.layer.0.weight' -> 'encoder.layer.0'."""
    return name.rpartition(".")[0]


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders 'layer.2' before 'layer.10' (digit runs compare as numbers)."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(name))


def _prefix_splits(name: str, max_depth: int) -> list[tuple[str, str]]:
    """(prefix with trailing dot or '', rest) for the first 0..max_depth segments of ``name``;
    the rest keeps at least a module name and a leaf, so 'fc.weight' -> 'head.weight' is left
    to other matchers (a rest of just 'weight' says nothing about what the tensor is)."""
    segs = name.split(".")
    out = []
    pos = 0
    for k in range(0, min(max_depth, len(segs) - 2) + 1):
        out.append((name[:pos], name[pos:]))
        pos += len(segs[k]) + 1
    return out


def align_prefixes(source_names: Iterable[str], target_names: Iterable[str], *,
                   max_depth: int = 3, fits: Callable[[str, str], bool] | None = None
                   ) -> tuple[str, str, dict[str, str]] | None:
    """The prefix mapping that turns the most source names into target names.

    Considers replacing a leading prefix of up to ``max_depth`` segments of a source name
    (``bert.``, ``model.backbone.``, or nothing) by one of a target name (``encoder.`` into
    ``backbone.encoder.``). Returns ``(source_prefix, target_prefix, source -> target)`` for the
    mapping that matches the most names, or None when nothing matches or two mappings that pair
    different names tie for the most (an ambiguous alignment is not guessed). With ``fits``,
    only pairs for which ``fits(source, target)`` is true count and are returned (the caller
    checks shapes there).
    """
    index: dict[str, list[tuple[str, str]]] = {}
    for t in target_names:
        for q, rest in _prefix_splits(t, max_depth):
            index.setdefault(rest, []).append((q, t))
    raw: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for s in source_names:
        for p, rest in _prefix_splits(s, max_depth):
            for q, t in index.get(rest, ()):
                if p != q:
                    raw.setdefault((p, q), []).append((s, t))
    # For one (p, q) each source has one rest, hence one target: the lists pair names 1:1.
    best = 0
    top: list[tuple[tuple[str, str], dict[str, str]]] = []
    for pq, pairs in sorted(raw.items(), key=lambda kv: -len(kv[1])):
        if len(pairs) < best:
            break  # fits only removes pairs: no later mapping can reach the best any more
        mapping = {s: t for s, t in pairs if fits is None or fits(s, t)}
        if not mapping or len(mapping) < best:
            continue
        if len(mapping) > best:
            best, top = len(mapping), []
        top.append((pq, mapping))
    if not top:
        return None
    # Mappings that pair exactly the same names are one alignment said two ways
    # ('bert.' -> '' and 'bert.encoder.' -> 'encoder.'); keep the shortest spelling.
    first = top[0][1]
    if any(m != first for _, m in top[1:]):
        return None
    (p, q), mapping = min(top, key=lambda x: (len(x[0][0]) + len(x[0][1]), x[0]))
    return p, q, mapping
