"""torchkeep.transfer on real architectures: every tensor's fate, and the numbers behind it."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.carry.adapters import ADAPTERS
from torchkeep import TransferError, transfer
from torchkeep.demo.models import (LeNet5, LeNet5Moon, LeNet6, TinyBert, TinyBertClassifier,
                                   TinyResNet)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_resnet(in_channels: int = 3, classes: int = 100) -> TinyResNet:
    """A ResNet whose BatchNorm statistics moved (so they differ from any fresh init)."""
    torch.manual_seed(1)
    m = TinyResNet(in_channels, classes)
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(4, in_channels, 8, 8) * 3 + 1)
    return m


def assert_loaded_from(target: nn.Module, before: dict, source_sd: dict, report) -> None:
    """Loaded tensors equal their source; everything else kept its value."""
    after = target.state_dict()
    for t, s in report.loaded.items():
        if t not in report.adapted:
            assert torch.equal(after[t], source_sd[s].to(after[t].dtype)), t
    for t in report.missing:
        assert torch.equal(after[t], before[t]), t


# ------------------------------------------------------------------------ the seed's story
def test_lenet5_into_lenet6_loads_the_first_four_layers():
    torch.manual_seed(0)
    src, dst = LeNet5(), LeNet6()
    before = snapshot(dst)
    params_before = dict(dst.named_parameters())
    report = transfer(dst, src)

    reused = ["conv.0.weight", "conv.0.bias", "conv.3.weight", "conv.3.bias",
              "fc.1.weight", "fc.1.bias", "fc.3.weight", "fc.3.bias"]
    assert report.loaded == {k: k for k in reused}
    assert set(report.reasons.values()) == {"exact"}
    assert report.adapted == {}
    assert report.missing == ["fc.5.weight", "fc.5.bias", "fc.7.weight", "fc.7.bias"]
    assert set(report.unused) == {"fc.5.weight", "fc.5.bias"}
    assert "[10, 84] does not fit fc.5.weight [64, 84]" in report.unused["fc.5.weight"]
    assert report.why_missing["fc.5.weight"] == "source fc.5.weight is [10, 84]"
    assert_loaded_from(dst, before, src.state_dict(), report)
    # The Parameter objects are the same ones (an optimizer built before stays valid).
    assert all(p is params_before[n] for n, p in dst.named_parameters())
    text = str(report)
    assert "loaded 8 of 12 target tensors, 90.9% of the elements (0 adapted), 4 missing" in text
    assert "2 of 10 source tensors unused" in text
    assert text.count("\nunused ") == 2 and text.count("\nmissing ") == 4
    assert not report.ok and report.applied


def test_renamed_moon_sequential_is_matched_by_structure():
    torch.manual_seed(0)
    src, dst = LeNet5(), LeNet5Moon()
    before = snapshot(dst)
    report = transfer(dst, src)
    assert report.ok, str(report)
    assert report.loaded["moon.0.weight"] == "conv.0.weight"
    assert report.loaded["moon.3.bias"] == "conv.3.bias"
    assert report.loaded["moon.7.weight"] == "fc.1.weight"
    assert report.loaded["moon.9.bias"] == "fc.3.bias"
    assert report.loaded["moon.11.weight"] == "fc.5.weight"
    assert report.reasons["moon.7.weight"].startswith("structure: module fc.1 -> moon.7")
    assert_loaded_from(dst, before, src.state_dict(), report)
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(dst(x), src(x))

    # Back the other way, and into LeNet6 (whose fc.5 no longer fits).
    back = transfer(LeNet5(), dst)
    assert back.ok and back.loaded["fc.1.weight"] == "moon.7.weight"
    six = transfer(LeNet6(), dst)
    assert set(six.loaded.values()) == {f"moon.{i}.{w}" for i in (0, 3, 7, 9) for w in ("weight", "bias")}
    assert set(six.unused) == {"moon.11.weight", "moon.11.bias"}


def test_match_name_leaves_renamed_modules_alone():
    report = transfer(LeNet5Moon(), LeNet5(), match="name", dry_run=True)
    assert "moon.7.weight" in report.missing
    assert report.unused["fc.1.weight"] == "no counterpart in the target"
    exact = transfer(LeNet5Moon(), LeNet5(), match="exact", dry_run=True)
    assert not exact.loaded
    only_structure = transfer(LeNet5Moon(), LeNet5(), match="structure", dry_run=True)
    assert only_structure.ok
    assert set(only_structure.methods()) == {"structure"}
    with pytest.raises(ValueError, match="match="):
        transfer(LeNet5(), LeNet5(), match="fuzzy")


# ------------------------------------------------------------------------------ ResNet
def test_resnet_into_one_channel_and_ten_classes():
    src = trained_resnet(3, 100)
    torch.manual_seed(2)
    dst = TinyResNet(1, 10)
    before = snapshot(dst)
    report = transfer(dst, src)
    sd = src.state_dict()

    assert report.adapted == {"conv1.weight": "in_channels 3->1: summed over input channels"}
    assert torch.allclose(dst.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    # A head with fewer classes keeps its init (the source rows are another task's classes).
    assert report.missing == ["fc.weight", "fc.bias"]
    assert "fewer classes" in report.unused["fc.weight"]
    assert torch.equal(dst.fc.weight, before["fc.weight"])
    # BatchNorm running statistics and num_batches_tracked come along.
    assert report.loaded["layer2.0.bn1.running_var"] == "layer2.0.bn1.running_var"
    assert torch.equal(dst.layer2[0].bn1.running_mean, src.layer2[0].bn1.running_mean)
    assert int(dst.bn1.num_batches_tracked) == 2
    assert not torch.equal(dst.bn1.running_mean, before["bn1.running_mean"])
    assert_loaded_from(dst, before, sd, report)
    # The adapted stem sees a grey image as the source saw it copied to three channels.
    src.eval()
    dst.eval()
    grey = torch.randn(2, 1, 8, 8)
    stem_src = src.conv1(grey.repeat(1, 3, 1, 1))
    assert torch.allclose(dst.conv1(grey), stem_src, atol=1e-5)


def test_first_conv_one_to_three_channels_tiles_and_rescales():
    torch.manual_seed(3)
    src, dst = TinyResNet(1, 10), TinyResNet(3, 10)
    report = transfer(dst, src)
    assert report.adapted["conv1.weight"] == "in_channels 1->3: tiled and scaled by 1/3"
    expected = src.conv1.weight.repeat(1, 3, 1, 1) / 3
    assert torch.allclose(dst.conv1.weight, expected)
    grey = torch.randn(2, 1, 8, 8)
    assert torch.allclose(dst.conv1(grey.repeat(1, 3, 1, 1)), src.conv1(grey), atol=1e-5)
    assert report.ok


def test_classifier_that_gains_classes_keeps_old_rows():
    torch.manual_seed(4)
    src, dst = TinyResNet(3, 10), TinyResNet(3, 12)
    before = snapshot(dst)
    report = transfer(dst, src)
    assert report.ok
    assert report.adapted["fc.weight"].startswith("rows: 10 copied, 2 new rows keep their init")
    assert torch.equal(dst.fc.weight[:10], src.fc.weight)
    assert torch.equal(dst.fc.weight[10:], before["fc.weight"][10:])
    assert torch.equal(dst.fc.bias[:10], src.fc.bias)


def test_adapters_can_be_disabled_one_by_one():
    src = TinyResNet(3, 10)
    off = transfer(TinyResNet(1, 12), src, adapt=False, dry_run=True)
    assert off.unused["conv1.weight"].endswith("(adapter 'in_channels' disabled)")
    assert off.unused["fc.weight"].endswith("(adapter 'rows' disabled)")
    some = transfer(TinyResNet(1, 12), src, adapt={"rows"}, dry_run=True)
    assert set(some.adapted) == {"fc.weight", "fc.bias"} and "conv1.weight" in some.missing
    with pytest.raises(ValueError, match="unknown adapter"):
        transfer(LeNet5(), LeNet5(), adapt={"magic"})


def test_hidden_layer_rows_are_never_adapted():
    # LeNet6's fc.5 (a hidden 84->64 layer) into LeNet5's classifier fc.5 (84->10): the names
    # agree and only the rows differ, but the source is not a classifier.
    report = transfer(LeNet5(), LeNet6(), dry_run=True)
    assert "fc.5.weight" in report.missing and not report.adapted


def test_dtype_cast_is_an_adapter():
    torch.manual_seed(5)
    src = {k: v.half() for k, v in LeNet5().state_dict().items()}
    dst = LeNet5()
    report = transfer(dst, src)
    assert report.ok
    assert report.adapted["fc.1.weight"] == "cast float16 -> float32"
    assert dst.fc[1].weight.dtype == torch.float32
    assert torch.equal(dst.fc[1].weight, src["fc.1.weight"].float())
    refused = transfer(LeNet5(), src, adapt=False, dry_run=True)
    assert "dtype float16 does not fit conv.0.weight float32" in refused.unused["conv.0.weight"]


# -------------------------------------------------------------------------------- BERT
def test_bert_encoder_into_classifier_and_back():
    torch.manual_seed(6)
    enc = TinyBert()
    cls = TinyBertClassifier(num_labels=3)
    before = snapshot(cls)
    report = transfer(cls, enc)
    assert report.missing == ["classifier.weight", "classifier.bias"]
    assert report.unused == {}
    assert report.loaded["bert.encoder.layer.1.attention.self.query.weight"] == \
        "encoder.layer.1.attention.self.query.weight"
    assert set(report.methods()) == {"prefix"}
    assert report.reasons["bert.pooler.dense.bias"] == "prefix '' -> 'bert.'"
    assert_loaded_from(cls, before, enc.state_dict(), report)
    ids = torch.randint(0, 100, (2, 9))
    enc.eval()
    cls.eval()
    assert torch.allclose(cls.bert(ids)[1], enc(ids)[1], atol=1e-6)

    back = TinyBert()
    rev = transfer(back, cls)
    assert rev.missing == [] and set(rev.unused) == {"classifier.weight", "classifier.bias"}
    assert rev.reasons["embeddings.word_embeddings.weight"] == "prefix 'bert.' -> ''"
    assert torch.equal(back.embeddings.word_embeddings.weight, cls.bert.embeddings.word_embeddings.weight)


def test_embedding_rows_follow_a_resized_vocabulary():
    torch.manual_seed(7)
    src = TinyBert(vocab_size=100)
    grown, cut = TinyBert(vocab_size=120), TinyBert(vocab_size=80)
    init = grown.embeddings.word_embeddings.weight.detach().clone()
    r1 = transfer(grown, src)
    r2 = transfer(cut, src)
    assert r1.ok and r2.ok
    w = src.embeddings.word_embeddings.weight
    assert torch.equal(grown.embeddings.word_embeddings.weight[:100], w)
    # New rows start at the mean of the old ones (as transformers' resize_token_embeddings does).
    assert torch.allclose(grown.embeddings.word_embeddings.weight[100:], w.mean(0).expand(20, -1))
    assert "20 new rows set to the old rows' mean" in r1.adapted["embeddings.word_embeddings.weight"]
    assert torch.equal(cut.embeddings.word_embeddings.weight, w[:80])
    assert "embedding cut 100->80" in r2.adapted["embeddings.word_embeddings.weight"]
    # Switched off, the new rows keep their init.
    plain = TinyBert(vocab_size=120)
    init = plain.embeddings.word_embeddings.weight.detach().clone()
    r3 = transfer(plain, src, adapt=set(ADAPTERS) - {"vocab_mean"})
    assert torch.equal(plain.embeddings.word_embeddings.weight[100:], init[100:])
    assert "keep their init" in r3.adapted["embeddings.word_embeddings.weight"]
    # Covariance-matched (named explicitly): new rows are drawn around the old rows' statistics.
    torch.manual_seed(0)
    cov = TinyBert(vocab_size=2000)
    big = TinyBert(vocab_size=1000)
    r4 = transfer(cov, big, adapt={"rows", "vocab_cov"})
    assert "drawn from the old rows' mean and covariance" in r4.adapted["embeddings.word_embeddings.weight"]
    old, new = big.embeddings.word_embeddings.weight, cov.embeddings.word_embeddings.weight[1000:]
    assert torch.allclose(new.mean(0), old.mean(0), atol=0.15)
    assert torch.allclose(torch.cov(new.T), torch.cov(old.T), atol=0.25)


# ------------------------------------------------------------- wrapped and stored sources
def test_dataparallel_and_compiled_sources_and_wrapped_target():
    torch.manual_seed(8)
    model = LeNet5()
    dp = nn.DataParallel(model).state_dict()
    assert next(iter(dp)).startswith("module.")
    r = transfer(LeNet5Moon(), dp)
    assert r.ok and r.stripped == ["module."]
    compiled = torch.compile(model).state_dict()
    assert next(iter(compiled)).startswith("_orig_mod.")
    dst = LeNet6()
    before = snapshot(dst)
    r = transfer(dst, compiled)
    assert r.stripped == ["_orig_mod."]
    assert len(r.loaded) == 8
    assert_loaded_from(dst, before, model.state_dict(), r)
    # A wrapped target: names gain 'module.' and the prefix alignment finds it.
    wrapped = nn.DataParallel(LeNet5())
    r = transfer(wrapped, model)
    assert r.ok and r.reasons["module.fc.5.bias"] == "prefix '' -> 'module.'"
    assert torch.equal(wrapped.module.fc[5].bias, model.fc[5].bias)


def test_checkpoint_files_and_training_dicts_as_sources(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(9)
    model = LeNet5()
    sd = model.state_dict()
    st = tmp_path / "lenet5.safetensors"
    save_file(sd, str(st))
    pt = tmp_path / "lenet5.pt"
    torch.save({"epoch": 3, "model_state_dict": nn.DataParallel(model).state_dict(),
                "optimizer_state_dict": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()}, pt)
    for source in (str(st), pt, torchkeep.open(st),
                   {"epoch": 3, "model_state_dict": sd}):
        dst = LeNet5Moon()
        before = snapshot(dst)
        r = transfer(dst, source)
        assert r.ok, (source, str(r))
        assert_loaded_from(dst, before, sd, r)
    r = transfer(LeNet5(), pt, dry_run=True)
    assert r.stripped == ["module."] and r.source == str(pt)
    with pytest.raises(TransferError, match="holds no tensors"):
        transfer(LeNet5(), {"epoch": 3})
    with pytest.raises(TransferError, match="cannot transfer from a int"):
        transfer(LeNet5(), 3)


def test_reads_only_the_tensors_it_uses(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "lenet5.safetensors"
    save_file(LeNet5().state_dict(), str(path))
    ckpt = torchkeep.open(path)
    reads: list[str] = []
    reader = ckpt.reader
    original = reader.load

    def spy(refs, device="cpu"):
        reads.extend(r.key if isinstance(r.key, str) else str(r.key) for r in refs)
        return original(refs, device)

    reader.load = spy
    transfer(LeNet6(), ckpt, dry_run=True)
    assert reads == []
    report = transfer(LeNet6(), ckpt)
    assert len(reads) == 8 and not any("fc.5" in k for k in reads)
    assert len(report.loaded) == 8


# --------------------------------------------------------------------- strict / dry run
def test_strict_lists_every_problem_and_changes_nothing():
    dst = LeNet6()
    before = snapshot(dst)
    with pytest.raises(TransferError) as e:
        transfer(dst, LeNet5(), strict=True)
    msg = str(e.value)
    for name in ("missing fc.5.weight", "missing fc.5.bias", "missing fc.7.weight",
                 "missing fc.7.bias", "unused fc.5.weight", "unused fc.5.bias"):
        assert name in msg
    assert e.value.report.counts["loaded"] == 8
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    assert transfer(LeNet5Moon(), LeNet5(), strict=True).ok


def test_dry_run_changes_nothing():
    dst = LeNet5()
    before = snapshot(dst)
    report = transfer(dst, LeNet5(), dry_run=True)
    assert report.ok and report.dry_run and not report.applied
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    assert "[dry run: nothing changed]" in str(report)


def test_optimizer_built_before_keeps_working_and_dtype_device_kept():
    torch.manual_seed(10)
    dst = LeNet5().double()
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    src = LeNet5()
    report = transfer(dst, src)
    assert all(h.startswith("cast float32 -> float64") for h in report.adapted.values())
    assert dst.fc[5].weight.dtype == torch.float64
    assert torch.equal(dst.fc[5].weight, src.fc[5].weight.double())
    dst(torch.randn(2, 1, 28, 28, dtype=torch.float64)).sum().backward()
    opt.step()
    assert not torch.equal(dst.fc[5].weight, src.fc[5].weight.double())  # the step moved it


def test_meta_target_needs_dry_run():
    with torch.device("meta"):
        dst = LeNet5()
    assert transfer(dst, LeNet5(), dry_run=True).ok
    with pytest.raises(TransferError, match="meta device"):
        transfer(dst, LeNet5())


# ------------------------------------------------------------------------- rules, ties
def test_rules_rename_sources_and_report_their_effect():
    torch.manual_seed(11)
    src = {f"backbone.{k}": v for k, v in LeNet5().conv.state_dict().items()}
    src["head.weight"] = torch.randn(10, 84)
    dst = LeNet5()
    report = transfer(dst, src, rules=[(r"^backbone\.", "conv."), "^head\\.=fc.5."],
                      match="exact")
    assert report.loaded["conv.3.weight"] == "backbone.3.weight"
    assert report.reasons["conv.3.weight"] == "rule '^backbone\\.': backbone.3.weight -> conv.3.weight"
    assert report.loaded["fc.5.weight"] == "head.weight"
    assert torch.equal(dst.fc[5].weight, src["head.weight"])
    # A rule whose result the target lacks says so.
    r = transfer(LeNet5(), {"x.weight": torch.zeros(3)}, rules={"^x": "nowhere"}, dry_run=True)
    assert "renamed it to 'nowhere.weight', which the target does not have" in r.unused["x.weight"]
    with pytest.raises(ValueError, match="REGEX=REPLACEMENT"):
        transfer(LeNet5(), LeNet5(), rules=["no-equals-sign"])


def test_tied_target_weights_count_as_loaded():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    src = {"emb.weight": torch.randn(10, 4)}  # as safetensors stores a tied pair: once
    dst = Tied()
    report = transfer(dst, src)
    assert report.missing == []
    assert report.reasons["out.weight"] == "tied to emb.weight (same storage)"
    assert torch.equal(dst.out.weight, src["emb.weight"])


def test_structure_refuses_ambiguous_alignments():
    four = torch.zeros(4, 4)
    src = {"b.weight": four, "a.weight": four, "head.weight": torch.zeros(2, 4)}
    dst = {"x.weight": four.clone(), "y.weight": four.clone(), "z.weight": four.clone(),
           "cls.weight": torch.ones(2, 4)}
    report = transfer(dst, src)
    assert report.loaded == {"cls.weight": "head.weight"}
    assert report.unused["a.weight"].startswith("ambiguous: module a fits 2 target modules")
    assert report.unused["b.weight"].endswith("equally by order and shape (x, y)")
    assert set(report.missing) == {"x.weight", "y.weight", "z.weight"}
    assert torch.equal(dst["cls.weight"], torch.zeros(2, 4))  # a mapping target is filled in place


def test_report_to_dict_is_json():
    report = transfer(LeNet6(), LeNet5(), dry_run=True)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["counts"] == {"target": 12, "source": 10, "loaded": 8, "adapted": 0,
                           "missing": 4, "unused": 2, "ambiguous": 0,
                           "target_elements": 66_946, "loaded_elements": 66_946 - 6_090,
                           "source_elements": 61_706, "unused_elements": 850}
    assert d["methods"] == {"exact": 8}
    assert d["target_shapes"]["fc.7.weight"] == [10, 64]
    assert d["dry_run"] is True and d["ok"] is False
