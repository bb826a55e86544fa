"""``torchkeep convert SRC DST``: model weights to safetensors (or a torch file), renamed, cast or
sharded, written atomically and verified before success is reported."""
from __future__ import annotations

import argparse

from rich.markup import escape

from torchkeep.cli._args import check_rules
from torchkeep.cli._output import add_force, check_output
from torchkeep.cli._render import bytes_progress, console, human_bytes, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="write a checkpoint's weights as safetensors (or .pt), verified",
                       description="Read the model weights of SRC (found inside common wrappers, "
                                   "'module.'/'_orig_mod.' stripped) and write them to DST: safetensors, "
                                   "or torch.save when DST ends in .pt/.pth/.bin/.ckpt; a folder of "
                                   "shards with an index with --max-shard-size. Tensors sharing storage "
                                   "are written once and recorded as aliases. The file is written under "
                                   "a temporary name, fsynced, verified against SRC and then renamed.")
    p.add_argument("src", metavar="SRC", help="checkpoint file or folder")
    p.add_argument("dst", metavar="DST", help="output file (or folder with --max-shard-size)")
    p.add_argument("--strip-prefix", metavar="P", help="remove this prefix from every name")
    p.add_argument("--add-prefix", metavar="P", help="put this prefix before every name")
    p.add_argument("--rename", action="append", default=[], metavar="REGEX=REPL",
                   help="rewrite names with a regular expression (repeatable, applied in order)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"],
                   help="cast float16/bfloat16/float32/float64 tensors (others are kept)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="write shards of at most SIZE (e.g. 2GB, 500MB)")
    p.add_argument("--format", choices=["safetensors", "torch"],
                   help="output format (default: from DST's extension; safetensors otherwise)")
    add_force(p)
    p.add_argument("--trust", action="store_true", help="allow code execution to load the weights")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchkeep.look.conversion import convert

    check_output(args.dst, args.force)
    check_rules(args.rename, "--rename")
    with bytes_progress("converting") as on_progress:
        res = convert(args.src, args.dst, strip_prefix=args.strip_prefix, add_prefix=args.add_prefix,
                      rename=args.rename, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      trust=args.trust, format=args.format, overwrite=args.force,
                      on_progress=on_progress)
    if args.json:
        print_json(res.to_dict())
        return 0
    out, err = console(), console(stderr=True)
    where = f" from '{res.wrapper}'" if res.wrapper else ""
    pre = f", stripped {', '.join(res.prefixes)}" if res.prefixes else ""
    out.print(f"[green]wrote[/] {escape(res.dst)} ({res.format}): {res.tensors} tensors{where}{pre}, "
              f"{human_bytes(res.nbytes)} in {len(res.files)} file{'s' if len(res.files) != 1 else ''}, "
              f"verified against the source in {res.seconds:.1f}s")
    if res.aliases:
        shown = ", ".join(f"{a} → {b}" for a, b in list(res.aliases.items())[:4])
        more = f" (+{len(res.aliases) - 4} more)" if len(res.aliases) > 4 else ""
        out.print(f"  shared tensors written once: {escape(shown)}{more}")
    if res.renamed:
        out.print(f"  renamed {len(res.renamed)} tensors")
    if res.cast:
        out.print(f"  cast {len(res.cast)} tensors to {args.dtype}")
    for name, why in res.skipped.items():
        err.print(f"torchkeep: warning: skipped {escape(name)}: {why}")
    if res.unshared:
        err.print(f"torchkeep: warning: {len(res.unshared)} tensors shared storage in the source but "
                  f"are written as separate copies: {escape(', '.join(res.unshared[:4]))}")
    return 0

