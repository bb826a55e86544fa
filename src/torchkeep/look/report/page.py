"""The HTML page of a report: :func:`render_html` turns a :class:`~torchkeep.look.report.data.ReportData`
into one self-contained page (inline CSS, inline SVG charts from :mod:`torchkeep.look.report.svg`, a few lines
of inline script for sorting and filtering). Nothing is fetched from anywhere, and every string
that comes from a checkpoint is escaped: tensor names are untrusted input.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Sequence

from torchkeep.look.report import svg
from torchkeep.look.report.svg import esc, num

if TYPE_CHECKING:  # pragma: no cover - annotations only; htmlreport imports this module
    from torchkeep.look.diffing import TensorDiff
    from torchkeep.look.report.data import ReportData, Side
    from torchkeep.look.stats import Thresholds

CHART_W = 1200  # px; charts scale down with the page (max-width: 100%)

FLAG_TEXT = {
    "nonfinite": "NaN/Inf",
    "exploded": "exploded",
    "dead": "dead",
}


CSS = """
:root{--ink:#222;--muted:#6b6b6b;--line:#e3e3e3;--bg:#fafafa;--accent:#4e79a7;--bad:#c62828;
--warn:#b26a00;--ok:#2e7d32;--badbg:#fdecea;--warnbg:#fff4e0;--deadbg:#eef0f3}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--ink);background:var(--bg)}
main{max-width:1320px;margin:0 auto;padding:18px 22px 40px}
header h1{font-size:22px;margin:6px 0 2px}
header .sub{color:var(--muted);word-break:break-all}
nav{margin:12px 0 4px;display:flex;gap:14px;flex-wrap:wrap}
nav a{color:var(--accent);text-decoration:none;font-weight:600}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px}
h3{font-size:14px;margin:14px 0 6px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:14px}
.kv{display:grid;grid-template-columns:max-content 1fr;gap:3px 12px}
.kv dt{color:var(--muted)}
.kv dd{margin:0;word-break:break-all}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}
.b-safe{background:#e6f4ea;color:var(--ok)}
.b-unsafe{background:var(--badbg);color:var(--bad)}
.b-review,.b-unknown{background:var(--warnbg);color:var(--warn)}
.chip{display:inline-block;padding:0 6px;margin:0 3px 2px 0;border-radius:4px;font-size:12px;font-weight:600}
.f-nonfinite{background:var(--badbg);color:var(--bad)}
.f-exploded{background:var(--warnbg);color:var(--warn)}
.f-dead{background:var(--deadbg);color:#455a64}
.kpis{display:flex;gap:10px;flex-wrap:wrap;margin:4px 0 10px}
.kpi{border:1px solid var(--line);border-radius:6px;padding:6px 12px;min-width:110px}
.kpi b{display:block;font-size:18px}
.kpi span{color:var(--muted);font-size:12px}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{padding:3px 7px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f3f3f3;position:sticky;top:0;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{min-width:16em;word-break:break-all;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
tr.flagged.has-nonfinite td{background:var(--badbg)}
tr.flagged.has-exploded:not(.has-nonfinite) td{background:var(--warnbg)}
tr.flagged.has-dead:not(.has-nonfinite):not(.has-exploded) td{background:var(--deadbg)}
.scroll{max-height:560px;overflow:auto;border:1px solid var(--line);border-radius:6px}
.bar{display:inline-block;height:9px;background:var(--accent);border-radius:2px;vertical-align:middle}
.muted{color:var(--muted)}
td.shape{white-space:nowrap}
a.hl{font:11px system-ui,sans-serif;white-space:nowrap;color:var(--accent);text-decoration:none;margin-left:4px}
.js-only{display:none}
html[data-js="on"] .js-only{display:inline-flex;gap:6px;align-items:center;margin:0 0 6px}
table.only-flagged tbody tr:not(.flagged){display:none}
th.sortable{cursor:pointer}
th.sortable:after{content:" \\2195";color:#aaa}
.hists{display:grid;grid-template-columns:repeat(auto-fill,minmax(316px,1fr));gap:12px}
.hist-card{border:1px solid var(--line);border-radius:6px;padding:6px 8px}
.hist-card .name{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
.legend{font-size:12px;color:var(--muted)}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 10px;vertical-align:-1px}
svg.chart{display:block;max-width:100%;height:auto;font:11px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
svg .bar:hover rect,svg rect.col:hover{opacity:.75}
svg text.tm{pointer-events:none}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:20px}
details>summary{cursor:pointer;font-weight:600;margin:4px 0}
"""

# Sorting by column and the "flagged only" filter. Reads only numbers we wrote (data-v).
SCRIPT = """
(function () {
  document.documentElement.setAttribute("data-js", "on");
  function key(td) {
    var v = td.getAttribute("data-v");
    if (v === null) return td.textContent.toLowerCase();
    var x = parseFloat(v);
    return isNaN(x) ? Infinity : x;
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    var heads = table.querySelectorAll("thead th");
    Array.prototype.forEach.call(heads, function (th, col) {
      th.classList.add("sortable");
      th.addEventListener("click", function () {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var dir = th.getAttribute("data-dir") === "asc" ? -1 : 1;
        rows.sort(function (r1, r2) {
          var a = key(r1.cells[col]), b = key(r2.cells[col]);
          return (a < b ? -1 : a > b ? 1 : 0) * dir;
        });
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("data-dir"); });
        th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var toggles = document.querySelectorAll("input.flag-filter");
  Array.prototype.forEach.call(toggles, function (box) {
    box.addEventListener("change", function () {
      var t = document.getElementById(box.getAttribute("data-table"));
      if (t) t.classList.toggle("only-flagged", box.checked);
    });
  });
})();
"""


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _pct(frac: float) -> str:
    if frac == 0:
        return "0%"
    if frac < 0.001:
        return "<0.1%"
    return f"{100 * frac:.1f}%"


def _td(value: object, sort: float | int | None = None, *, numeric: bool = True,
        cls: str = "") -> str:
    classes = " ".join(c for c in ("n" if numeric else "", cls) if c)
    c = f' class="{classes}"' if classes else ""
    if sort is None and isinstance(value, (int, float)) and not isinstance(value, bool):
        sort = value
    v = ""
    if sort is not None:
        v = f' data-v="{_sortnum(sort)}"'
    text = num(value) if isinstance(value, (int, float)) or value is None else str(value)
    return f"<td{c}{v}>{esc(text)}</td>"


def _sortnum(x: float | int) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "1e308" if x > 0 else "-1e308"
    return repr(x)


def _chips(flags: Iterable[str]) -> str:
    return "".join(f'<span class="chip f-{esc(f)}">{esc(FLAG_TEXT.get(f, f))}</span>' for f in flags)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _summary_card(side: Side, letter: str | None) -> str:
    s = side.summary
    title = f"{letter}: {side.name}" if letter else side.name
    verdict = side.verdict
    verdict_text = {"safe": "safe: loading it would run no code",
                    "unsafe": "unsafe: loading it with torch.load would import code",
                    "review": "review: it imports globals that are not on the allowlist",
                    "unknown": "not scanned"}[verdict]
    rows = [("file", f'<span title="{esc(side.path)}">{esc(side.path)}</span>'),
            ("format", esc(s.format + (f" ({s.kind})" if s.kind else ""))),
            ("safety", f'<span class="badge b-{verdict}">{esc(verdict_text)}</span>')]
    if side.scan is not None and (side.scan.unsafe or side.scan.unknown):
        globs = [g.qualname for g in side.scan.unsafe + side.scan.unknown]
        rows.append(("globals", esc(", ".join(globs[:12]) + (" …" if len(globs) > 12 else "")) +
                     ' <span class="muted">(recorded, never imported)</span>'))
    if side.scan is not None and side.scan.errors:
        rows.append(("scan errors", esc("; ".join(side.scan.errors[:3]))))
    if side.scan_error:
        rows.append(("scan", esc(side.scan_error)))
    wrapper = "—" if s.wrapper is None else ("&lt;root&gt;" if s.wrapper == "" else esc(s.wrapper))
    rows.append(("weights at", wrapper))
    rows.append(("prefixes stripped", esc(", ".join(s.prefixes)) if s.prefixes else "none"))
    rows.append(("tensors", f"{s.n_tensors:,} ({esc(svg.compact(s.n_elements))} elements, "
                            f"{_human_bytes(s.nbytes)})"))
    rows.append(("analysed", f"{len(side.stats):,} tensors ({esc(side.source)})"))
    if s.classes:
        rows.append(("placeholders", esc(", ".join(s.classes[:10]))))
    for note in s.notes:
        rows.append(("note", esc(note)))
    for k, v in list(s.metadata.items())[:8]:
        text = str(v)
        rows.append((f"metadata {esc(k)}", esc(text[:200] + ("…" if len(text) > 200 else ""))))
    kv = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    total = sum(s.dtypes.values()) or 1
    drows = []
    for d, n in sorted(s.dtypes.items(), key=lambda kv: -kv[1]):
        share = n / total
        drows.append(f"<tr><td>{esc(d)}</td>{_td(n)}<td class=\"n\">{_human_bytes(side.bytes_by_dtype.get(d, 0))}</td>"
                     f'<td><span class="bar" style="width:{max(1, round(120 * share))}px"></span> '
                     f"{_pct(share)}</td></tr>")
    dtable = ('<table><thead><tr><th>dtype</th><th class="n">elements</th><th class="n">bytes</th>'
              f"<th>share</th></tr></thead><tbody>{''.join(drows)}</tbody></table>")
    return f'<div><h3>{esc(title)}</h3><dl class="kv">{kv}</dl><h3>Totals by dtype</h3>{dtable}</div>'


def _rules(t: Thresholds) -> str:
    return (f"NaN/Inf: any non-finite value. Exploded: max |x| above {num(t.explode_at)}. "
            f"Dead: a matrix or kernel that is all zeros or constant (std ≤ {num(t.dead_std)} "
            f"or ≤ {num(t.dead_rstd)}·|mean|). "
            "Only floating tensors are judged; BatchNorm running statistics are not.")


def _flags_section(data: ReportData) -> str:
    letters = _letters(data)
    rows = []
    counts: dict[str, int] = {}
    for si, side in enumerate(data.sides):
        for i, s in enumerate(side.stats):
            if not s.flags:
                continue
            for f in s.flags:
                counts[f] = counts.get(f, 0) + 1
            who = f"<td>{esc(letters[si])}</td>" if data.pair else ""
            rows.append(f'<tr>{who}<td class="name"><a href="#r-{si}-{i}">{esc(s.name)}</a></td>'
                        f"<td>{_chips(s.flags)}</td>{_td(s.abs_max)}{_td(s.std)}{_td(s.nan)}{_td(s.inf)}</tr>")
    kpis = "".join(f'<div class="kpi"><b>{counts.get(f, 0)}</b><span>{esc(FLAG_TEXT[f])}</span></div>'
                   for f in FLAG_TEXT)
    head = "<th>ckpt</th>" if data.pair else ""
    body = (f'<div class="scroll"><table id="flagged"><thead><tr>{head}<th>tensor</th><th>why</th>'
            '<th class="n">max |x|</th><th class="n">std</th><th class="n">NaN</th><th class="n">Inf</th>'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            if rows else '<p class="muted">No tensor looks odd.</p>')
    return (f'<section id="odd"><h2>Odd tensors</h2><div class="kpis">{kpis}</div>{body}'
            f'<p class="muted">{esc(_rules(data.options.thresholds))}</p></section>')


def _modules_section(data: ReportData) -> str:
    side = data.sides[-1] if data.pair else data.sides[0]
    sizes = [(s.name, s.numel) for s in side.stats]
    root = svg.module_tree(sizes)
    total = root.total
    letters = _letters(data)
    which = f" ({esc(letters[len(data.sides) - 1])}: {esc(side.name)})" if data.pair else ""
    if not total:
        return f'<section id="modules"><h2>Parameters by module{which}</h2><p class="muted">No elements.</p></section>'
    tm = svg.treemap(root, width=CHART_W, height=440, id="treemap", label="parameters by module")
    # Same colour as the module's cells in the treemap (assigned in the tree's order).
    tops = [(c.name, c.total, svg.PALETTE[i % len(svg.PALETTE)]) for i, c in enumerate(root.children.values())]
    if root.size:
        tops.append(("(top-level tensors)", root.size, svg.PALETTE[len(tops) % len(svg.PALETTE)]))
    tops.sort(key=lambda t: -t[1])
    bars = [svg.Bar(n, v, tip=f"{n}: {v:,} elements ({100 * v / total:.1f}%)", color=color)
            for n, v, color in tops[:24]]
    hb = svg.hbars(bars, width=CHART_W, id="modules-bars", label="elements by top-level module", value_text=_count_text)
    more = f'<p class="muted">{len(tops) - 24} more top-level modules not shown.</p>' if len(tops) > 24 else ""
    return (f'<section id="modules"><h2>Parameters by module{which}</h2>'
            f'<p class="muted">{total:,} elements in {len(sizes):,} tensors. Area is proportional to the '
            f"number of elements; hover a cell for its path.</p>{tm}"
            f"<h3>Top-level modules</h3>{hb}{more}</section>")


def _count_text(v: float) -> str:
    return svg.compact(v)


def _broken(d: TensorDiff) -> bool:
    """The change is not a number: NaN on one side only, or Inf in a or b."""
    return bool(d.nan_mismatch) or math.isnan(d.rel_change) or math.isinf(d.norm_diff) \
        or math.isinf(d.norm_a)


def _plot_value(d: TensorDiff) -> float:
    """What the change chart draws: 0 unchanged, NaN broken, inf from zero, else the ratio."""
    if d.unchanged:
        return 0.0
    return math.nan if _broken(d) else d.rel_change


def _change_text(d: TensorDiff) -> str:
    if d.unchanged:
        return "unchanged"
    if d.nan_mismatch:
        return f"NaN on one side ({d.nan_mismatch:,})"
    if _broken(d):
        return "Inf in a or b"
    if math.isinf(d.rel_change):
        return f"from zero: ‖b‖ {num(d.norm_diff, 3)}"
    return num(d.rel_change, 3)


def _change_section(data: ReportData) -> str:
    c = data.comparison
    assert c is not None
    frozen = c.frozen
    numel = {s.name: s.numel for s in data.sides[0].stats}
    frozen_elems = sum(numel.get(f.name, 0) for f in frozen)
    kpi = [(len(c.changes), "compared"), (len(c.changed), "changed"),
           (len(frozen), f"frozen ({svg.compact(frozen_elems)} elements)"), (len(c.added), "added"),
           (len(c.removed), "removed"), (len(c.reshaped), "reshaped"), (len(c.retyped), "dtype changed")]
    kpis = "".join(f'<div class="kpi"><b>{n:,}</b><span>{esc(t)}</span></div>' for n, t in kpi)
    parts = [f'<section id="change"><h2>What changed: ‖a−b‖ / ‖a‖ per tensor</h2><div class="kpis">{kpis}</div>']
    if c.changes:
        vals = [_plot_value(ch) for ch in c.changes]
        tips = [f"{ch.name}: {_change_text(ch)}" for ch in c.changes]
        parts.append('<h3>By tensor, in checkpoint order</h3><p class="muted">Log scale. Grey: unchanged; '
                     'pale orange: changed from all zeros (‖a‖ = 0, e.g. a zero-initialised bias); '
                     'red: NaN/Inf in a or b. Hover a column for the tensor.</p>')
        parts.append(svg.log_columns(vals, tips, width=CHART_W, id="change-chart", label="relative change per tensor"))
        # NaN first (a problem), then the largest finite changes; changes from zero last.
        moved = sorted(c.changed, key=lambda ch: (0, 0.0) if _broken(ch) else
                       (2, -ch.norm_diff) if math.isinf(ch.rel_change) else (1, -ch.rel_change))[:25]
        full = max((_plot_value(ch) for ch in moved if math.isfinite(_plot_value(ch))), default=1.0)
        index = {ch.name: i for i, ch in enumerate(data.sides[1].stats)}
        bars = [svg.Bar(ch.name, v if math.isfinite(v := _plot_value(ch)) else full,
                        tip=f"{ch.name}: {_change_text(ch)} (‖a−b‖ {num(ch.norm_diff)}, max |a−b| "
                            f"{num(ch.max_abs)}, {ch.changed_elements:,} elements differ)",
                        text=_change_text(ch),
                        color=svg.PALETTE[3] if math.isnan(v) else
                        svg.PALETTE[1] if math.isinf(v) else svg.PALETTE[0],
                        href=f"#r-1-{index[ch.name]}" if ch.name in index else None) for ch in moved]
        if bars:
            parts.append(f"<h3>Largest changes</h3>{svg.hbars(bars, width=CHART_W, id='change-top', label='largest relative changes')}")
    parts.append(_frozen_table(data, frozen))
    parts.append(_keys_table("Added in b", "added", [(n, _shape(s), d) for n, s, d in c.added]))
    parts.append(_keys_table("Removed from a", "removed", [(n, _shape(s), d) for n, s, d in c.removed]))
    parts.append(_keys_table("Reshaped", "reshaped",
                             [(k.name, f"{_shape(k.shape_a)} → {_shape(k.shape_b)}",
                               k.dtype_a if k.dtype_a == k.dtype_b else f"{k.dtype_a} → {k.dtype_b}")
                              for k in c.reshaped]))
    parts.append(_keys_table("Dtype changed", "retyped",
                             [(k.name, _shape(k.shape_a), f"{k.dtype_a} → {k.dtype_b}") for k in c.retyped]))
    parts.append("</section>")
    return "".join(parts)


def _frozen_table(data: ReportData, frozen: list[TensorDiff]) -> str:
    numel = {s.name: s for s in data.sides[0].stats}
    rows = "".join(f'<tr><td class="name">{esc(f.name)}</td><td>{esc(_shape(numel[f.name].shape))}</td>'
                   f"{_td(numel[f.name].numel)}</tr>" for f in frozen if f.name in numel)
    if not frozen:
        return '<h3 id="frozen">Unchanged (frozen) tensors: <span class="muted">none</span></h3>'
    table = (f'<div class="scroll"><table id="frozen-table" class="sortable"><thead><tr><th>tensor</th><th>shape</th>'
             f'<th class="n">elements</th></tr></thead><tbody>{rows}</tbody></table></div>')
    opened = " open" if len(frozen) <= 10 else ""
    return (f'<details id="frozen"{opened}><summary>Unchanged (frozen) tensors: {len(frozen):,}, '
            f"bit for bit equal</summary>{table}</details>")


def _keys_table(title: str, ident: str, rows: list[tuple[str, str, str]]) -> str:
    if not rows:
        return f'<h3 id="{ident}">{esc(title)}: <span class="muted">none</span></h3>'
    body = "".join(f'<tr><td class="name">{esc(n)}</td><td>{esc(s)}</td><td>{esc(d)}</td></tr>' for n, s, d in rows)
    return (f'<h3 id="{ident}">{esc(title)}: {len(rows):,}</h3><div class="scroll"><table id="{ident}-table">'
            f"<thead><tr><th>tensor</th><th>shape</th><th>dtype</th></tr></thead><tbody>{body}</tbody></table></div>")


def _letters(data: ReportData) -> list[str]:
    return ["a", "b"] if data.pair else [""]


def _stats_table(data: ReportData, si: int) -> str:
    side = data.sides[si]
    changes = {}
    if data.pair and si == 1:
        assert data.comparison is not None
        changes = {c.name: c for c in data.comparison.changes}
    hist_ids = _hist_ids(data)
    head = ('<th class="n">#</th><th>tensor</th><th>shape</th><th>dtype</th><th class="n">elements</th>'
            '<th class="n">mean</th><th class="n">std</th><th class="n">min</th><th class="n">max</th>'
            '<th class="n">zeros</th><th class="n">NaN</th><th class="n">Inf</th>')
    if changes:
        head += '<th class="n">‖a−b‖/‖a‖</th>'
    head += "<th>flags</th>"
    rows = []
    for i, s in enumerate(side.stats):
        cls = ""
        if s.flags:
            cls = ' class="flagged ' + " ".join(f"has-{esc(f)}" for f in s.flags) + '"'
        name = esc(s.name)
        hid = hist_ids.get((si, s.name))
        if hid:
            name += f' <a class="hl" href="#{hid}" title="histogram">hist</a>'
        cells = [_td(i), f'<td class="name">{name}</td>', _td(_shape(s.shape), numeric=False, cls="shape"),
                 _td(s.dtype, numeric=False), _td(s.numel)]
        if s.error:
            cells.append(f'<td colspan="7" class="muted">{esc(s.error)}</td>')
        else:
            cells += [_td(s.mean), _td(s.std), _td(s.min), _td(s.max),
                      _td(_pct(s.zero_fraction), s.zero_fraction), _td(s.nan),
                      _td(s.inf)]
        if changes:
            ch = changes.get(s.name)
            if ch is None:
                cells.append(_td("—", -1))
            elif ch.unchanged:
                cells.append(_td("frozen", 0))
            else:
                v = _plot_value(ch)
                cells.append(_td(_change_text(ch), v if not math.isnan(v) else math.inf))
        cells.append(f"<td>{_chips(s.flags)}</td>")
        rows.append(f'<tr id="r-{si}-{i}"{cls}>' + "".join(cells) + "</tr>")
    tid = f"stats-{si}"
    toggle = (f'<label class="js-only"><input type="checkbox" class="flag-filter" data-table="{tid}"> '
              f"only flagged ({len(side.flagged)})</label>")
    return (f'{toggle}<div class="scroll"><table id="{tid}" class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _layers_section(data: ReportData) -> str:
    intro = ('<p class="muted">Statistics over the finite values (std is the population std); zeros, '
             "NaN and Inf count all elements. Click a header to sort.</p>")
    if not data.pair:
        return f'<section id="layers"><h2>Per-tensor statistics</h2>{intro}{_stats_table(data, 0)}</section>'
    a, b = data.sides
    return (f'<section id="layers"><h2>Per-tensor statistics</h2>{intro}'
            f'<details open><summary>b: {esc(b.name)} ({len(b.stats):,} tensors, {len(b.flagged)} flagged)</summary>'
            f"{_stats_table(data, 1)}</details>"
            f'<details><summary>a: {esc(a.name)} ({len(a.stats):,} tensors, {len(a.flagged)} flagged)</summary>'
            f"{_stats_table(data, 0)}</details></section>")


def _hist_ids(data: ReportData) -> dict[tuple[int, str], str]:
    """Anchor of the histogram card that shows tensor ``name`` of side ``si``."""
    ids: dict[tuple[int, str], str] = {}
    for k, (si_list, name) in enumerate(_hist_items(data)):
        for si in si_list:
            ids[(si, name)] = f"hist-{k}"
    return ids


def _hist_items(data: ReportData) -> list[tuple[list[int], str]]:
    """Histogram cards in order: (sides that have one, name); a pair's shared name is one card."""
    items: list[tuple[list[int], str]] = []
    seen: dict[str, int] = {}
    for si, side in enumerate(data.sides):
        for s in side.stats:
            if s.histogram is None:
                continue
            if s.name in seen and data.pair:
                items[seen[s.name]][0].append(si)
                continue
            seen[s.name] = len(items)
            items.append(([si], s.name))
    return items


def _histograms_section(data: ReportData) -> str:
    by = [{s.name: s for s in side.stats} for side in data.sides]
    cards = []
    for k, (sis, name) in enumerate(_hist_items(data)):
        ss = [by[si][name] for si in sis]
        h0 = ss[0].histogram
        assert h0 is not None
        other = None
        if len(ss) == 2 and ss[1].histogram is not None and (ss[1].histogram.lo, ss[1].histogram.hi) == (h0.lo, h0.hi):
            other = ss[1].histogram.counts
        chart = svg.histogram(h0.counts, h0.lo, h0.hi, other=other, id=f"hist-{k}-svg",
                              label=f"histogram of {name}", names=("a", "b"))
        main = ss[-1]
        flags = sorted({f for s in ss for f in s.flags})
        which = ""
        if data.pair and len(ss) == 1:
            which = f" · only in {'ab'[sis[0]]}"
        legend = ('<div class="legend"><span class="sw" style="background:#c9c9c9"></span>a'
                  f'<span class="sw" style="background:{svg.PALETTE[0]};opacity:.55"></span>b</div>'
                  if other is not None else "")
        cards.append(f'<div class="hist-card" id="hist-{k}"><div class="name">{esc(name)}</div>'
                     f'<div class="muted">{esc(_shape(main.shape))} {esc(main.dtype)} · mean {esc(num(main.mean, 3))} '
                     f"· std {esc(num(main.std, 3))}{esc(which)} {_chips(flags)}</div>{chart}{legend}</div>")
    if not cards:
        return '<section id="histograms"><h2>Histograms</h2><p class="muted">No tensor with finite values.</p></section>'
    o = data.options
    return (f'<section id="histograms"><h2>Histograms</h2><p class="muted">The {o.top} largest tensors and '
            f"flagged ones (up to {o.flagged_histograms}); {o.bins} bins over the finite values.</p>"
            f'<div class="hists">{"".join(cards)}</div></section>')


def render_html(data: ReportData) -> str:
    """The whole page as one string (UTF-8 HTML5, no external resources)."""
    if data.pair:
        a, b = data.sides
        title = f"{a.name} → {b.name}"
        sub = f"a: {esc(a.path)}<br>b: {esc(b.path)}"
    else:
        title = data.sides[0].name
        sub = esc(data.sides[0].path)
    nav = [("summary", "Summary"), ("odd", "Odd tensors")]
    if data.pair:
        nav.append(("change", "What changed"))
    nav += [("modules", "Modules"), ("layers", "Statistics"), ("histograms", "Histograms")]
    letters = _letters(data)
    cards = "".join(_summary_card(s, letters[i] or None) for i, s in enumerate(data.sides))
    body = [f'<header><h1>torchkeep report: {esc(title)}</h1><div class="sub">{sub}</div></header>',
            "<nav>" + "".join(f'<a href="#{k}">{v}</a>' for k, v in nav) + "</nav>",
            f'<section id="summary"><h2>Summary</h2><div class="grid">{cards}</div></section>',
            _flags_section(data)]
    if data.pair:
        body.append(_change_section(data))
    body += [_modules_section(data), _layers_section(data), _histograms_section(data),
             f"<footer>torchkeep {esc(data.version)} · {esc(data.created)} · computed without running "
             "any code from the checkpoint</footer>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>torchkeep report: {esc(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}</main><script>{SCRIPT}</script></body></html>\n")


__all__ = ["render_html"]
