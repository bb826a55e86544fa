"""``torchkeep ls DIR`` and ``torchkeep verify DIR``: the checkpoints a CheckpointManager keeps."""
from __future__ import annotations

import argparse
import datetime
import os

from rich.markup import escape

from torchkeep.cli._render import console, human_bytes, print_json, show_table
from torchkeep.errors import TorchkeepError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list the checkpoints of a CheckpointManager folder",
                       description="List step, time, metrics, size and status of every checkpoint "
                                   "in a CheckpointManager folder (reads commit records only).")
    p.add_argument("directory", help="the manager's folder (or an fsspec URL)")
    p.add_argument("--all", action="store_true", help="also list folders that were never committed")
    p.add_argument("--monitor", metavar="METRIC",
                   help="mark the best checkpoint by this metric (default: the manager's monitor=, "
                        "recorded with each checkpoint)")
    p.add_argument("--mode", choices=["min", "max"], help="with --monitor: lower or higher is better "
                                                             "(default min)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_ls)

    v = sub.add_parser("verify", help="check every checkpoint's bytes; exit 1 on damage",
                       description="Read every tensor of every checkpoint and check it against the "
                                   "checksum in its manifest (xxh3; crc32 in older checkpoints), and "
                                   "both commit records. Exit 0 when all are good, 1 when any is "
                                   "damaged, 2 when the folder holds no checkpoint.")
    v.add_argument("directory", help="the manager's folder (or one checkpoint folder)")
    v.add_argument("--deep", action="store_true",
                   help="also check each shared blob's digest against its name")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=run_verify)


LOOKED_FOR = ("looked for step-N folders with a commit.json (CheckpointManager) and folders sealed "
              "with a torchkeep-commit.json (the transformers, accelerate and Lightning integrations)")


def check_folder(directory: str, command: str) -> None:
    """A missing path, or a file where a manager's folder is expected, as one clear error."""
    if "://" in directory:
        return
    if os.path.isfile(directory):
        raise TorchkeepError(f"{directory} is a file, not a folder",
                             hint=f"{command} takes a CheckpointManager folder; "
                                  f"for one checkpoint file use: torchkeep inspect {directory}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(2, "no such folder", directory)


def no_checkpoints(directory: str) -> TorchkeepError:
    return TorchkeepError(f"no checkpoints in {directory}",
                          hint=f"{LOOKED_FOR}; give the folder the manager was created with")


def _manager(directory: str, command: str = "ls"):
    from torchkeep.keep.manager import CheckpointManager

    check_folder(directory, command)
    return CheckpointManager(directory, keep_last=None)


def _best(mgr, infos, monitor: str | None, mode: str | None) -> tuple[int | None, str | None]:
    """The best step by ``monitor`` (or the monitor the manager recorded), and a note when no
    best can be named."""
    from torchkeep.read.formats import native
    from torchkeep.keep.retention import ranked_best

    good = [i for i in infos if i.status == "ok"]
    if not good:
        return None, None
    if monitor is None and mgr is not None:
        rec = native.read_commit(mgr.storage, good[-1].path) or {}
        recorded = rec.get("monitor") if isinstance(rec.get("monitor"), dict) else {}
        monitor, mode = recorded.get("metric"), mode or recorded.get("mode")
    if not monitor:  # the manager ranked nothing: no best to mark (--monitor names a metric)
        return None, None
    ranked = ranked_best(good, monitor, mode or "min")
    if not ranked:
        return None, f"no best marked: no checkpoint has a numeric {monitor!r} metric"
    return ranked[0].step, None


def _time(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _metrics(m: dict) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in m.items()) or "-"


def _row_json(info, latest, best=None) -> dict:
    return {"step": info.step, "path": info.path, "time": info.time, "metrics": info.metrics,
            "nbytes": info.nbytes, "written": info.written, "status": info.status,
            "latest": info.step == latest, "best": info.step == best, "problems": info.problems}


def _table(out, infos, latest: int | None, title: str, best: int | None = None) -> None:
    rows = []
    for i in infos:
        marks = [m for m, s in (("latest", latest), ("best", best)) if i.step == s]
        status = i.status + (f" ({', '.join(marks)})" if marks else "")
        style = {"ok": "green", "damaged": "bold red", "uncommitted": "yellow"}.get(i.status, "default")
        rows.append((str(i.step), _time(i.time), escape(_metrics(i.metrics)),
                     human_bytes(i.nbytes) if i.status == "ok" or i.nbytes else "-",
                     human_bytes(i.written) if i.written else "-", f"[{style}]{status}[/]"))
    show_table(out, ("step", "time", "metrics", "size", "written", "status"), rows,
               right=(0, 3, 4), title=escape(title))


def _other_folders(directory: str, check: bool):
    """Checkpoint folders that are not a CheckpointManager's (transformers/accelerate folders
    sealed by torchkeep, Lightning's), or None."""
    from torchkeep.integrations import sealed
    return sealed.scan(directory, check=check)


def run_ls(args: argparse.Namespace) -> int:
    check_folder(args.directory, "ls")
    mgr = None
    infos = _other_folders(args.directory, check=False)
    if infos is not None:
        infos = [i for i in infos if i.status == "ok" or args.all]
    else:
        mgr = _manager(args.directory, "ls")
        infos = mgr.list(include_uncommitted=args.all)
    if not infos:
        raise no_checkpoints(args.directory)
    good = [i.step for i in infos if i.status == "ok"]
    latest = good[-1] if good else None
    best, note = _best(mgr, infos, args.monitor, args.mode)
    if args.json:
        print_json([_row_json(i, latest, best) for i in infos])
        return 0
    out = console()
    _table(out, infos, latest, f"{args.directory}: {len(good)} checkpoint(s)", best)
    if note:
        out.print(note, markup=False)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from torchkeep.keep.manager import CheckpointInfo
    from torchkeep.read.formats import native
    from torchkeep.store.backends import storage_for

    directory = args.directory
    check_folder(directory, "verify")
    storage, root = storage_for(directory)
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
        infos = _manager(directory, "verify").verify(deep=args.deep)
    if not infos:
        raise no_checkpoints(directory)
    bad = [i for i in infos if i.status == "damaged"]
    good = [i.step for i in infos if i.status == "ok"]
    latest = good[-1] if good else None
    if args.json:
        print_json({"ok": not bad, "checkpoints": [_row_json(i, latest) for i in infos]})
        return 1 if bad else 0
    out = console()
    _table(out, infos, latest, f"{directory}: verified {len(infos)} checkpoint(s)")
    for i in bad:
        for p in i.problems:
            out.print(f"[red]damaged[/] step {i.step}: {escape(p)}", soft_wrap=True)
    if bad:
        out.print(f"[bold red]{len(bad)} damaged[/]; restore() skips them and resumes from the "
                  f"newest good one" + (f" (step {latest})" if latest is not None else ""))
        return 1
    out.print(f"[green]all {len(infos)} good[/]")
    return 0
