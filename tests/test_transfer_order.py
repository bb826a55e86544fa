"""Order is evidence only where the format keeps it: renamed models from safetensors (sorted
keys) and shuffled mappings are matched by shapes, name tokens and indices, and a transfer may
load fewer tensors but never a wrong one."""
from __future__ import annotations

import logging
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import torchkeep
from torchkeep import TransferError, transfer
from torchkeep.demo.models import LeNet5, TinyResNet


def assert_never_wrong(report, truth: dict[str, str]) -> None:
    """Every loaded target got the source tensor the ground truth names for it."""
    wrong = {t: (s, truth.get(t)) for t, s in report.loaded.items()
             if not report.reasons[t].startswith("tied") and truth.get(t) != s}
    assert not wrong, f"wrong assignments: {wrong}\n{report}"


# --------------------------------------------------------------------- order per format
def test_formats_say_whether_they_keep_order(tmp_path):
    sd = LeNet5().state_dict()
    torch.save(sd, tmp_path / "a.pt")
    save_file(sd, str(tmp_path / "a.safetensors"))
    assert torchkeep.open(tmp_path / "a.pt").order_known
    assert not torchkeep.open(tmp_path / "a.safetensors").order_known


# ---------------------------------------------------------------- ViT: stored vs current
class _Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))


class _Mlp(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)


class _Layer(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.attention = _Attn(d)
        self.layernorm_before, self.layernorm_after = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = _Mlp(d, f)


class CurrentViT(nn.Module):
    """A ViT encoder with q_proj/k_proj/v_proj/o_proj names (transformers' current naming)."""

    def __init__(self, d: int = 16, f: int = 32, n: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(d, f) for _ in range(n))
        self.layernorm = nn.LayerNorm(d)


def stored_vit_names(name: str) -> str:
    """The same tensor under transformers ViT's stored names."""
    for a, b in ((".attention.q_proj.", ".attention.attention.query."),
                 (".attention.k_proj.", ".attention.attention.key."),
                 (".attention.v_proj.", ".attention.attention.value."),
                 (".attention.o_proj.", ".attention.output.dense."),
                 (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense.")):
        name = name.replace(a, b)
    return name.replace("layers.", "encoder.layer.", 1)


def test_vit_stored_names_into_current_names_from_safetensors(tmp_path):
    torch.manual_seed(0)
    src = CurrentViT()
    sd = {stored_vit_names(k): v for k, v in src.state_dict().items()}
    path = tmp_path / "vit.safetensors"
    save_file(sd, str(path))
    dst = CurrentViT()
    report = transfer(dst, path)
    truth = {k: stored_vit_names(k) for k in dst.state_dict()}
    assert_never_wrong(report, truth)
    assert report.ok, str(report)
    for name, value in dst.state_dict().items():
        assert torch.equal(value, sd[truth[name]]), name
    assert "source order unknown" in report.reasons["layers.2.attention.q_proj.weight"]


def test_order_does_not_pair_contradicting_names():
    # Registration order that disagrees with the names: order alone would pair query with k_proj.
    torch.manual_seed(1)
    w = {n: torch.randn(4, 4) for n in ("query", "key")}
    src = {"attn.query.weight": w["query"], "attn.key.weight": w["key"], "zz.weight": torch.randn(3)}
    dst = {"blk.k_proj.weight": torch.zeros(4, 4), "blk.q_proj.weight": torch.zeros(4, 4),
           "head.weight": torch.zeros(3)}
    report = transfer(dst, src, order="known")
    assert "blk.k_proj.weight" in report.missing and "blk.q_proj.weight" in report.missing
    assert "names say" in report.unused["attn.query.weight"]
    # Without order the names pair them the right way round.
    report = transfer(dst, src, order="unknown")
    assert report.loaded == {"blk.k_proj.weight": "attn.key.weight", "blk.q_proj.weight": "attn.query.weight",
                             "head.weight": "zz.weight"}
    assert torch.equal(dst["blk.q_proj.weight"], w["query"])
    with pytest.raises(ValueError, match="order="):
        transfer(dst, src, order="sometimes")


# ------------------------------------------------------------- ResNet-18, renamed, safetensors
def resnet18() -> TinyResNet:
    torch.manual_seed(2)
    m = TinyResNet(3, 10, widths=(8, 16, 32, 64), blocks=(2, 2, 2, 2))
    with torch.no_grad():  # BatchNorm statistics that differ from any init
        for name, b in m.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    return m


def renamed_stages(name: str) -> str:
    """torchvision names -> stem/stages/head (inner block names kept)."""
    if name.startswith("conv1."):
        return "stem.conv." + name[len("conv1."):]
    if name.startswith("bn1."):
        return "stem.norm." + name[len("bn1."):]
    if name.startswith("fc."):
        return "head." + name[len("fc."):]
    stage, rest = name.split(".", 1)
    return f"stages.{int(stage[len('layer'):]) - 1}.blocks.{rest}"


def renamed_flat(name: str) -> str:
    """torchvision names -> one flat body.K list with conv_a/norm_a/conv_b/norm_b (no ordinals)."""
    if not name.startswith("layer"):
        return {"conv1": "stem.0", "bn1": "stem.1", "fc": "classifier"}[name.split(".")[0]] + \
            "." + name.split(".", 1)[1]
    stage, block, rest = name.split(".", 2)
    k = (int(stage[len("layer"):]) - 1) * 2 + int(block)
    for a, b in (("conv1", "conv_a"), ("bn1", "norm_a"), ("conv2", "conv_b"), ("bn2", "norm_b"),
                 ("downsample.0", "shortcut.conv"), ("downsample.1", "shortcut.norm")):
        if rest.startswith(a + "."):
            rest = b + rest[len(a):]
            break
    return f"body.{k}.{rest}"


@pytest.mark.parametrize("scheme", [renamed_stages, renamed_flat])
def test_renamed_resnet18_from_safetensors_never_wrong(tmp_path, scheme, caplog):
    src = resnet18()
    sd = src.state_dict()
    assert len(sd) == 122
    path = tmp_path / "r18.safetensors"
    save_file(sd, str(path))
    dst = {scheme(k): torch.zeros_like(v) for k, v in sd.items()}
    truth = {scheme(k): k for k in sd}
    with caplog.at_level(logging.WARNING, logger="torchkeep.carry.planner"):
        report = transfer(dst, path)
    assert_never_wrong(report, truth)
    for t in report.loaded:
        assert torch.equal(dst[t], sd[truth[t]]), t
    if scheme is renamed_stages:
        assert report.ok, str(report)      # names and indices single every module out
        assert not caplog.records
    else:
        # conv_a/conv_b (and norm_a/norm_b) of one block have equal shapes and say nothing about
        # which is which: those are ambiguous, reported and left at init, never guessed.
        assert report.ambiguous and report.missing
        assert "ambiguous, not guessed" in report.headline()
        assert any("largest kept at init" in r.getMessage() for r in caplog.records)
    # From a torch.save file (registration order kept) the renamed model loads completely.
    pt = tmp_path / "r18.pt"
    torch.save(sd, pt)
    dst2 = {scheme(k): torch.zeros_like(v) for k, v in sd.items()}
    full = transfer(dst2, pt)
    assert_never_wrong(full, truth)
    assert full.ok, str(full)


# ---------------------------------------------------------------- properties over schemes
PARTS = ("q", "k", "v", "o", "n1", "n2", "fc1", "fc2")
SCHEMES = {
    "bert": {"q": "encoder.layer.{i}.attention.self.query", "k": "encoder.layer.{i}.attention.self.key",
             "v": "encoder.layer.{i}.attention.self.value", "o": "encoder.layer.{i}.attention.output.dense",
             "n1": "encoder.layer.{i}.attention.output.LayerNorm", "fc1": "encoder.layer.{i}.intermediate.dense",
             "fc2": "encoder.layer.{i}.output.dense", "n2": "encoder.layer.{i}.output.LayerNorm"},
    "vit": {"q": "encoder.layer.{i}.attention.attention.query", "k": "encoder.layer.{i}.attention.attention.key",
            "v": "encoder.layer.{i}.attention.attention.value", "o": "encoder.layer.{i}.attention.output.dense",
            "n1": "encoder.layer.{i}.layernorm_before", "n2": "encoder.layer.{i}.layernorm_after",
            "fc1": "encoder.layer.{i}.intermediate.dense", "fc2": "encoder.layer.{i}.output.dense"},
    "llama": {"q": "model.layers.{i}.self_attn.q_proj", "k": "model.layers.{i}.self_attn.k_proj",
              "v": "model.layers.{i}.self_attn.v_proj", "o": "model.layers.{i}.self_attn.o_proj",
              "n1": "model.layers.{i}.input_layernorm", "n2": "model.layers.{i}.post_attention_layernorm",
              "fc1": "model.layers.{i}.mlp.up_proj", "fc2": "model.layers.{i}.mlp.down_proj"},
    "timm": {"q": "blocks.{i}.attn.q", "k": "blocks.{i}.attn.k", "v": "blocks.{i}.attn.v",
             "o": "blocks.{i}.attn.proj", "n1": "blocks.{i}.norm1", "n2": "blocks.{i}.norm2",
             "fc1": "blocks.{i}.mlp.fc1", "fc2": "blocks.{i}.mlp.fc2"},
    "gpt_neox": {"q": "h.{i}.attention.query", "k": "h.{i}.attention.key", "v": "h.{i}.attention.value",
                 "o": "h.{i}.attention.dense", "n1": "h.{i}.ln_1", "n2": "h.{i}.ln_2",
                 "fc1": "h.{i}.mlp.dense_h_to_4h", "fc2": "h.{i}.mlp.dense_4h_to_h"},
    "numbered": {p: f"h.{{i}}.{j}" for j, p in enumerate(PARTS)},
    "flat": {"q": "trunk_blocks_{i}_attn_q", "k": "trunk_blocks_{i}_attn_k", "v": "trunk_blocks_{i}_attn_v",
             "o": "trunk_blocks_{i}_attn_out", "n1": "trunk_blocks_{i}_ln_1", "n2": "trunk_blocks_{i}_ln_2",
             "fc1": "trunk_blocks_{i}_mlp_in", "fc2": "trunk_blocks_{i}_mlp_out"},
}


def canonical_model(layers: int, d: int, f: int, bias: bool) -> list[tuple[str, str, tuple[int, ...]]]:
    """(canonical module, leaf, shape) of a small transformer encoder, in registration order."""
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "n1": (d,), "n2": (d,),
              "fc1": (f, d), "fc2": (d, f)}
    out = []
    for i in range(layers):
        for p in PARTS:
            out.append((f"{i}:{p}", "weight", shapes[p]))
            if bias or p in ("n1", "n2"):
                out.append((f"{i}:{p}", "bias", (shapes[p][0],)))
    return out


def name_in(scheme: str, module: str, leaf: str) -> str:
    i, p = module.split(":")
    return SCHEMES[scheme][p].format(i=i) + "." + leaf


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src_scheme=st.sampled_from(sorted(SCHEMES)), dst_scheme=st.sampled_from(sorted(SCHEMES)),
       layers=st.integers(1, 3), d=st.sampled_from([4, 6]), f_same=st.booleans(),
       bias=st.booleans(), how=st.sampled_from(["shuffled", "sorted", "reversed"]),
       seed=st.integers(0, 2**16))
def test_renamed_transformers_never_load_a_wrong_tensor(src_scheme, dst_scheme, layers, d, f_same,
                                                        bias, how, seed):
    model = canonical_model(layers, d, d if f_same else 2 * d, bias)
    gen = torch.Generator().manual_seed(seed)
    values = {(m, leaf): torch.randn(shape, generator=gen) for m, leaf, shape in model}
    src = {name_in(src_scheme, m, leaf): values[(m, leaf)] for m, leaf, _ in model}
    names = list(src)
    if how == "shuffled":
        random.Random(seed).shuffle(names)
    elif how == "sorted":
        names.sort()
    else:
        names.reverse()
    src = {n: src[n] for n in names}
    dst = {name_in(dst_scheme, m, leaf): torch.zeros(shape) for m, leaf, shape in model}
    truth = {name_in(dst_scheme, m, leaf): name_in(src_scheme, m, leaf) for m, leaf, _ in model}
    report = transfer(dst, src, order="unknown", allow_empty=True)
    assert_never_wrong(report, truth)
    for t in report.loaded:
        assert torch.equal(dst[t], src[truth[t]])
    if src_scheme == dst_scheme:
        assert report.ok
    # Registration order kept on both sides: order is evidence, names can only veto.
    ordered = {name_in(src_scheme, m, leaf): values[(m, leaf)] for m, leaf, _ in model}
    dst2 = {name_in(dst_scheme, m, leaf): torch.zeros(shape) for m, leaf, shape in model}
    report = transfer(dst2, ordered, order="known", allow_empty=True)
    assert_never_wrong(report, truth)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_equal_shaped_siblings_without_evidence_are_ambiguous(n, seed):
    gen = torch.Generator().manual_seed(seed)
    src = {f"left.{name}.weight": torch.randn(3, 3, generator=gen)
           for name in random.Random(seed).sample(["alpha", "beta", "gamma", "delta", "eps"], n)}
    dst = {f"right.{name}.weight": torch.zeros(3, 3) for name in ("one", "two", "three", "four", "five")[:n]}
    report = transfer(dst, src, order="unknown", allow_empty=True)
    assert not report.loaded
    assert len(report.ambiguous) == n


# ---------------------------------------------------------------------------------- loud
def test_nothing_loaded_raises_with_the_report_unless_allowed():
    dst = LeNet5()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    unrelated = {"encoder.weight": torch.randn(7, 7), "decoder.bias": torch.randn(5)}
    with pytest.raises(TransferError, match="loaded nothing") as e:
        transfer(dst, unrelated)
    assert "dry_run=True" in str(e.value) and "allow_empty=True" in str(e.value)
    assert e.value.report.counts["loaded"] == 0
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    report = transfer(dst, unrelated, allow_empty=True)
    assert not report.loaded and not report.applied
    assert not transfer(dst, unrelated, dry_run=True).loaded  # a dry run only warns


def test_partial_transfer_warns_with_the_largest_missing(caplog, tmp_path):
    torch.manual_seed(3)
    sd = LeNet5().state_dict()
    del sd["fc.1.weight"]
    with caplog.at_level(logging.WARNING, logger="torchkeep.carry.planner"):
        report = transfer(LeNet5(), sd)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1
    assert "loaded 9 of 10 target tensors, 22.2% of the elements" in msgs[0]
    assert "largest kept at init: fc.1.weight [120, 400] (48,000 elements)" in msgs[0]
    assert report.headline() in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="torchkeep.carry.planner"):
        assert transfer(LeNet5(), LeNet5()).ok
    assert not caplog.records  # a complete transfer is quiet


def test_mostly_unused_source_warns(caplog):
    big = LeNet5().state_dict()
    small = {"conv.0.weight": torch.zeros_like(big["conv.0.weight"]),
             "conv.0.bias": torch.zeros_like(big["conv.0.bias"])}
    with caplog.at_level(logging.WARNING, logger="torchkeep.carry.planner"):
        report = transfer(small, big)
    assert report.loaded and not report.missing
    msg = caplog.records[-1].getMessage()
    assert "of the source's elements unused, largest: fc.1.weight" in msg
