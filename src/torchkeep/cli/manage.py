"""``torchkeep ls DIR`` and ``torchkeep verify DIR``: the checkpoints a CheckpointManager keeps."""
from __future__ import annotations

import argparse
import datetime
import os

from rich.table import Table

from torchkeep.cli._render import console, human_bytes, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list the checkpoints of a CheckpointManager folder",
                       description="List step, time, metrics, size and status of every checkpoint "
                                   "in a CheckpointManager folder (reads commit records only).")
    p.add_argument("directory", help="the manager's folder (or an fsspec URL)")
    p.add_argument("--all", action="store_true", help="also list folders that were never committed")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_ls)

    v = sub.add_parser("verify", help="check every checkpoint's bytes; exit 1 on damage",
                       description="Read every tensor of every checkpoint and check it against the "
                                   "checksum in its manifest (xxh3; crc32 in older checkpoints), and "
                                   "both commit records. Exit 0 when all are good, 1 when any is "
                                   "damaged.")
    v.add_argument("directory", help="the manager's folder (or one checkpoint folder)")
    v.add_argument("--deep", action="store_true",
                   help="also check each shared blob's digest against its name")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=run_verify)


def _manager(directory: str):
    from torchkeep.keep.manager import CheckpointManager

    if "://" not in directory and not os.path.isdir(directory):
        raise FileNotFoundError(2, "no such folder", directory)
    return CheckpointManager(directory, keep_last=None)


def _time(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _metrics(m: dict) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in m.items()) or "-"


def _row_json(info, latest) -> dict:
    return {"step": info.step, "path": info.path, "time": info.time, "metrics": info.metrics,
            "nbytes": info.nbytes, "written": info.written, "status": info.status,
            "latest": info.step == latest, "problems": info.problems}


def _table(infos, latest: int | None, title: str) -> Table:
    t = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for col, just in (("step", "right"), ("time", "left"), ("metrics", "left"),
                      ("size", "right"), ("written", "right"), ("status", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for i in infos:
        status = i.status + (" (latest)" if i.step == latest else "")
        style = {"ok": "green", "damaged": "bold red", "uncommitted": "yellow"}.get(i.status, "")
        t.add_row(str(i.step), _time(i.time), _metrics(i.metrics),
                  human_bytes(i.nbytes) if i.status == "ok" or i.nbytes else "-",
                  human_bytes(i.written) if i.written else "-", f"[{style}]{status}[/]")
    return t


def _other_folders(directory: str, check: bool):
    """Checkpoint folders that are not a CheckpointManager's (transformers/accelerate folders
    sealed by torchkeep, Lightning's), or None."""
    from torchkeep.integrations import sealed
    return sealed.scan(directory, check=check)


def run_ls(args: argparse.Namespace) -> int:
    infos = _other_folders(args.directory, check=False)
    if infos is not None:
        infos = [i for i in infos if i.status == "ok" or args.all]
    else:
        infos = _manager(args.directory).list(include_uncommitted=args.all)
    good = [i.step for i in infos if i.status == "ok"]
    latest = good[-1] if good else None
    if args.json:
        print_json([_row_json(i, latest) for i in infos])
        return 0
    out = console()
    if not infos:
        out.print(f"{args.directory}: no checkpoints")
        return 0
    out.print(_table(infos, latest, f"{args.directory}: {len(good)} checkpoint(s)"))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from torchkeep.keep.manager import CheckpointInfo
    from torchkeep.read.formats import native
    from torchkeep.store.backends import storage_for

    directory = args.directory
    storage, root = storage_for(directory)
    if "://" not in directory and not os.path.isdir(directory):
        raise FileNotFoundError(2, "no such folder", directory)
    others = _other_folders(directory, check=True)
    if others is not None:
        infos = others
    elif storage.exists(storage.join(root, native.MANIFEST)):  # one checkpoint folder
        problems = native.verify_folder(storage, root, deep=args.deep)
        name = root.rstrip("/").rsplit("/", 1)[-1]
        infos = [CheckpointInfo(native.parse_step(name) or 0, root,
                                status="damaged" if problems else "ok",
                                problems=[str(p) for p in problems])]
    else:
        infos = _manager(directory).verify(deep=args.deep)
    bad = [i for i in infos if i.status == "damaged"]
    good = [i.step for i in infos if i.status == "ok"]
    latest = good[-1] if good else None
    if args.json:
        print_json({"ok": not bad, "checkpoints": [_row_json(i, latest) for i in infos]})
        return 1 if bad else 0
    out = console()
    if not infos:
        out.print(f"{directory}: no checkpoints")
        return 0
    out.print(_table(infos, latest, f"{directory}: verified {len(infos)} checkpoint(s)"))
    for i in bad:
        for p in i.problems:
            out.print(f"[red]damaged[/] step {i.step}: {p}", soft_wrap=True)
    if bad:
        out.print(f"[bold red]{len(bad)} damaged[/]; restore() skips them and resumes from the "
                  f"newest good one" + (f" (step {latest})" if latest is not None else ""))
        return 1
    out.print(f"[green]all {len(infos)} good[/]")
    return 0
