"""``torchkeep report``: a self-contained HTML page about a checkpoint, or about a pair."""
from __future__ import annotations

import argparse
import os

from torchkeep.cli._args import positive
from torchkeep.cli._output import add_force, check_output
from torchkeep.cli._render import console, human_bytes, progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="write an HTML report with plots (one checkpoint, or what changed between two)",
        description="Write one self-contained HTML file (no network needed to view it): format, "
                    "safety verdict, parameters by module, per-tensor statistics with odd tensors "
                    "highlighted, histograms; with OTHER also the relative change of every tensor, "
                    "added/removed/reshaped names and the tensors that did not change. Tensors are "
                    "read one at a time, chunk by chunk; no code from the files is run.")
    p.add_argument("path", help="checkpoint file or folder (a, 'before')")
    p.add_argument("other", nargs="?", help="second checkpoint to compare with (b, 'after')")
    p.add_argument("-o", "--output", default="report.html", metavar="FILE",
                   help="where to write the page (default: report.html; an existing file needs --force)")
    p.add_argument("--all-tensors", action="store_true",
                   help="analyse every tensor in the file (optimizer state too), not just the model weights")
    p.add_argument("--top", type=int, default=12, metavar="N",
                   help="histograms for the N largest tensors (flagged ones always get one; default 12)")
    p.add_argument("--bins", type=int, default=48, metavar="N", help="histogram bins (default 48)")
    p.add_argument("--explode-at", type=float, default=1e3, metavar="X",
                   help="flag floating tensors whose max |x| exceeds X (default 1000)")
    add_force(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchkeep.look.report.data import ReportOptions, prepare
    from torchkeep.look.report.page import render_html
    from torchkeep.look.stats import Thresholds
    from torchkeep.store.files import atomic_write

    positive("--top", args.top, zero_ok=True)
    positive("--bins", args.bins)
    check_output(args.output, args.force, option="-o")
    options = ReportOptions(top=args.top, bins=args.bins,
                            thresholds=Thresholds(explode_at=args.explode_at),
                            all_tensors=args.all_tensors)
    with prepare(args.path, args.other, options) as plan:
        with progress("reading tensors", total=plan.total_bytes or None) as bar:
            data = plan.collect(bar.advance)
    page = render_html(data)
    with atomic_write(args.output, "w") as f:
        f.write(page)
    out = console()
    flagged = sum(len(s.flagged) for s in data.sides)
    line = (f"wrote {args.output} ({human_bytes(os.path.getsize(args.output))}): "
            f"{sum(len(s.stats) for s in data.sides):,} tensors analysed, {flagged} flagged")
    if data.comparison is not None:
        c = data.comparison
        line += (f"; {len(c.changed):,} changed, {len(c.frozen):,} unchanged, {len(c.added)} added, "
                 f"{len(c.removed)} removed, {len(c.reshaped)} reshaped")
    out.print(line, markup=False)
    return 0
