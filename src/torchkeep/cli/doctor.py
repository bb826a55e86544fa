"""``torchkeep doctor DIR``: explain every resume in a CheckpointManager folder."""
from __future__ import annotations

import argparse

from rich.markup import escape

from torchkeep.cli._render import console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="explain why a resumed run does not continue the original one",
        description="Read the fingerprints recorded with each checkpoint of a CheckpointManager "
                    "folder (step, epoch and position, LR per param group, scheduler and scaler "
                    "state, optimizer step counts, RNG hashes, the next batch's sample indices, "
                    "parameter names and shapes) and, at every resume, compare what the restored "
                    "run produced at its first step with what the checkpoint recorded. Each "
                    "divergence is named in words. Exit 0 when every resume is exact, 1 when "
                    "something diverged, 2 when the folder holds no checkpoint.")
    p.add_argument("directory", help="the manager's folder (or an fsspec URL, or one step folder)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchkeep.cli.manage import check_folder, no_checkpoints
    from torchkeep.keep.doctor.folder import diagnose_folder

    check_folder(args.directory, "doctor")
    rep = diagnose_folder(args.directory)
    if not rep.steps:
        raise no_checkpoints(args.directory)
    if args.json:
        print_json(rep.to_dict())
        return 0 if rep.ok else 1
    out = console()
    lines = rep.lines()
    out.print(f"[bold]{escape(lines[0])}[/]", soft_wrap=True)
    for line in lines[1:-1]:
        if line.startswith("  !"):
            out.print(f"  [red]![/]{escape(line[3:])}", soft_wrap=True)
        elif line.startswith("  ok"):
            out.print(f"  [green]{escape(line[2:])}[/]", soft_wrap=True)
        else:
            out.print(escape(line), soft_wrap=True)
    out.print(f"[{'green' if rep.ok else 'bold red'}]{escape(lines[-1])}[/]", soft_wrap=True)
    return 0 if rep.ok else 1
