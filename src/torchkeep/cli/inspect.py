"""``torchkeep inspect``: what a checkpoint holds, grouped by module, without running its code."""
from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from typing import Any

from rich.markup import escape
from rich.tree import Tree

from torchkeep.cli._render import (console, dtype_name, human_bytes, human_count, print_json,
                                   show_table)
from torchkeep.read.checkpoint import Checkpoint, Entry
from torchkeep.read.formats.base import TensorRef
from torchkeep.read.unpickler import Opaque

MAX_GROUPS = 40
MAX_VALUES = 40
MAX_NAME = 64
MAX_OPT_ROWS = 12


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what a checkpoint holds (never runs code from it)",
                       description="Show the model's parameters (count and size by dtype, buffers and "
                                   "tied names apart) under their clean names, then the optimizer "
                                   "state by parameter name, the scheduler, the progress, other "
                                   "tensors and values. Exit 2 when the archive's directory shows "
                                   "missing or short tensor storages.")
    p.add_argument("path", help="checkpoint file or folder, or package.module:Factory for a model")
    p.add_argument("--tree", action="store_true", help="show the whole nested object")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--filter", metavar="REGEX", help="only entries whose name matches")
    p.add_argument("--depth", type=int, metavar="N", help="group tensors by the first N name segments")
    p.add_argument("--all", action="store_true", help="list every tensor and every value")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments for a model factory")
    p.add_argument("--trust", action="store_true", help="allow code execution (needed only to load, "
                                                         "never to inspect)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchkeep.look.inspection import describe
    from torchkeep.read import checkpoint

    from torchkeep.cli._args import check_regex, positive
    from torchkeep.cli.factory import is_factory

    rx = check_regex(args.filter, "--filter") if args.filter else None
    if args.depth is not None:
        positive("--depth", args.depth)
    if is_factory(args.path):
        return _inspect_factory(args)
    ck = checkpoint.open(args.path, trust=args.trust)
    with ck:
        entries = ck.entries()
        values = other_values(ck.tree)
        contents = describe(ck)
        weights = _weight_entries(ck)
        if rx is not None:
            entries = [e for e in entries if rx.search(e.name)]
            weights = [e for e in weights if rx.search(e.name)]
            values = {n: v for n, v in values.items() if rx.search(n)}
        if args.json:
            print_json(_as_json(ck, entries, weights, values, contents))
        else:
            _render(ck, entries, weights, values, contents, args)
    return 2 if contents.problems else 0


def _weight_entries(ck: Checkpoint) -> list[Entry]:
    """The model weights as entries under their clean names (the prefixes stripped)."""
    from torchkeep.look.inspection import weight_refs

    return [Entry(n, tuple(r.shape), r.dtype, r.nbytes, r.storage, r.is_parameter, r.location, r,
                  getattr(r, "scheme", None) or None) for n, r in weight_refs(ck).items()]


def fit(name: str, width: int = MAX_NAME) -> str:
    """``name`` cut in the middle to ``width`` characters (long callback keys stay readable)."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep - keep // 3] + "…" + name[len(name) - keep // 3:]


def other_values(obj: Any) -> dict[str, Any]:
    """Non-tensor leaves by dotted name; short lists of plain values stay whole (betas, params)."""
    from torchkeep.read import tree as _tree_mod
    from torchkeep.read.unpickler import module_children

    def children(o: Any) -> Any:
        return module_children(o) if isinstance(o, Opaque) else None

    def scalar_seq(o: Any) -> bool:
        return isinstance(o, (list, tuple)) and len(o) <= 64 and all(
            isinstance(x, (int, float, str, bool, type(None))) for x in o)

    out: dict[str, Any] = {}

    def visit(o: Any, prefix: str) -> None:
        if scalar_seq(o) and o:
            out[prefix] = o
            return
        if isinstance(o, dict) and o:
            for k, v in o.items():
                visit(v, _tree_mod.join(prefix, k))
            return
        if isinstance(o, (list, tuple)) and o:
            for i, v in enumerate(o):
                visit(v, _tree_mod.join(prefix, i))
            return
        for name, leaf in _tree_mod.walk(o, prefix, children=children):
            if not isinstance(leaf, TensorRef):
                out[name] = leaf

    visit(obj, "")
    return out


def _verdict(ck: Checkpoint) -> tuple[str, list[str]]:
    bad = sorted({g.qualname for g in ck.globals() if g.verdict != "safe"})
    return ("safe" if not bad else "needs code execution to load fully"), bad


def group_entries(entries: list[Entry], depth: int | None) -> "OrderedDict[str, list[Entry]]":
    """Entries grouped by module path (their name without the last segment), cut to ``depth``
    segments; with no depth, the deepest grouping that fits in MAX_GROUPS rows."""
    def key(e: Entry, d: int | None) -> str:
        parts = e.name.split(".")[:-1] or ["<root>"]
        return ".".join(parts[:d] if d else parts)

    def build(d: int | None) -> "OrderedDict[str, list[Entry]]":
        groups: OrderedDict[str, list[Entry]] = OrderedDict()
        for e in entries:
            groups.setdefault(key(e, d), []).append(e)
        return groups

    if depth is not None:
        return build(depth)
    groups = build(None)
    d = max((len(e.name.split(".")) for e in entries), default=1)
    while len(groups) > MAX_GROUPS and d > 1:
        d -= 1
        groups = build(d)
    return groups


def _render(ck: Checkpoint, entries: list[Entry], weights: list[Entry], values: dict[str, Any],
            contents: Any, args: argparse.Namespace) -> None:
    out = console()
    s = ck.summary
    verdict, bad = _verdict(ck)
    size = sum(os.path.getsize(f) for f in ck.reader.files() if os.path.isfile(f))
    kind = f" · {s.kind}" if s.kind else ""
    out.print(f"[bold]{escape(ck.path)}[/]  {s.format}{kind} · {human_bytes(size)} on disk · "
              f"{'[green]' if not bad else '[yellow]'}{verdict}[/]")
    if bad:
        out.print(f"  classes not imported: {', '.join(bad[:8])}{' …' if len(bad) > 8 else ''}",
                  markup=False)
    for p in contents.problems:
        out.print(f"  [red]damaged:[/] {escape(p)}")
    for note in s.notes + contents.notes:
        out.print(f"  [dim]{escape(note)}[/]")
    if s.metadata:
        meta = ", ".join(f"{k}={v}" for k, v in list(s.metadata.items())[:6])
        out.print(f"  metadata: {fit(meta, 150)}", markup=False)
    if args.tree:
        out.print(_tree(ck.tree, os.path.basename(ck.path)))
        return
    _render_model(out, ck, weights, contents, args)
    _render_training(out, contents)
    inside = {id(e.ref) for e in weights}
    shown = _summarised(contents)
    rest = [e for e in entries if id(e.ref) not in inside and not _under(e.name, shown)]
    values = {n: v for n, v in values.items() if not _under(n, shown)}
    if rest:
        out.print(f"[bold]other tensors[/] ({human_count(len(rest))}, "
                  f"{human_bytes(sum(e.nbytes for e in rest))}):")
        _table(out, rest, args, "group")
    total = sum(e.numel for e in entries)
    out.print(f"[bold]in the file[/]: {human_count(len(entries))} tensors · {human_count(total)} "
              f"elements · {human_bytes(sum(e.nbytes for e in entries))}")
    if values:
        shown = list(values.items()) if args.all else list(values.items())[:MAX_VALUES]
        out.print("[bold]other values[/]:")
        for n, v in shown:
            out.print(f"  {fit(n)} = {_value(v)}", markup=False)
        if len(shown) < len(values):
            out.print(f"  … {len(values) - len(shown)} more (--all shows every one)")


def _summarised(contents: Any) -> list[str]:
    """Tree paths whose content the optimizer/scheduler lines already tell."""
    return [o.path for o in contents.optimizer] + list(contents.scheduler)


def _under(name: str, paths: list[str]) -> bool:
    return any(p == "<root>" or name == p or name.startswith(p + ".") for p in paths)


def _render_model(out: Any, ck: Checkpoint, weights: list[Entry], contents: Any,
                  args: argparse.Namespace) -> None:
    s, m = ck.summary, contents.model
    if s.wrapper is None:
        out.print("  model weights: none found (no mapping of names to tensors)")
        return
    where = f"'{s.wrapper}'" if s.wrapper else "the top level"
    pre = f"; prefixes stripped: {', '.join(s.prefixes)}" if s.prefixes else ""
    out.print(f"  model weights: {where} ({len(weights)} tensors){pre}", markup=False)
    if weights:
        _table(out, weights, args, "module")
    dts = ", ".join(f"{k} {human_count(v)}" for k, v in sorted(m.by_dtype.items(), key=lambda kv: -kv[1]))
    extra = []
    if m.buffers:
        extra.append(f"buffers: {m.buffers} tensors, {human_count(m.buffer_elements)} elements "
                     f"(told apart by {m.buffers_by})")
    if m.tied:
        extra.append(f"tied: {len(m.tied)} names share another's storage, counted once")
    if m.quantized:
        extra.append(f"quantized: {len(m.quantized)} tensors")
    out.print(f"[bold]model[/]: {human_count(m.parameters)} parameters · "
              f"{human_bytes(m.parameter_bytes)}" + (f" ({dts})" if dts else ""))
    for line in extra:
        out.print(f"  {line}", markup=False)


def _render_training(out: Any, c: Any) -> None:
    for o in c.optimizer:
        how = f", by parameter name (names from {o.names_from})" if o.by_name else ", by index"
        out.print(f"[bold]optimizer[/] '{escape(o.path)}': {o.family} "
                  f"({', '.join(o.state_keys) or 'no state yet'}); state for {o.params} parameters"
                  f"{how}; {human_count(o.elements)} elements, {human_bytes(o.nbytes)}")
        for name, st in list(o.state.items())[:MAX_OPT_ROWS]:
            out.print(f"  {fit(name)}: " + ", ".join(f"{k} {v}" for k, v in st.items()), markup=False)
        if len(o.state) > MAX_OPT_ROWS:
            out.print(f"  … {len(o.state) - MAX_OPT_ROWS} more parameters")
        for i, g in enumerate(o.groups):
            out.print(f"  group {i}: " + fit(", ".join(f"{k}={v}" for k, v in g.items()), 148),
                      markup=False)
    for path, sch in c.scheduler.items():
        out.print(f"[bold]scheduler[/] '{escape(path)}': " +
                  escape(", ".join(f"{k}={v}" for k, v in sch.items())))
    if c.progress:
        out.print("[bold]progress[/]: " + ", ".join(f"{k}={v}" for k, v in c.progress.items()))


def _table(out: Any, entries: list[Entry], args: argparse.Namespace, first: str) -> None:
    """Every tensor (--all) or tensors grouped by module, in the CLI's one table style."""
    if args.all:
        show_table(out, ("name", "shape", "dtype", "bytes"),
                   [(escape(fit(e.name)), _shape(e.shape), escape(_dtype(e)), human_bytes(e.nbytes))
                    for e in entries], right=(3,))
        return
    rows = []
    for g, es in group_entries(entries, args.depth).items():
        dts = sorted({_dtype(e) for e in es})
        shape = _shape(es[0].shape) if len(es) == 1 else ""
        rows.append((escape(fit(g)), str(len(es)), human_count(sum(e.numel for e in es)),
                     human_bytes(sum(e.nbytes for e in es)), escape(",".join(dts)), shape))
    show_table(out, (first, "tensors", "elements", "bytes", "dtypes", "shape"), rows, right=(1, 2, 3))


def _dtype(e: Entry) -> str:
    return dtype_name(e.dtype) + (f" [{e.scheme}]" if e.scheme else "")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")" if shape else "()"


def _value(v: Any, limit: int = 80) -> str:
    if isinstance(v, Opaque):
        return f"<{v.global_name}> (not imported)"
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def _tree(obj: Any, label: str) -> Tree:
    root = Tree(label)
    _add(root, obj, depth=0)
    return root


def _add(node: Tree, obj: Any, depth: int) -> None:
    from torchkeep.read.unpickler import module_children

    if depth > 12:
        node.add("…")
        return
    if isinstance(obj, Opaque):
        kids = module_children(obj)
        if kids is not None:
            obj = kids
        else:
            return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    for k, v in items:
        if isinstance(v, TensorRef):
            node.add(f"{k}: {dtype_name(v.dtype)}{_shape(v.shape)}")
        elif isinstance(v, (dict, list, tuple)) and v:
            _add(node.add(str(k)), v, depth + 1)
        elif isinstance(v, Opaque):
            sub = node.add(f"{k}: <{v.global_name}>")
            _add(sub, v, depth + 1)
        else:
            node.add(f"{k} = {_value(v)}")


def _as_json(ck: Checkpoint, entries: list[Entry], weights: list[Entry], values: dict[str, Any],
             contents: Any) -> dict[str, Any]:
    verdict, bad = _verdict(ck)
    s = ck.summary
    def row(e: Entry) -> dict[str, Any]:
        d = {"name": e.name, "shape": list(e.shape), "dtype": dtype_name(e.dtype), "nbytes": e.nbytes}
        if e.scheme:
            d["scheme"] = e.scheme
        return d
    c = contents.to_dict()
    return {
        "path": ck.path, "format": s.format, "kind": s.kind, "safe": not bad, "not_imported": bad,
        "wrapper": s.wrapper, "prefixes": s.prefixes, "candidates": s.candidates,
        "metadata": s.metadata, "notes": s.notes + contents.notes, "problems": contents.problems,
        "model": {**c["model"], "weights": [row(e) for e in weights]},
        "optimizer": c["optimizer"], "scheduler": c["scheduler"], "progress": c["progress"],
        "other_tensors": c["other_tensors"],
        "total": {"tensors": len(entries), "elements": sum(e.numel for e in entries),
                  "bytes": sum(e.nbytes for e in entries)},
        "entries": [row(e) for e in entries],
        "values": {n: _json_value(v) for n, v in values.items()},
    }


def _json_value(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return _value(v, limit=200)


def _inspect_factory(args: argparse.Namespace) -> int:
    from torchkeep.cli.factory import build_model, parse_kwargs
    from torchkeep.shape import summary

    model = build_model(args.path, parse_kwargs(args.kwargs))
    s = summary(model)
    if args.json:
        print_json(s.to_dict() if hasattr(s, "to_dict") else str(s))
    else:
        console().print(str(s), markup=False)
    return 0
