"""Small inline-SVG charts for the HTML report: bars, columns, histograms and a treemap.

Each function returns one ``<svg>`` element as a string, sized in CSS pixels, with every text
escaped (names come from checkpoints and are untrusted) and a ``<title>`` on each mark so the
browser shows exact values on hover. No dependency, no script, nothing fetched.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Sequence

# Categorical hues (colour-blind friendly, Tableau 10 order) and neutral greys.
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
INK = "#333"
MUTED = "#888"
GRID = "#e4e4e4"
CHAR_W = 6.4  # average glyph width of an 11px sans-serif font, for fitting labels


def esc(s: object) -> str:
    """Text or attribute value, escaped for HTML and SVG (quotes included)."""
    return html.escape(str(s), quote=True)


def num(x: float | int | None, digits: int = 4) -> str:
    """A number for people: ints with thousands separators, floats with ``digits`` significant
    digits; None as a dash, NaN and infinities spelled out."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def compact(n: float) -> str:
    """1234567 -> '1.23M' (counts on axes and in cells)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) and not float(n).is_integer() else f"{int(n)}"


def clip(text: str, width: float) -> str:
    """``text`` shortened with a leading ellipsis to fit ``width`` pixels (keeps the tail,
    which is the distinctive part of a dotted name)."""
    room = int(width / CHAR_W)
    if len(text) <= room:
        return text
    if room <= 1:
        return ""
    return "…" + text[-(room - 1):]


def _svg(width: float, height: float, body: list[str], *, id: str | None, label: str,
         cls: str = "chart") -> str:
    ident = f' id="{esc(id)}"' if id else ""
    return (f'<svg{ident} class="{cls}" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
            f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
            f'aria-label="{esc(label)}">' + "".join(body) + "</svg>")


def _text(x: float, y: float, s: str, *, anchor: str = "start", cls: str = "", fill: str = INK) -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}"{c}>{esc(s)}</text>'


# -- horizontal bars -----------------------------------------------------------------------
@dataclass
class Bar:
    label: str
    value: float
    tip: str = ""          # hover text; defaults to label and value
    text: str | None = None  # the value as written next to the bar; defaults to value_text(value)
    color: str = PALETTE[0]
    href: str | None = None  # in-page link (built by us, never from the checkpoint)


def hbars(bars: Sequence[Bar], *, width: int = 960, id: str | None = None, label: str = "bars",
          value_text=num, label_width: int = 320, value_width: int = 170, row: int = 18) -> str:
    """One labelled horizontal bar per item, linear scale from 0 to the largest value."""
    vmax = max((b.value for b in bars if math.isfinite(b.value)), default=0.0) or 1.0
    plot = width - label_width - value_width
    body = []
    for i, b in enumerate(bars):
        y = i * row
        v = b.value if math.isfinite(b.value) else vmax
        w = max(0.0, plot * v / vmax) if v > 0 else 0.0
        tip = b.tip or f"{b.label}: {value_text(b.value)}"
        mark = (f'<g class="bar"><title>{esc(tip)}</title>'
                f'{_text(label_width - 6, y + row * 0.7, clip(b.label, label_width - 8), anchor="end")}'
                f'<rect x="{label_width}" y="{y + 2}" width="{max(w, 0.5):.1f}" height="{row - 4}" '
                f'fill="{b.color}"/>'
                f'{_text(label_width + w + 4, y + row * 0.7, b.text if b.text is not None else value_text(b.value), fill=MUTED)}</g>')
        if b.href:
            mark = f'<a href="{esc(b.href)}">{mark}</a>'
        body.append(mark)
    return _svg(width, max(row, len(bars) * row), body, id=id, label=label)


# -- columns on a log scale ------------------------------------------------------------------
def log_columns(values: Sequence[float], tips: Sequence[str], *, width: int = 960, height: int = 220,
                id: str | None = None, label: str = "columns", zero_tip: str = "unchanged",
                colors: Sequence[str] | None = None) -> str:
    """One column per value in order, log10 height scale. Nothing is silently left out: zeros
    get a grey stub at the base, +inf (a change from nothing) a pale orange full-height column,
    NaN a red one."""
    left, bottom, top = 46, 18, 8
    plot_w, plot_h = width - left - 6, height - bottom - top
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite:
        lo = math.floor(math.log10(min(finite)))
        hi = math.ceil(math.log10(max(finite)))
        if hi == lo:
            hi += 1
    else:
        lo, hi = -1, 0
    n = max(1, len(values))
    step = plot_w / n
    bw = max(step * 0.8, min(step, 1.0))
    body = []
    for d in range(lo, hi + 1):
        y = top + plot_h * (1 - (d - lo) / (hi - lo))
        body.append(f'<line x1="{left}" x2="{width - 6}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        body.append(_text(left - 4, y + 4, f"1e{d}", anchor="end", fill=MUTED))
    for i, v in enumerate(values):
        x = left + i * step
        tip = tips[i] if i < len(tips) else ""
        if math.isfinite(v) and v > 0:
            h = plot_h * (math.log10(v) - lo) / (hi - lo)
            h = max(h, 1.0)
            fill = colors[i] if colors else PALETTE[0]
        elif math.isfinite(v):
            h, fill, tip = 2.0, MUTED, tip or zero_tip
        elif v > 0:
            h, fill = plot_h, PALETTE[1] + '" fill-opacity="0.45'
        else:
            h, fill = plot_h, PALETTE[3]
        body.append(f'<rect class="col" x="{x:.2f}" y="{top + plot_h - h:.2f}" width="{bw:.2f}" '
                    f'height="{h:.2f}" fill="{fill}"><title>{esc(tip)}</title></rect>')
    body.append(f'<line x1="{left}" x2="{width - 6}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="{INK}"/>')
    body.append(_text(left, height - 4, "first tensor", fill=MUTED))
    body.append(_text(width - 6, height - 4, f"last ({len(values)})", anchor="end", fill=MUTED))
    return _svg(width, height, body, id=id, label=label)


# -- histogram -------------------------------------------------------------------------------
def histogram(counts: Sequence[int], lo: float, hi: float, *, other: Sequence[int] | None = None,
              width: int = 300, height: int = 120, id: str | None = None, label: str = "histogram",
              names: tuple[str, str] = ("a", "b")) -> str:
    """Bars for ``counts`` over [lo, hi]; with ``other`` (same bins) the two are overlaid:
    ``counts`` as a grey outline, ``other`` filled."""
    bottom, top = 16, 4
    plot_h = height - bottom - top
    series = [counts] + ([other] if other is not None else [])
    cmax = max((max(s) if len(s) else 0 for s in series), default=0) or 1
    n = max(1, len(counts))
    bw = width / n
    body = []
    edges = [lo + (hi - lo) * i / n for i in range(n + 1)]
    first_fill = "#c9c9c9" if other is not None else PALETTE[0]
    for si, s in enumerate(series):
        for i, c in enumerate(s):
            if not c:
                continue
            h = max(1.0, plot_h * c / cmax)
            who = f"{names[si]}: " if other is not None else ""
            tip = f"{who}[{num(edges[i])}, {num(edges[i + 1])}): {c:,}"
            if si == 0:
                style = f'fill="{first_fill}"'
            else:
                style = f'fill="{PALETTE[0]}" fill-opacity="0.55"'
            body.append(f'<rect x="{i * bw:.2f}" y="{top + plot_h - h:.2f}" width="{max(bw - 0.5, 0.5):.2f}" '
                        f'height="{h:.2f}" {style}><title>{esc(tip)}</title></rect>')
    body.append(f'<line x1="0" x2="{width}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="{INK}"/>')
    body.append(_text(0, height - 3, num(lo, 3), fill=MUTED))
    body.append(_text(width, height - 3, num(hi, 3), anchor="end", fill=MUTED))
    if lo < 0 < hi:
        x0 = width * (0 - lo) / (hi - lo)
        body.append(f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{top}" y2="{top + plot_h}" stroke="{MUTED}" '
                    f'stroke-dasharray="2,2"/>')
        if 24 < x0 < width - 24:
            body.append(_text(x0, height - 3, "0", anchor="middle", fill=MUTED))
    return _svg(width, height, body, id=id, label=label, cls="chart hist")


# -- treemap ---------------------------------------------------------------------------------
def squarify(values: Sequence[float], x: float, y: float, w: float, h: float
             ) -> list[tuple[float, float, float, float]]:
    """Rectangles (x, y, w, h), in the order of ``values``, tiling the given rectangle with
    areas proportional to the values and aspect ratios near 1 (Bruls, Huizing, van Wijk:
    squarified treemaps). Non-positive values get empty rectangles."""
    out: list[tuple[float, float, float, float]] = [(x, y, 0.0, 0.0)] * len(values)
    order = sorted((i for i, v in enumerate(values) if v > 0), key=lambda i: -values[i])
    total = sum(values[i] for i in order)
    if not order or w <= 0 or h <= 0:
        return out
    scale = w * h / total
    areas = [values[i] * scale for i in order]

    def worst(row: list[float], side: float) -> float:
        s = sum(row)
        return max(max(side * side * r / (s * s), (s * s) / (side * side * r)) for r in row)

    i = 0
    while i < len(areas):
        side = min(w, h)
        row = [areas[i]]
        j = i + 1
        while j < len(areas) and worst(row + [areas[j]], side) <= worst(row, side):
            row.append(areas[j])
            j += 1
        s = sum(row)
        if w >= h:  # a column on the left
            t = min(w, s / h)
            yy = y
            for k, a in enumerate(row):
                ch = a / t if t else 0.0
                out[order[i + k]] = (x, yy, t, ch)
                yy += ch
            x, w = x + t, w - t
        else:  # a row on top
            t = min(h, s / w)
            xx = x
            for k, a in enumerate(row):
                cw = a / t if t else 0.0
                out[order[i + k]] = (xx, y, cw, t)
                xx += cw
            y, h = y + t, h - t
        i = j
    return out


@dataclass
class Node:
    """A module in the treemap: its own parameter count (``size``) plus its children's."""

    name: str
    path: str
    size: int = 0
    children: dict[str, "Node"] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.size + sum(c.total for c in self.children.values())


def module_tree(sizes: Sequence[tuple[str, int]]) -> Node:
    """A tree of modules from ``(tensor name, numel)``: 'enc.l0.w' adds to module 'enc.l0'.
    Chains of single children are merged ('model' > 'encoder' becomes 'model.encoder')."""
    root = Node("", "")
    for name, n in sizes:
        parts = name.split(".")[:-1]
        node = root
        for p in parts:
            node = node.children.setdefault(p, Node(p, f"{node.path}.{p}" if node.path else p))
        node.size += n
    _merge_chains(root)
    return root


def _merge_chains(node: Node) -> None:
    for key, child in list(node.children.items()):
        while child.size == 0 and len(child.children) == 1:
            (gk, grand), = child.children.items()
            grand.name = f"{child.name}.{grand.name}"
            child = grand
        node.children[key] = child
        _merge_chains(child)


def treemap(root: Node, *, width: int = 960, height: int = 420, id: str | None = None,
            label: str = "treemap", max_depth: int = 3) -> str:
    """Nested squarified treemap of ``root``: one colour per top-level module, nested modules
    inside their parent, each cell titled with its path and share of the parameters."""
    grand_total = root.total or 1
    body: list[str] = []
    head = 15

    def cells(node: Node) -> list[tuple[str, Node | None, int]]:
        items: list[tuple[str, Node | None, int]] = [(k, c, c.total) for k, c in node.children.items()]
        if node.size:
            items.append(("(own)", None, node.size))
        return [it for it in items if it[2] > 0]

    def draw(node: Node, x: float, y: float, w: float, h: float, depth: int, color: str | None) -> None:
        items = cells(node)
        rects = squarify([it[2] for it in items], x, y, w, h)
        for idx, ((key, child, size), (cx, cy, cw, ch)) in enumerate(zip(items, rects)):
            if cw < 0.5 or ch < 0.5:
                continue
            c = color or PALETTE[idx % len(PALETTE)]
            path = child.path if child else (f"{node.path} (own parameters)" if node.path else "(root)")
            name = child.name if child else ("(own)" if node.path else "(top-level tensors)")
            tip = f"{path}: {size:,} parameters ({100 * size / grand_total:.1f}%)"
            nested = (child is not None and child.children and depth < max_depth
                      and cw > 40 and ch > head + 24)
            opacity = 0.12 + 0.08 * min(depth, 3) if nested else 0.88
            body.append(f'<g class="cell"><title>{esc(tip)}</title>'
                        f'<rect x="{cx:.1f}" y="{cy:.1f}" width="{cw:.1f}" height="{ch:.1f}" fill="{c}" '
                        f'fill-opacity="{opacity:.2f}" stroke="#fff" stroke-width="1"/>')
            fits = ch >= 13 and cw >= 3 * CHAR_W
            if fits:
                text = clip(name, cw - 6)
                if text:
                    fill = INK if nested else "#fff"
                    body.append(_text(cx + 3, cy + 11, text, fill=fill, cls="tm"))
                if not nested and ch >= 26 and cw >= 7 * CHAR_W:
                    body.append(_text(cx + 3, cy + 23, compact(size), fill="#fff", cls="tm"))
            body.append("</g>")
            if nested:
                assert child is not None
                draw(child, cx + 2, cy + head, cw - 4, ch - head - 2, depth + 1, c)

    draw(root, 0, 0, width, height, 1, None)
    return _svg(width, height, body, id=id, label=label)


__all__ = ["esc", "num", "compact", "clip", "Bar", "hbars", "log_columns", "histogram",
           "squarify", "Node", "module_tree", "treemap", "PALETTE"]
