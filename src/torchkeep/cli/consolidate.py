"""``torchkeep consolidate DIR OUT.safetensors``: the full tensors of a checkpoint written by
several ranks (torchkeep's sharded checkpoints and plain DCP folders), in one safetensors file for
inference or a single-process run."""
from __future__ import annotations

import argparse

from rich.markup import escape

from torchkeep.cli._output import add_force, check_output
from torchkeep.cli._render import bytes_progress, console, human_bytes, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "consolidate", help="full tensors of a sharded (multi-rank) checkpoint in one safetensors file",
        description="Assemble the tensors of a checkpoint written by several ranks (a torchkeep "
                    "CheckpointManager folder, one of its step folders, or a torch.distributed."
                    "checkpoint folder) whole, whatever the number of ranks, and write them to OUT "
                    "as safetensors: the model weights under the names a bare model uses, or every "
                    "tensor with --all. Shard files are checked against their checksums first; OUT is "
                    "written under a temporary name, fsynced, verified and renamed.")
    p.add_argument("src", metavar="DIR", help="manager folder (newest checkpoint), step folder or DCP folder")
    p.add_argument("dst", metavar="OUT.safetensors", help="output file")
    p.add_argument("--step", type=int, help="the checkpoint of this step (in a manager folder)")
    p.add_argument("--all", dest="everything", action="store_true",
                   help="every tensor of the state (optimizer, RNG, ...) under its dotted path")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"],
                   help="cast float16/bfloat16/float32/float64 tensors (others are kept)")
    add_force(p)
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchkeep.look.consolidate import consolidate

    check_output(args.dst, args.force)
    with bytes_progress("consolidating") as on_progress:
        res = consolidate(args.src, args.dst, step=args.step, everything=args.everything,
                          dtype=args.dtype, overwrite=args.force, on_progress=on_progress)
    if args.json:
        print_json(res.to_dict())
        return 0
    out, err = console(), console(stderr=True)
    what = "tensors of the whole state" if args.everything else "model tensors"
    where = f" from '{res.wrapper}'" if res.wrapper else ""
    out.print(f"[green]wrote[/] {escape(res.dst)}: {res.tensors} {what}{where}, "
              f"{human_bytes(res.nbytes)}, verified in {res.seconds:.1f}s")
    if res.cast:
        out.print(f"  cast {len(res.cast)} tensors to {args.dtype}")
    for name, why in res.skipped.items():
        err.print(f"torchkeep: warning: skipped {escape(name)}: {why}")
    return 0
