"""``torchkeep diff A B``: how two checkpoints differ, whole state or model weights only
(exit 0 identical, 1 different)."""
from __future__ import annotations

import argparse

from rich.markup import escape

from torchkeep.cli._args import positive
from torchkeep.cli._render import console, print_json, show_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="compare two checkpoints' state (exit 0 same, 1 different)",
                       description="Compare the whole state of A and B (model weights by the names a "
                                   "bare model uses, every other tensor and plain value by its dotted "
                                   "name), or only the model weights with --weights-only: names only "
                                   "in A or B, shape and dtype changes, and for common tensors the "
                                   "largest absolute difference and the relative change ||a-b||/||a||, "
                                   "sorted by change. Exit status: 0 identical, 1 different, 2 error.")
    p.add_argument("a", metavar="A", help="checkpoint file or folder")
    p.add_argument("b", metavar="B", help="checkpoint file or folder")
    p.add_argument("--weights-only", action="store_true",
                   help="compare only the model weights each checkpoint holds")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=20, metavar="N",
                   help="show the N most changed tensors (default 20; 0 shows all)")
    p.add_argument("--trust", action="store_true", help="allow code execution to load the weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchkeep.look.diffing import TABLE_HEADER, diff, table_row

    positive("--limit", args.limit, zero_ok=True)
    rep = diff(args.a, args.b, trust=args.trust, weights_only=args.weights_only)
    if args.json:
        print_json(rep.to_dict())
        return 0 if rep.identical else 1
    out = console()
    limit = args.limit or None
    if not out.is_terminal:
        out.print(rep.format(limit), markup=False)
        return 0 if rep.identical else 1
    # On a terminal: the same content as DiffReport.format, with a rich table and colour.
    text = rep.format(limit).splitlines()
    table_at = next((i for i, line in enumerate(text) if line.startswith(TABLE_HEADER[0] + "  ")), None)
    before = text[:table_at] if table_at is not None else text[:-1]
    for line in before:
        out.print(escape(line))
    if table_at is not None:
        changed = rep.changed[:limit]
        show_table(out, TABLE_HEADER, [tuple(escape(c) for c in table_row(d)) for d in changed],
                   right=(3, 4, 5))
        for line in text[table_at + 1 + len(changed):-1]:
            out.print(escape(line))
    colour = "green" if rep.identical else "yellow"
    out.print(f"[{colour}]{escape(text[-1])}[/]")
    if not args.weights_only and _names_disjoint(rep):
        out.print("[dim]no tensor names in common: --weights-only compares the model weights "
                  "each holds[/]")
    return 0 if rep.identical else 1


def _names_disjoint(rep) -> bool:
    return bool(rep.only_a and rep.only_b) and not rep.tensors and not rep.shape_changed
