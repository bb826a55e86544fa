"""The pure parts of transfer: prefix alignment and the structural (LCS) matcher."""
from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from torchkeep.carry.matching import ModuleGroup, align, lcs_candidates
from torchkeep.read.keys import align_prefixes, natural_key


def brute_candidates(s, t):
    """Plain O(n*m) dynamic programming, forwards and backwards."""
    n, m = len(s), len(t)
    fw = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n):
        for j in range(m):
            fw[i + 1][j + 1] = fw[i][j] + 1 if s[i] == t[j] else max(fw[i][j + 1], fw[i + 1][j])
    bw = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            bw[i][j] = bw[i + 1][j + 1] + 1 if s[i] == t[j] else max(bw[i + 1][j], bw[i][j + 1])
    total = fw[n][m]
    return total, sorted((i, j, fw[i][j] + 1) for i in range(n) for j in range(m)
                         if s[i] == t[j] and fw[i][j] + 1 + bw[i + 1][j + 1] == total)


def all_optimal_alignments(s, t):
    """Every longest order-preserving pairing, by exhaustive search (tiny inputs only)."""
    best, found = 0, []
    pairs = [(i, j) for i in range(len(s)) for j in range(len(t)) if s[i] == t[j]]
    for k in range(min(len(s), len(t)), 0, -1):
        for combo in itertools.combinations(pairs, k):
            if all(a[0] < b[0] and a[1] < b[1] for a, b in zip(combo, combo[1:])):
                found.append(set(combo))
        if found:
            best = k
            break
    return best, found


seqs = st.lists(st.integers(0, 3), max_size=12)


@settings(max_examples=300, deadline=None)
@given(seqs, seqs)
def test_bit_parallel_lcs_equals_dynamic_programming(s, t):
    total, cands = lcs_candidates(s, t)
    assert (total, sorted(cands)) == brute_candidates(s, t)


def group(path: str, sig: int) -> ModuleGroup:
    return ModuleGroup(path, {"weight": f"{path}.weight"}, (("weight", (sig,)),))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 2), max_size=6), st.lists(st.integers(0, 2), max_size=6))
def test_accepted_pairs_are_in_every_optimal_alignment(s, t):
    src = [group(f"s{i}", v) for i, v in enumerate(s)]
    tgt = [group(f"t{j}", v) for j, v in enumerate(t)]
    result = align(src, tgt)
    _, optimal = all_optimal_alignments(s, t)
    accepted = {(int(m.source.path[1:]), int(m.target.path[1:])) for m in result.matches}
    for alignment in optimal:
        assert accepted <= alignment
    if len(optimal) == 1:
        assert accepted == optimal[0] and not result.ambiguous
    # Nothing accepted is also called ambiguous.
    assert not {m.source.path for m in result.matches} & set(result.ambiguous)


def test_structure_recovers_a_renamed_model_and_refuses_repeats():
    src = [group(f"features.{i}", v) for i, v in enumerate([3, 5, 7, 9])]
    tgt = [group(f"body.{i * 2}", v) for i, v in enumerate([3, 5, 7, 9])]
    result = align(src, tgt)
    assert [(m.source.path, m.target.path) for m in result.matches] == [
        ("features.0", "body.0"), ("features.1", "body.2"), ("features.2", "body.4"), ("features.3", "body.6")]
    assert result.matches[1].reason == "structure: module features.1 -> body.2 (pair 2 of 4 aligned by order and shapes)"
    # Two equal layers into three: which two is a guess, so none is taken; the unique head is.
    src = [group("a", 1), group("b", 1), group("head", 2)]
    tgt = [group("x", 1), group("y", 1), group("z", 1), group("cls", 2)]
    result = align(src, tgt)
    assert [(m.source.path, m.target.path) for m in result.matches] == [("head", "cls")]
    assert result.ambiguous == {"a": ["x", "y"], "b": ["y", "z"]}


def test_align_prefixes_finds_wrappers_in_both_directions():
    src = ["bert.encoder.layer.0.dense.weight", "bert.pooler.dense.weight", "classifier.weight"]
    tgt = ["encoder.layer.0.dense.weight", "pooler.dense.weight"]
    assert align_prefixes(src, tgt) == ("bert.", "", {
        "bert.encoder.layer.0.dense.weight": "encoder.layer.0.dense.weight",
        "bert.pooler.dense.weight": "pooler.dense.weight"})
    p, q, mapping = align_prefixes(tgt, ["backbone.encoder.layer.0.dense.weight", "head.weight"])
    assert (p, q) == ("", "backbone.") and len(mapping) == 1
    assert align_prefixes(["a.weight"], ["b.weight"]) is None          # a bare leaf says nothing
    # Two different mappings with the same support: ambiguous, nothing guessed.
    assert align_prefixes(["m.x.w", "m.y.w"], ["a.x.w", "b.y.w"]) is None
    # A predicate can veto pairs (transfer passes a shape check).
    assert align_prefixes(src, tgt, fits=lambda s, t: t.startswith("pooler"))[2] == {
        "bert.pooler.dense.weight": "pooler.dense.weight"}


def test_natural_key_orders_numbers_as_numbers():
    names = ["layer.10.w", "layer.2.w", "layer.1.w", "emb.w"]
    assert sorted(names, key=natural_key) == ["emb.w", "layer.1.w", "layer.2.w", "layer.10.w"]
