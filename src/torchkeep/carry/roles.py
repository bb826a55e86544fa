"""What names, module types and positions say about tensors before any pairing: the roles the
adapters need ('first_conv', 'classifier', 'embedding', 'position'), and whether a list of
names is in an order that could be evidence (a sorted list is not)."""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import nn

from torchkeep.read import keys

__all__ = ["is_position_table", "module_roles", "order_roles"]


def _join(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


_POSITION_NAMES = frozenset({"pos_embed", "pos_embedding", "position_embedding", "position_embeddings",
                             "positional_embedding", "absolute_pos_embed", "wpe", "embed_positions",
                             "pos_emb", "position_emb"})


def is_position_table(name: str) -> bool:
    """Whether a tensor name is an absolute position embedding (``pos_embed``,
    ``embeddings.position_embeddings.weight``, ``wpe.weight``, ...)."""
    segs = name.lower().split(".")
    return bool(_POSITION_NAMES & set(segs[-2:]))


def module_roles(model: nn.Module) -> dict[str, str]:
    """Roles of a model's tensors for the adapters, from module types and names: the first
    convolution's weight ('first_conv'), the last Linear's weight and bias ('classifier'),
    embedding tables ('embedding'), absolute position embeddings ('position')."""
    roles: dict[str, str] = {}
    first_conv = None
    last_linear: tuple[str, nn.Linear] | None = None
    for name, m in model.named_modules():
        if (first_conv is None and isinstance(m, nn.modules.conv._ConvNd)
                and not m.transposed and m.groups == 1):
            first_conv = name
        if isinstance(m, nn.Linear):
            last_linear = (name, m)
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            roles[_join(name, "weight")] = "embedding"
    if first_conv is not None:
        roles[_join(first_conv, "weight")] = "first_conv"
    if last_linear is not None:
        name, m = last_linear
        # A last Linear with a row per token of an input embedding is the output embedding (an
        # untied LM head): its rows follow the vocabulary, not a task's classes.
        vocab = {(e.num_embeddings, e.embedding_dim) for e in model.modules() if isinstance(e, nn.Embedding)}
        role = "embedding" if (m.out_features, m.in_features) in vocab else "classifier"
        roles[_join(name, "weight")] = role
        if m.bias is not None:
            roles[_join(name, "bias")] = role
    for name, _ in model.named_parameters():
        if is_position_table(name):
            roles[name] = "position"
    return roles


_LM_HEADS = frozenset({"lm_head", "embed_out", "output", "decoder", "head"})


def order_roles(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Roles guessed from names and order when no module is at hand (a checkpoint's tensors):
    embeddings and position tables by name, the first 3-5-d weight as the first conv, an LM
    head the shape of an embedding table as an (output) embedding, the last 2-d weight (and its
    bias) as the classifier."""
    roles: dict[str, str] = {}
    first_conv = None
    last_2d = None
    for n in names:
        if is_position_table(n) and len(shapes[n]) in (2, 3, 4):
            roles[n] = "position"
            continue
        path, _, leaf = n.rpartition(".")
        if leaf != "weight":
            continue
        nd = len(shapes[n])
        last_seg = path.rpartition(".")[2].lower()
        if nd == 2 and ("emb" in last_seg or last_seg in ("wte", "wpe")):
            roles[n] = "embedding"
        elif nd == 2:
            last_2d = n
        elif 3 <= nd <= 5 and first_conv is None:
            first_conv = n
    if first_conv is not None:
        roles[first_conv] = "first_conv"
    vocab = {tuple(shapes[n]) for n, r in roles.items() if r == "embedding"}
    for n in names:  # untied LM heads by name and shape, wherever the order puts them
        path, _, leaf = n.rpartition(".")
        if leaf == "weight" and tuple(shapes[n]) in vocab and path.rpartition(".")[2] in _LM_HEADS:
            roles[n] = "embedding"
            if path + ".bias" in shapes and len(shapes[path + ".bias"]) == 1:
                roles[path + ".bias"] = "embedding"
    if last_2d is not None and last_2d not in roles:
        role = "embedding" if tuple(shapes[last_2d]) in vocab else "classifier"  # an untied LM head
        roles[last_2d] = role
        bias = last_2d[: -len("weight")] + "bias"
        if bias in shapes and len(shapes[bias]) == 1 and shapes[bias][0] == shapes[last_2d][0]:
            roles[bias] = role
    return roles


def _is_sorted(names: Sequence[str]) -> bool:
    return all(a <= b for a, b in zip(names, names[1:]))


def _looks_sorted(names: Sequence[str]) -> bool:
    """Sorted as text or naturally ('layer.2' before 'layer.10'): an order that is no evidence."""
    if len(names) < 3:
        return False
    if _is_sorted(names):
        return True
    prev = keys.natural_key(names[0])
    for n in names[1:]:  # stops at the first step back (registration order has one early)
        cur = keys.natural_key(n)
        if cur < prev:
            return False
        prev = cur
    return True


def _role_order(names: list[str]) -> list[str]:
    return sorted(names, key=keys.natural_key) if _is_sorted(names) else names
