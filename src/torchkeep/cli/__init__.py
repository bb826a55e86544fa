"""The ``torchkeep`` command: one module per command group, each with ``register(sub)``.

Errors print one line ``torchkeep: error: ...`` on stderr and exit 2; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from torchkeep.errors import TorchkeepError

# Command modules under torchkeep.cli; each defines register(subparsers).
COMMAND_MODULES = ["inspect", "scan", "diff", "convert", "transfer", "manage", "demo",
                   "consolidate", "report", "doctor"]


def build_parser() -> argparse.ArgumentParser:
    from torchkeep.version import __version__

    p = argparse.ArgumentParser(prog="torchkeep", description="Keep PyTorch model and training state.")
    p.add_argument("--version", action="version", version=f"torchkeep {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"torchkeep.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"torchkeep.cli.{name}":
                continue
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted before or after the command
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="torchkeep: %(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("torchkeep: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (TorchkeepError, OSError, ValueError) as e:
        if debug:
            raise
        msg = str(e) if isinstance(e, TorchkeepError) else _os_message(e)
        print(f"torchkeep: error: {msg}", file=sys.stderr)
        return 2


def _os_message(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
