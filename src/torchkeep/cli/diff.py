"""``torchkeep diff A B``: how two checkpoints' model weights differ (exit 0 identical, 1 different)."""
from __future__ import annotations

import argparse
import math

from rich.markup import escape
from rich.table import Table

from torchkeep.cli._render import console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="compare the weights of two checkpoints (exit 0 same, 1 different)",
                       description="Keys only in A, only in B, shape and dtype changes, and for common "
                                   "tensors the largest absolute difference and the relative change "
                                   "||a-b||/||a||, sorted by change. Exit status: 0 identical, "
                                   "1 different, 2 error.")
    p.add_argument("a", metavar="A", help="checkpoint file or folder")
    p.add_argument("b", metavar="B", help="checkpoint file or folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=20, metavar="N",
                   help="show the N most changed tensors (default 20; 0 shows all)")
    p.add_argument("--trust", action="store_true", help="allow code execution to load the weights")
    p.set_defaults(func=run)


def _num(x: float) -> str:
    if math.isinf(x):
        return "inf"
    if math.isnan(x):
        return "nan"
    return f"{x:.3g}"


def _shape(s) -> str:
    return "[" + ", ".join(str(int(v)) for v in s) + "]"


def run(args: argparse.Namespace) -> int:
    from torchkeep.look.diffing import diff

    rep = diff(args.a, args.b, trust=args.trust)
    if args.json:
        print_json(rep.to_dict())
        return 0 if rep.identical else 1
    out = console()
    out.print(f"[bold]A[/] {escape(rep.a)}\n[bold]B[/] {escape(rep.b)}")
    limit = args.limit if args.limit and args.limit > 0 else None
    for title, side in (("only in A", rep.only_a), ("only in B", rep.only_b)):
        if side:
            out.print(f"[bold]{title}[/] ({len(side)}):")
            items = list(side.items())
            for name, (shape, dtype) in items[:limit]:
                out.print(f"  {escape(name)}  {_shape(shape)} {dtype}")
            if limit and len(items) > limit:
                out.print(f"  … {len(items) - limit} more")
    if rep.shape_changed:
        out.print(f"[bold]shape changed[/] ({len(rep.shape_changed)}):")
        for c in rep.shape_changed[:limit]:
            dt = f" {c.dtype_a} → {c.dtype_b}" if c.dtype_a != c.dtype_b else f" {c.dtype_a}"
            out.print(f"  {escape(c.name)}  {_shape(c.shape_a)} → {_shape(c.shape_b)}{dt}")
    changed = rep.changed
    if changed:
        t = Table(show_edge=False, header_style="bold", title=None)
        t.add_column("tensor", overflow="fold")
        t.add_column("shape")
        t.add_column("dtype")
        t.add_column("max |a-b|", justify="right")
        t.add_column("rel change", justify="right")
        t.add_column("elements changed", justify="right")
        for d in changed[:limit]:
            dt = d.dtype_a if not d.dtype_changed else f"{d.dtype_a} → {d.dtype_b}"
            numel = 1
            for s in d.shape:
                numel *= s
            el = f"{d.changed_elements:,}/{numel:,}"
            if d.nan_mismatch:
                el += f" ({d.nan_mismatch:,} NaN)"
            t.add_row(escape(d.name), _shape(d.shape), dt, _num(d.max_abs), _num(d.rel_change), el)
        out.print(t)
        if limit and len(changed) > limit:
            out.print(f"  … {len(changed) - limit} more changed tensors (--limit 0 shows all)")
    n_common = len(rep.tensors)
    verdict = "[green]identical[/]" if rep.identical else "[yellow]different[/]"
    out.print(f"{verdict}: {n_common} common tensors, {len(changed)} changed, "
              f"{len(rep.unchanged)} unchanged, {len(rep.dtype_changed)} dtype changes, "
              f"{len(rep.shape_changed)} shape changes, {len(rep.only_a)} only in A, "
              f"{len(rep.only_b)} only in B")
    return 0 if rep.identical else 1
