"""``torchkeep transfer SRC --into TARGET``: plan (and with ``--out``, write) a weight transfer.

TARGET is a checkpoint file, whose names and shapes define the target, or a model factory
``package.module:Factory`` called with ``--kwargs``. Without ``--out`` nothing is changed or
written: the plan is printed. With ``--out`` the target's full state dict, transferred tensors
included, is written as safetensors (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from torch import nn

from rich.markup import escape

from torchkeep.carry.planner import MATCH_MODES, TransferReport, transfer
from torchkeep.cli import _render
from torchkeep.cli._args import check_rules
from torchkeep.cli._output import add_force, check_output
from torchkeep.cli.factory import build_model, is_factory, parse_kwargs
from torchkeep.errors import TransferError

_FATE_STYLE = {"loaded": "green", "adapted": "cyan", "missing": "yellow", "unused": "red"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transfer", help="carry the weights that fit from a checkpoint into another model",
        description="Plan which tensors of SRC go into TARGET (by name, rules, prefix and "
                    "structure; adapting shapes where sound) and print every tensor's fate. "
                    "With --out, write TARGET's full state dict with the transferred tensors.")
    p.add_argument("src", metavar="SRC", help="checkpoint to take weights from "
                                              "(or package.module:Factory)")
    p.add_argument("--into", required=True, metavar="TARGET",
                   help="checkpoint whose names and shapes define the target, "
                        "or package.module:Factory building the target model")
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=REPL",
                   help="rename source tensors (regex substitution, applied in order; repeatable)")
    p.add_argument("--match", choices=MATCH_MODES, default="auto",
                   help="how to pair tensors (default: auto = names, then structure)")
    p.add_argument("--no-adapt", action="store_true",
                   help="load only tensors whose shape and dtype fit as they are")
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments for TARGET's factory")
    p.add_argument("--out", metavar="OUT.safetensors",
                   help="write the target's full state dict here (safetensors)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2) unless every target tensor is loaded and every source tensor used")
    p.add_argument("--allow-empty", action="store_true",
                   help="with --out, write even when no tensor at all would be transferred "
                        "(otherwise that fails with exit 2)")
    p.add_argument("--dry-run", action="store_true", help="plan only; write nothing")
    add_force(p)
    p.add_argument("--trust", action="store_true",
                   help="allow code execution when opening pickle checkpoints (only for files you trust)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _open(path: str, trust: bool):
    from torchkeep.read.checkpoint import open as _open_ckpt
    return _open_ckpt(path, trust=trust)


def _target(spec: str, args: argparse.Namespace, writing: bool) -> tuple[Any, str]:
    if is_factory(spec):
        return build_model(spec, parse_kwargs(args.kwargs)), spec
    if args.kwargs:
        raise TransferError("--kwargs applies to a TARGET factory (package.module:Factory), not a file",
                            hint="drop --kwargs, or give --into as package.module:Factory")
    ckpt = _open(spec, args.trust)
    if writing:
        # Real tensors to fill in place; cloned so none is backed by a read-only file mapping.
        sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ckpt.state_dict().items()}
        return sd, spec
    refs = ckpt.state_refs()
    if not refs:
        raise TransferError("found no model weights to define the target", path=spec)
    # Names and shapes are all a plan needs: meta tensors hold no memory.
    return {k: torch.empty(r.shape, dtype=r.dtype, device="meta") for k, r in refs.items()}, spec


def _source(spec: str, args: argparse.Namespace) -> Any:
    if is_factory(spec):
        return build_model(spec)
    return _open(spec, args.trust)


def _state_dict(target: Any) -> dict[str, torch.Tensor]:
    sd = target.state_dict() if isinstance(target, nn.Module) else target
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def write_safetensors(state: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write ``state`` as safetensors all-or-nothing: temp sibling, fsync, rename, fsync folder.
    Tensors that share memory (tied weights) are written as separate copies."""
    from safetensors.torch import save_file

    from torchkeep.store.files import fsync_dir, fsync_file, tmp_name

    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        t = v.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if not t.is_contiguous() or (ptr is not None and ptr in seen):
            t = t.contiguous().clone()
        if ptr is not None:
            seen.add(ptr)
        out[k] = t
    path = os.fspath(path)
    tmp = tmp_name(path)
    try:
        save_file(out, tmp, metadata=metadata)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _render_report(report: TransferReport) -> None:
    con = _render.console()
    con.print(report.headline(), markup=False)
    methods = report.methods()
    if methods:
        con.print("matched by: " + ", ".join(f"{m} {n}" for m, n in methods.items()), markup=False)
    if report.stripped:
        con.print("source prefixes stripped: " + ", ".join(report.stripped), markup=False)
    con.print()
    rows = [(f"[{_FATE_STYLE[fate]}]{fate}[/]", escape(t), shape, escape(s), escape(detail))
            for fate, t, shape, s, detail in report.rows()]
    _render.show_table(con, ("fate", "target", "shape", "source", "detail"), rows)


def run(args: argparse.Namespace) -> int:
    writing = bool(args.out) and not args.dry_run
    check_rules(args.rule, "--rule")
    if writing:
        check_output(args.out, args.force, option="--out")
    target, target_label = _target(args.into, args, writing)
    source = _source(args.src, args)
    try:
        report = transfer(target, source, rules=args.rule or None, match=args.match,
                          adapt=not args.no_adapt, strict=args.strict, dry_run=not writing,
                          allow_empty=args.allow_empty)
    except TransferError as e:
        if not args.strict or e.hint is None or "strict=False" not in e.hint:
            raise
        raise TransferError(e.detail, path=e.path, entry=e.entry,
                            hint="drop --strict to load what fits, or add --rule REGEX=REPL "
                                 "renames; the plan without --strict lists every tensor") from None
    report.source, report.target = str(args.src), target_label
    if writing:
        meta = {"format": "pt", "torchkeep.carry.planner.source": str(args.src),
                "torchkeep.carry.planner.target": target_label,
                "torchkeep.carry.planner.counts": json.dumps(report.counts)}
        write_safetensors(_state_dict(target), args.out, meta)
    if args.json:
        d = report.to_dict()
        d["out"] = args.out if writing else None
        _render.print_json(d)
    else:
        _render_report(report)
        if writing:
            print(f"wrote {args.out} ({len(_state_dict(target))} tensors)")
        elif not args.out:
            print("(plan only: pass --out OUT.safetensors to write the transferred state dict)")
    return 0
