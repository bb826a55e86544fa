"""``torchkeep scan``: which globals a checkpoint's pickles would import; exit 0 safe, 1 unsafe,
2 unreadable."""
from __future__ import annotations

import argparse
import os

from torchkeep.cli._render import console, print_json
from torchkeep.errors import TorchkeepError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="check checkpoints for pickled code (exit 0 safe, 1 unsafe, 2 unreadable)",
                       description="List every global each pickle imports, classified safe (allowlisted), "
                                   "unsafe (can run commands or build calls) or unknown (importing it "
                                   "would run its module). Nothing is imported.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="list every global, safe ones too")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchkeep.read.scanner import scan

    out, err = console(), console(stderr=True)
    status = 0
    reports = []
    for path in args.paths:
        try:
            if os.path.isdir(path) and not any(files for _, _, files in os.walk(path)):
                raise TorchkeepError(f"{path}: an empty folder, nothing to scan",
                                     hint="give a checkpoint file or a folder that holds one")
            rep = scan(path)
        except (TorchkeepError, OSError) as e:
            msg = str(e) if isinstance(e, TorchkeepError) else f"{path}: {e.strerror or e}"
            err.print(f"torchkeep: error: {msg}", markup=False, highlight=False, soft_wrap=True)
            reports.append({"path": path, "error": msg})
            status = 2
            continue
        reports.append(rep.to_dict())
        verdict = rep.verdict  # unsafe globals or uninspectable pickles win over damage
        status = max(status, 1) if verdict == "unsafe" else (2 if verdict == "damaged" else status)
        if args.json:
            continue
        if rep.safe:
            out.print(f"[green]safe[/]     {path}  ({rep.format}, {len(rep.globals)} globals, all allowlisted)")
            for n in rep.notes:
                out.print(f"    note     {n}", markup=False, highlight=False)
        else:
            label = "[red]UNSAFE[/]" if rep.unsafe or rep.uninspected or rep.code else (
                "[yellow]unknown[/]" if rep.unknown else "[red]DAMAGED[/]")
            out.print(f"{label}   {path}  ({rep.format})")
            for g in rep.unsafe:
                out.print(f"    [red]unsafe[/]   {g.qualname}   [dim]in {g.member}[/]")
            for g in rep.unknown:
                out.print(f"    [yellow]unknown[/]  {g.qualname}   [dim]in {g.member}[/]")
            for c in rep.code:
                out.print(f"    code     {c}", markup=False, highlight=False)
            for u in rep.uninspected:
                out.print(f"    not inspected (unsafe to load): {u}", markup=False, highlight=False)
            for e in rep.errors:
                out.print(f"    damaged  {e}", markup=False, highlight=False)
            for n in rep.notes:
                if n not in rep.errors:
                    out.print(f"    note     {n}", markup=False, highlight=False)
        if args.verbose:
            for g in rep.globals:
                out.print(f"    {g.verdict:8} {g.qualname}   [dim]in {g.member}[/]")
    if args.json:
        print_json(reports if len(reports) != 1 else reports[0])
    return status
