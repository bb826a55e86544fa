"""The HTML report on real torch.save files: single, before/after fine-tuning, untrusted names."""
from __future__ import annotations

import html
import os
import re

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.look.report.data import ReportOptions, prepare
from torchkeep.look.report.page import render_html
from torchkeep.look.report.writer import write_report
from torchkeep.look.stats import Thresholds


class Classifier(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                      nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.backbone(x), 1))


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    """A real fine-tuning run: the first conv frozen, the rest trained by SGD with momentum for
    a few steps; 'before' is the plain state dict, 'after' a training checkpoint with a wrapper.
    (A hand-written update: constructing a torch.optim optimizer costs seconds of imports.)"""
    d = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    model = Classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(model.state_dict(), d / "before.pt")
    for p in model.backbone[0].parameters():
        p.requires_grad_(False)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    momentum = {n: torch.zeros_like(p) for n, p in trained.items()}
    for _ in range(3):
        x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for n, p in trained.items():
                momentum[n].mul_(0.9).add_(p.grad)
                p.sub_(0.05 * momentum[n])
    after = model.state_dict()
    torch.save({"state_dict": after, "momentum": momentum, "epoch": 1}, d / "after.pt")
    return d, before, {k: v.clone() for k, v in after.items()}


def test_finetuning_pair(finetune, tmp_path):
    d, before, after = finetune
    out = tmp_path / "r.html"
    data = write_report(d / "before.pt", d / "after.pt", out)
    c = data.comparison
    frozen = {ch.name for ch in c.frozen}
    truly_unchanged = {n for n in before if torch.equal(before[n], after[n])}
    assert frozen == truly_unchanged
    assert {"backbone.0.weight", "backbone.0.bias"} <= frozen
    assert "head.weight" not in frozen and "backbone.3.running_mean" not in frozen
    rel = {ch.name: ch.rel_change for ch in c.changes}
    w0, w1 = before["head.weight"].double(), after["head.weight"].double()
    assert rel["head.weight"] == pytest.approx(float((w0 - w1).norm() / w0.norm()), rel=1e-9)
    assert not c.added and not c.removed and not c.reshaped
    assert data.sides[1].summary.wrapper == "state_dict"
    page = out.read_text()
    frozen_part = page[page.index('id="frozen"'):page.index('id="added"')]
    for name in frozen:
        assert f">{name}<" in frozen_part
    assert "head.weight" not in frozen_part
    for ident in ("change-chart", "change-top", "treemap", "modules-bars", "stats-0", "stats-1"):
        assert f'id="{ident}"' in page
    # one column per compared tensor, frozen ones grey
    chart = re.search(r'<svg id="change-chart".*?</svg>', page, re.S).group(0)
    assert chart.count('class="col"') == len(c.changes)
    assert len(re.findall(r'<rect class="col"[^>]*fill="#888"', chart)) == len(frozen)


def test_single_report_flags_odd_tensors(tmp_path):
    torch.manual_seed(1)
    sd = {"enc.weight": torch.randn(32, 16), "enc.bias": torch.zeros(32),
          "dead.weight": torch.zeros(8, 8), "boom.weight": torch.randn(8, 8) * 1e5,
          "sick.weight": torch.randn(8, 8), "bn.running_var": torch.full((8,), 1e4),
          "bn.num_batches_tracked": torch.tensor(12)}
    sd["sick.weight"][1, 2] = float("nan")
    sd["sick.weight"][0, 0] = float("inf")
    path = tmp_path / "odd.pt"
    torch.save({"model": sd}, path)
    out = tmp_path / "odd.html"
    data = write_report(path, out=out, options=ReportOptions(top=2))
    flags = {s.name: s.flags for s in data.sides[0].stats if s.flags}
    assert flags == {"dead.weight": ["dead"], "boom.weight": ["exploded"], "sick.weight": ["nonfinite"]}
    sick = next(s for s in data.sides[0].stats if s.name == "sick.weight")
    assert (sick.nan, sick.inf) == (1, 1)
    page = out.read_text()
    for i, s in enumerate(data.sides[0].stats):
        row = re.search(rf'<tr id="r-0-{i}"([^>]*)>', page).group(1)
        assert ("flagged" in row) == bool(s.flags), s.name
    assert 'class="flagged has-nonfinite"' in page
    # histograms: the 2 largest tensors plus the 3 flagged ones
    hists = {s.name for s in data.sides[0].stats if s.histogram}
    assert hists == {"enc.weight", "sick.weight", "dead.weight", "boom.weight"}
    assert page.count('class="chart hist"') == len(hists)
    s = data.sides[0]
    assert s.summary.format == "torch-zip" and s.summary.wrapper == "model" and s.verdict == "safe"
    assert "safe: loading it would run no code" in page


def test_names_from_the_checkpoint_are_escaped(tmp_path):
    evil = ['<script>alert("x")</script>.weight', '"><img src=x onerror=alert(1)>.bias',
            "a&b</td></tr></table><h1>pwned</h1>.w", "</style><style>*{display:none}</style>.w",
            "javascript:alert(1)//.w"]
    sd = {n: torch.randn(4, 4) for n in evil}
    sd[evil[1]] = torch.zeros(4, 4)  # flagged: its name also lands in the odd-tensors table
    path = tmp_path / "evil.pt"
    torch.save(sd, path)
    before = tmp_path / "before.pt"
    torch.save({n: torch.randn(4, 4) for n in evil[:3]} | {"<b>gone</b>": torch.ones(2)}, before)
    for data in (write_report(path, out=tmp_path / "1.html"),
                 write_report(before, path, tmp_path / "2.html")):
        page = render_html(data)
        assert page.count("<script") == 1 and page.count("</script>") == 1
        assert "<img" not in page and "<h1>pwned" not in page and "<b>gone" not in page
        assert page.count("<style>") == 1 and page.count("</style>") == 1
        assert 'href="javascript' not in page
        for name in evil:
            escaped = html.escape(name, quote=True)
            assert escaped in page
            if escaped != name:
                assert name not in page
    assert html.escape("<b>gone</b>") in page


def test_page_is_self_contained(finetune, tmp_path):
    d, _, _ = finetune
    data = write_report(d / "before.pt", d / "after.pt", tmp_path / "r.html")
    page = render_html(data)
    urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'<>]*", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert not re.search(r"\b(?:src|srcset)\s*=", page)
    assert "@import" not in page and "url(" not in page and "<link" not in page


def test_added_removed_reshaped_and_retyped(tmp_path):
    torch.manual_seed(2)
    a = {"body.weight": torch.randn(6, 4), "head.weight": torch.randn(10, 6),
         "old.weight": torch.randn(3), "emb.weight": torch.randn(5, 4)}
    b = {"body.weight": a["body.weight"].clone(), "head.weight": torch.randn(3, 6),
         "new.weight": torch.randn(2, 2), "emb.weight": a["emb.weight"].half()}
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    data = write_report(tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "r.html")
    c = data.comparison
    assert [n for n, _, _ in c.added] == ["new.weight"]
    assert [n for n, _, _ in c.removed] == ["old.weight"]
    assert [(k.name, k.shape_a, k.shape_b) for k in c.reshaped] == [("head.weight", (10, 6), (3, 6))]
    assert [(k.name, k.dtype_a, k.dtype_b) for k in c.retyped] == [("emb.weight", "float32", "float16")]
    assert [ch.name for ch in c.frozen] == ["body.weight"]
    emb = next(ch for ch in c.changes if ch.name == "emb.weight")
    assert not emb.unchanged and 0 < emb.rel_change < 1e-3  # float16 rounding only
    page = (tmp_path / "r.html").read_text()
    assert "(10, 6) → (3, 6)" in page and "float32 → float16" in page


def test_wrapped_and_prefixed_pair_is_compared_by_clean_names(small_net, tmp_path):
    torch.save(small_net.state_dict(), tmp_path / "plain.pt")
    dp = nn.DataParallel(small_net)
    with torch.no_grad():
        small_net.fc.weight.mul_(2)
    torch.save({"model": dp.state_dict()}, tmp_path / "dp.pt")
    data = write_report(tmp_path / "plain.pt", tmp_path / "dp.pt", tmp_path / "r.html")
    c = data.comparison
    assert not c.added and not c.removed
    assert data.sides[1].summary.prefixes == ["module."]
    assert {ch.name for ch in c.changed} == {"fc.weight"}
    assert next(ch for ch in c.changes if ch.name == "fc.weight").rel_change == pytest.approx(1.0)


def test_unsafe_checkpoint_is_reported_without_running_it(tmp_path, small_net):
    path = tmp_path / "unsafe.pt"
    torch.save({"model": small_net.state_dict(), "callback": os.system}, path)
    data = write_report(path, out=tmp_path / "r.html")
    side = data.sides[0]
    assert side.verdict == "unsafe"
    assert len(side.stats) == len(small_net.state_dict())
    page = (tmp_path / "r.html").read_text()
    assert "b-unsafe" in page and "system" in page


def test_all_tensors_includes_optimizer_state(finetune, tmp_path):
    d, _, after = finetune
    with prepare(d / "after.pt", options=ReportOptions(all_tensors=True)) as plan:
        assert plan.total_bytes == sum(e.nbytes for e in torchkeep.open(d / "after.pt").entries())
        data = plan.collect()
    names = [s.name for s in data.sides[0].stats]
    assert "momentum.head.weight" in names
    assert "state_dict.head.weight" in names and data.sides[0].source == "every tensor"


def test_safetensors_pair(tmp_path):
    pytest.importorskip("torchkeep.read.formats.safetensors", reason="safetensors reader not there yet")
    from safetensors.torch import save_file

    torch.manual_seed(3)
    a = {"x.weight": torch.randn(64, 32), "y.bias": torch.randn(32)}
    b = {"x.weight": a["x.weight"], "y.bias": a["y.bias"] + 1}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    data = write_report(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "r.html",
                        options=ReportOptions(chunk=100))
    assert data.sides[0].summary.format == "safetensors" and data.sides[0].verdict == "safe"
    assert [ch.name for ch in data.comparison.frozen] == ["x.weight"]
    st = next(s for s in data.sides[1].stats if s.name == "x.weight")
    assert st.std == pytest.approx(float(a["x.weight"].double().std(correction=0)), rel=1e-9)


def test_report_cli(finetune, cli, tmp_path):
    d, _, _ = finetune
    out = tmp_path / "cli.html"
    p = cli("report", str(d / "before.pt"), str(d / "after.pt"), "-o", str(out), "--top", "3",
            "--explode-at", "0.5", check=True)
    assert p.stderr == ""  # no progress bar when piped
    assert f"wrote {out}" in p.stdout and "2 unchanged" in p.stdout
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "exploded" in page


def test_report_cli_error_is_one_line(tmp_path, capsys):
    from torchkeep.cli import main

    assert main(["report", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchkeep: error:") and "missing.pt" in err and err.count("\n") == 1
    assert not (tmp_path / "x.html").exists()


def test_thresholds_come_from_options(tmp_path):
    torch.save({"w": torch.randn(8, 8) * 10}, tmp_path / "w.pt")
    strict = write_report(tmp_path / "w.pt", out=tmp_path / "a.html",
                          options=ReportOptions(thresholds=Thresholds(explode_at=1.0)))
    assert strict.sides[0].stats[0].flags == ["exploded"]
    lax = write_report(tmp_path / "w.pt", out=tmp_path / "b.html")
    assert lax.sides[0].stats[0].flags == []


def test_torchkeep_training_state_folders(tmp_path, small_net):
    manager = pytest.importorskip("torchkeep.keep.manager", reason="CheckpointManager not there yet")
    from torchkeep.keep.trainstate import TrainState

    state = TrainState(model=small_net)
    with manager.CheckpointManager(tmp_path / "run", keep_last=3) as mgr:
        mgr.save(state, 1)
        with torch.no_grad():
            small_net.fc.weight.mul_(1.5)
        mgr.save(state, 2)
    first = next(p for p in (tmp_path / "run").iterdir() if p.name.endswith("1"))
    data = torchkeep.write_report(first, tmp_path / "run", tmp_path / "r.html")
    c = data.comparison
    assert {ch.name for ch in c.changed} == {"fc.weight"}
    assert len(c.frozen) == len(small_net.state_dict()) - 1
    assert data.sides[0].summary.format == "torchkeep"
