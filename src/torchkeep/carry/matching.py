"""Structural matching: pair the modules of two models by shapes, and by order where it is known.

Used by :func:`torchkeep.transfer` for tensors whose names found no counterpart (a module
renamed from ``conv`` to ``moon``). Modules are compared by their signature (leaf names and
shapes).

* Where both sides' order is known (a module, a torch pickle), the two module sequences are
  aligned as a longest common subsequence and only pairs that every optimal alignment contains
  are accepted (:func:`align`): a bit-parallel LCS (O(n*m/wordsize)) plus one look-up per cell
  whose signatures agree. Pairs whose names contradict (``query`` against ``k_proj``) are
  refused even then.
* Where it is not (safetensors, sharded indexes, DCP), order says nothing, so
  :func:`align_unordered` pairs modules of equal signature by the other evidence in their names
  (:mod:`torchkeep.carry.nameevidence`): a pair is accepted only when each side is the other's single
  best-supported candidate; equal support on two candidates is reported ambiguous.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from torchkeep.carry import nameevidence
from torchkeep.read.keys import module_path

Signature = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class ModuleGroup:
    """The tensors of one module that are still unmatched, with their shape signature."""

    path: str                       # module path ('' for tensors at the root)
    tensors: dict[str, str]         # leaf -> full tensor name
    signature: Signature

    @property
    def label(self) -> str:
        return self.path or "<root>"


@dataclass(frozen=True)
class ModuleMatch:
    """One accepted pair of modules and the tensors it pairs (source -> target)."""

    source: ModuleGroup
    target: ModuleGroup
    rank: int           # position of this pair in the alignment, 1-based (0: order unknown)
    of: int             # pairs in the optimal alignment (candidates of its shape, order unknown)

    @property
    def tensors(self) -> dict[str, str]:
        return {self.source.tensors[leaf]: self.target.tensors[leaf] for leaf in self.source.tensors}

    @property
    def reason(self) -> str:
        if not self.rank and self.of == 1:
            return (f"structure: module {self.source.label} -> {self.target.label} "
                    "(the only one of its shape; source order unknown)")
        if not self.rank:
            return (f"structure: module {self.source.label} -> {self.target.label} (best of "
                    f"{self.of} of its shape by names and indices; source order unknown)")
        return (f"structure: module {self.source.label} -> {self.target.label} "
                f"(pair {self.rank} of {self.of} aligned by order and shapes)")


@dataclass
class Alignment:
    """Accepted module pairs, and the source modules that fit several targets equally well."""

    matches: list[ModuleMatch] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # source path -> target paths
    contradicted: dict[str, tuple[str, str]] = field(default_factory=dict)  # source -> (target, why)
    # source -> other sources that fit its one best target as well (order unknown)
    rivals: dict[str, list[str]] = field(default_factory=dict)


def group_modules(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> list[ModuleGroup]:
    """Tensors grouped by module path, modules in order of first appearance in ``names``."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        path = module_path(name)
        leaf = name[len(path) + 1:] if path else name
        groups.setdefault(path, {})[leaf] = name
    out = []
    for path, leaves in groups.items():
        sig = tuple(sorted((leaf, tuple(shapes[n])) for leaf, n in leaves.items()))
        out.append(ModuleGroup(path, leaves, sig))
    return out


def _lcs_rows(s: Sequence[int], t: Sequence[int]) -> list[int]:
    """Bit-parallel LCS (Allison-Dix / Hyyro): row i is a bit vector over t whose zero bits,
    counted below position j, give LCS(s[:i], t[:j])."""
    masks: dict[int, int] = {}
    for j, c in enumerate(t):
        masks[c] = masks.get(c, 0) | (1 << j)
    full = (1 << len(t)) - 1
    v = full
    rows = [v]
    for c in s:
        u = v & masks.get(c, 0)
        v = ((v + u) | (v - u)) & full
        rows.append(v)
    return rows


def _prefix_lcs(rows: list[int], i: int, j: int) -> int:
    return j - (rows[i] & ((1 << j) - 1)).bit_count()


def lcs_candidates(s: Sequence[int], t: Sequence[int]) -> tuple[int, list[tuple[int, int, int]]]:
    """Length of the LCS of ``s`` and ``t`` and every (i, j, rank) with s[i] == t[j] that lies on
    some longest common subsequence; rank is its 1-based position in that subsequence."""
    n, m = len(s), len(t)
    if not n or not m:
        return 0, []
    fwd = _lcs_rows(s, t)
    bwd = _lcs_rows(s[::-1], t[::-1])
    total = _prefix_lcs(fwd, n, m)
    where: dict[int, list[int]] = {}
    for j, c in enumerate(t):
        where.setdefault(c, []).append(j)
    out = []
    for i, c in enumerate(s):
        cols = where.get(c)
        if not cols:
            continue
        # LCS(s[:i], t[:j]) <= min(i, j) and LCS(s[i+1:], t[j+1:]) <= min(n-i-1, m-j-1), so a
        # pair on a longest subsequence lies in a band around the diagonal; near-identical
        # sequences (the usual case) have a narrow one.
        lo = bisect.bisect_left(cols, i + total - n)
        hi = bisect.bisect_right(cols, i + m - total)
        for j in cols[lo:hi]:
            before = _prefix_lcs(fwd, i, j)
            after = _prefix_lcs(bwd, n - i - 1, m - j - 1)  # LCS(s[i+1:], t[j+1:])
            if before + 1 + after == total:
                out.append((i, j, before + 1))
    return total, out


def align(source: Sequence[ModuleGroup], target: Sequence[ModuleGroup]) -> Alignment:
    """Pair source and target modules in order where the pairing is forced.

    Every optimal alignment takes exactly one candidate pair of each rank, so a pair that is
    the only candidate of its rank is in all of them (unambiguous); ranks with several
    candidates are reported as ambiguous instead of guessed.
    """
    ids: dict[Signature, int] = {}
    s = [ids.setdefault(g.signature, len(ids)) for g in source]
    t = [ids.setdefault(g.signature, len(ids)) for g in target]
    total, cands = lcs_candidates(s, t)
    by_rank: dict[int, list[tuple[int, int]]] = {}
    for i, j, r in cands:
        by_rank.setdefault(r, []).append((i, j))
    result = Alignment()
    for r in sorted(by_rank):
        pairs = by_rank[r]
        if len(pairs) == 1:
            i, j = pairs[0]
            result.matches.append(ModuleMatch(source[i], target[j], r, total))
        else:
            for i, j in pairs:
                result.ambiguous.setdefault(source[i].path, []).append(target[j].path)
    matched = {m.source.path for m in result.matches}
    result.ambiguous = {k: sorted(set(v)) for k, v in result.ambiguous.items() if k not in matched}
    return result


def _features(groups: Sequence[ModuleGroup], all_paths: Sequence[str] | None
              ) -> dict[str, nameevidence.Features]:
    paths = [g.path for g in groups]
    return nameevidence.features(paths, paths if all_paths is None else all_paths)


def veto(result: Alignment, all_source: Sequence[str] | None = None,
         all_target: Sequence[str] | None = None) -> Alignment:
    """``result`` without the pairs whose names contradict each other (moved to ``contradicted``):
    order alone never pairs ``query`` with ``k_proj`` or ``norm1`` with ``norm2``."""
    fs = _features([m.source for m in result.matches], all_source)
    ft = _features([m.target for m in result.matches], all_target)
    kept = []
    for m in result.matches:
        why = nameevidence.contradiction(fs[m.source.path], ft[m.target.path])
        if why is None:
            kept.append(m)
        else:
            result.contradicted[m.source.path] = (m.target.path, why)
    result.matches = kept
    return result


def align_unordered(source: Sequence[ModuleGroup], target: Sequence[ModuleGroup], *,
                    all_source: Sequence[str] | None = None,
                    all_target: Sequence[str] | None = None) -> Alignment:
    """Pair modules of equal signature without using order.

    Candidates are the target modules of the same signature whose names do not contradict the
    source's; each is scored by :func:`torchkeep.carry.nameevidence.support`. A pair is accepted when
    the target is the source's only best candidate and the source the target's. Accepted pairs
    leave the field and the rest is scored again (a module whose best fits were taken by
    better-fitting ones is then judged among what is left; a module whose siblings went to one
    parent gains support for that parent's children) until nothing changes; a source
    whose best is still shared is ambiguous. ``all_source``/``all_target``: every module path
    of each model (for sibling counts), defaulting to the groups' own.
    """
    fs, ft = _features(source, all_source), _features(target, all_target)
    by_sig: dict[Signature, list[ModuleGroup]] = {}
    for h in target:
        by_sig.setdefault(h.signature, []).append(h)
    src_by_sig: dict[Signature, list[ModuleGroup]] = {}
    for g in source:
        if g.signature in by_sig:
            src_by_sig.setdefault(g.signature, []).append(g)
    result = Alignment()
    parent_ids: dict[str, int] = {}          # target parents
    src_parent_ids: dict[str, int] = {}      # source parents
    buckets = [_Bucket.build(gs, by_sig[sig], fs, ft, parent_ids, src_parent_ids, result)
               for sig, gs in src_by_sig.items()]
    pmap = torch.full((len(src_parent_ids) + 1,), -1, dtype=torch.long)  # -1 none, -2 went apart
    while True:
        accepted = [(b, i, j) for b in buckets for i, j in b.accepted(pmap)]
        if not accepted:
            break
        for b, i, j in accepted:
            b.take(i, j)
            result.matches.append(ModuleMatch(b.src[i], b.tgt[j], 0, len(b.tgt)))
            sp, tp = int(b.src_par[i]), int(b.tgt_par[j])
            cur = int(pmap[sp])
            pmap[sp] = tp if cur in (-1, tp) else -2
    for b in buckets:
        b.report(pmap, result)
    return result


# Support added when a module's siblings already went to the candidate's parent: renames keep
# the modules of one block together (the module tree's shape as evidence).
PARENT_SUPPORT = 2


class _Bucket:
    """The source and target modules of one signature, their support matrix (-1: ruled out) and
    which of them are still free; rounds of mutual-best acceptance run as tensor operations."""

    def __init__(self, src: list[ModuleGroup], tgt: list[ModuleGroup], m: torch.Tensor,
                 src_par: torch.Tensor, tgt_par: torch.Tensor) -> None:
        self.src, self.tgt, self.m = src, tgt, m
        self.src_par, self.tgt_par = src_par, tgt_par
        self.open = torch.ones(len(src), dtype=torch.bool)
        self.free = torch.ones(len(tgt), dtype=torch.bool)

    @classmethod
    def build(cls, src: list[ModuleGroup], tgt: list[ModuleGroup], fs: dict, ft: dict,
              parent_ids: dict[str, int], src_parent_ids: dict[str, int], result: Alignment) -> "_Bucket":
        sf = [fs[g.path] for g in src]
        tf = [ft[h.path] for h in tgt]
        if len(tgt) == 1:
            for g, f in zip(src, sf):
                why = nameevidence.contradiction(f, tf[0])
                if why is not None:
                    result.contradicted[g.path] = (tgt[0].path, why)
        # Support is a sum of what the name tokens say and what the indices say, each computed
        # once per distinct pair of keys (many modules share one), then gathered.
        names = _part_matrix(sf, tf, lambda f: (f.tokens, f.ordinals), nameevidence.name_relation)
        levels = _part_matrix(sf, tf, lambda f: (f.levels, f.all_levels), nameevidence.level_relation)
        m = (names + levels).masked_fill((names < 0) | (levels < 0), -1).to(torch.int32)
        sp = torch.tensor([src_parent_ids.setdefault(module_path(g.path), len(src_parent_ids))
                           for g in src], dtype=torch.long)
        tp = torch.tensor([parent_ids.setdefault(module_path(h.path), len(parent_ids)) for h in tgt],
                          dtype=torch.long)
        return cls(src, tgt, m, sp, tp)

    def effective(self, pmap: torch.Tensor) -> torch.Tensor:
        """Support with the parent bonus, -1 where ruled out, taken or already paired."""
        e = self.m.masked_fill(~(self.open[:, None] & self.free[None, :]), -1)
        went = pmap[self.src_par]
        if bool((went >= 0).any()):
            bonus = (went[:, None] == self.tgt_par[None, :]) & (e >= 0)
            e = e + bonus.to(e.dtype) * PARENT_SUPPORT
        return e

    def accepted(self, pmap: torch.Tensor) -> list[tuple[int, int]]:
        e = self.effective(pmap)
        if e.numel() == 0:
            return []
        row_max, row_arg = e.max(dim=1)
        col_max, col_arg = e.max(dim=0)
        row_n = (e == row_max[:, None]).sum(dim=1)
        col_n = (e == col_max[None, :]).sum(dim=0)
        ok = (row_max >= 0) & (row_n == 1) & (col_n[row_arg] == 1) & \
            (col_arg[row_arg] == torch.arange(len(self.src)))
        return [(int(i), int(row_arg[i])) for i in torch.nonzero(ok).flatten()]

    def take(self, i: int, j: int) -> None:
        self.open[i] = False
        self.free[j] = False

    def report(self, pmap: torch.Tensor, result: Alignment) -> None:
        """Record the sources still open with candidates as ambiguous (and, where their one best
        target fits another source at least as well, those rivals)."""
        e = self.effective(pmap)
        if e.numel() == 0:
            return
        row_max = e.max(dim=1).values
        col_max = e.max(dim=0).values
        row_best = ((e == row_max[:, None]) & (row_max[:, None] >= 0)).tolist()
        col_best = ((e == col_max[None, :]) & (col_max[None, :] >= 0)).T.tolist()
        for i, flags in enumerate(row_best):
            best = [j for j, f in enumerate(flags) if f]
            if not best:
                continue
            path = self.src[i].path
            result.ambiguous[path] = [self.tgt[j].path for j in best]  # in the target's order
            if len(best) == 1:
                result.rivals[path] = sorted(self.src[k].path for k, f in enumerate(col_best[best[0]])
                                             if f and k != i)


def _part_matrix(sf: list, tf: list, key, relate) -> torch.Tensor:
    """``[len(sf), len(tf)]`` of what ``relate`` says per pair (-1: ruled out), computed once per
    distinct pair of ``key``s."""
    sk: dict = {}
    tk: dict = {}
    si = [sk.setdefault(key(f), (len(sk), f))[0] for f in sf]
    ti = [tk.setdefault(key(f), (len(tk), f))[0] for f in tf]
    small = torch.tensor([[-1 if why is not None else sc for why, sc in
                           (relate(a, b) for _, b in tk.values())] for _, a in sk.values()],
                         dtype=torch.int32).reshape(len(sk), len(tk))
    return small[torch.tensor(si, dtype=torch.long)][:, torch.tensor(ti, dtype=torch.long)]
