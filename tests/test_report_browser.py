"""The HTML report rendered by a real headless Chromium: charts present, script ran, no errors.

Console messages (errors, uncaught exceptions) reach Chromium's stderr log with
``--enable-logging=stderr``; the report itself never logs, so any console line is a failure.
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest
import torch

from torchkeep.look.report.data import ReportOptions
from torchkeep.look.report.writer import write_report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed: the browser test needs it (Debian: "
                             "`apt-get install chromium`; `make test` installs it when run as root)")


def chromium(tmp_path, url: str, *args: str) -> tuple[str, list[str]]:
    """Run headless Chromium on ``url``; (stdout, console lines from its log)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
           "--v=0", *args, url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, [line for line in p.stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def pair_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    a = {f"layers.{i}.weight": torch.randn(32, 32) for i in range(6)}
    a |= {f"layers.{i}.bias": torch.zeros(32) for i in range(6)}
    a["embed.weight"] = torch.randn(100, 32)
    b = {k: v + 0.01 * (i % 3) * torch.randn_like(v) for i, (k, v) in enumerate(a.items())}
    b["layers.5.weight"][0, 0] = float("nan")
    b["head.weight"] = torch.randn(10, 32)
    torch.save(a, d / "a.pt")
    torch.save({"model": b}, d / "b.pt")
    out = d / "report.html"
    data = write_report(d / "a.pt", d / "b.pt", out, options=ReportOptions(top=4))
    return out, data


# Appended to a copy of the page: click "std" of b's table (sort ascending) and tick
# "only flagged" of a's table, as a user would.
CLICKS = """<script>
document.querySelectorAll("#stats-1 thead th")[6].click();
document.querySelector('input.flag-filter[data-table="stats-0"]').click();
</script>"""


def test_charts_render_and_script_runs_without_console_errors(pair_report, tmp_path):
    out, data = pair_report
    page = tmp_path / "clicked.html"
    page.write_text(out.read_text().replace("</body>", CLICKS + "</body>"))
    dom, console = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert console == [], console
    assert re.search(r'<html[^>]*data-js="on"', dom), "the inline script did not run"
    for ident in ("treemap", "modules-bars", "change-chart", "change-top", "stats-0", "stats-1"):
        assert f'id="{ident}"' in dom, ident
    n_hist = len({s.name for side in data.sides for s in side.stats if s.histogram})
    assert n_hist >= 5  # 4 largest + the NaN one
    assert dom.count("<svg") == 4 + n_hist
    assert len(re.findall(r'<svg id="hist-\d+-svg"', dom)) == n_hist
    # the script made every header of the statistics tables clickable
    for ident in ("stats-0", "stats-1"):
        thead = re.search(rf'<table id="{ident}" class="sortable[^"]*"><thead>(.*?)</thead>', dom, re.S).group(1)
        heads = re.findall(r"<th([^>]*)>", thead)
        assert len(heads) >= 12 and all("sortable" in h for h in heads), heads
    body = re.search(r'<table id="stats-1"[^>]*>.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    stds = [float(v) for v in re.findall(r'<tr id="r-1-\d+"[^>]*>(?:<td[^>]*>.*?</td>){6}<td class="n" data-v="([^"]+)"',
                                           body)]
    assert len(stds) == len(data.sides[1].stats) and stds == sorted(stds) and stds != [
        s.std for s in data.sides[1].stats]
    assert re.search(r'<table id="stats-0" class="sortable only-flagged">', dom)


def test_screenshot_paints_the_page(pair_report, tmp_path):
    out, _ = pair_report
    png = tmp_path / "shot.png"
    _, console = chromium(tmp_path, out.as_uri(), f"--screenshot={png}", "--window-size=1200,1600",
                          "--hide-scrollbars")
    assert console == [], console
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1200, 1600)
    assert png.stat().st_size > 20_000  # charts and text, not a blank page


def test_console_errors_would_be_caught(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><svg></svg><script>missingFunction();</script></body></html>")
    _, console = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console), console
