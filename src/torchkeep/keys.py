"""Pure functions on key names: wrapper prefixes, rename rules, prefix alignment."""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence, TypeVar

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
