"""The ``torchkeep`` command: one module per command group, each with ``register(sub)``.

Every failure ends in one line on stderr, ``torchkeep: error: <what> (<what to do>)``, and exit
status 2; ``--debug`` shows the traceback instead. Usage mistakes name the command whose usage
they break (``torchkeep inspect x --jsn`` prints inspect's usage, not the top level's).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import re
import sys

from torchkeep.errors import TorchkeepError

# Command modules under torchkeep.cli; each defines register(subparsers).
COMMAND_MODULES = ["inspect", "scan", "diff", "convert", "transfer", "manage", "demo",
                   "consolidate", "report", "doctor"]


class UsageError(Exception):
    """A command line argparse rejected, with the parser whose usage it breaks."""

    def __init__(self, message: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message, self)


def build_parser() -> argparse.ArgumentParser:
    from torchkeep.version import __version__

    p = _Parser(prog="torchkeep", description="Keep PyTorch model and training state.",
                epilog="Exit status: 0 success, 1 a check found something (diff: different, scan: "
                       "unsafe, verify: damaged, doctor: diverged), 2 error. --json output is "
                       "strict JSON. See README.md#exit-codes-and-json.")
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
    p.set_defaults(_subparsers=sub)
    return p


def _usage_line(e: UsageError) -> str:
    """One line: what argparse objected to, a close option name if there is one, the usage of
    the command at fault, and where to read more."""
    parser, msg = e.parser, str(e)
    hint = ""
    m = re.match(r"unrecognized arguments: (.*)", msg)
    if m:
        options = [s for a in parser._actions for s in a.option_strings]
        close = [c for w in m.group(1).split() if w.startswith("-")
                 for c in difflib.get_close_matches(w.split("=")[0], options, n=1)]
        if close:
            hint = f"did you mean {' '.join(dict.fromkeys(close))}? "
    usage = " ".join(parser.format_usage().split())
    return f"{parser.prog}: {msg} ({hint}{usage}; '{parser.prog} --help' explains every option)"


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = getattr(args, "_subparsers", None)
        culprit = sub.choices.get(args.command, parser) if sub and args.command else parser
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}", culprit)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted before or after the command
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="torchkeep: %(levelname)s: %(message)s")
    parser = build_parser()
    try:
        args = _parse(parser, argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("torchkeep: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except UsageError as e:
        if debug:
            raise
        _fail(_usage_line(e))
    except Exception as e:  # noqa: BLE001 - every failure ends in one line, exit 2
        if debug:
            raise
        _fail(error_message(e))
    return 2


def _fail(line: str) -> None:
    print(f"torchkeep: error: {' '.join(line.split())}", file=sys.stderr)


_OS_HINTS = {FileNotFoundError: "check the path", IsADirectoryError: "expected a file, got a folder",
             NotADirectoryError: "expected a folder, got a file",
             PermissionError: "check the permissions of the file and its folder"}


def error_message(e: BaseException) -> str:
    """What went wrong in one line, with what to do in parentheses."""
    if isinstance(e, TorchkeepError):
        return str(e)
    if isinstance(e, OSError):
        what = f"{e.filename}: {e.strerror or e}" if e.filename else (e.strerror or str(e))
        hint = next((h for t, h in _OS_HINTS.items() if isinstance(e, t)), None)
        return what if hint is None or "(" in what else f"{what} ({hint})"
    if isinstance(e, re.error):
        return f"invalid regular expression {e.pattern!r}: {e} (quote it for the shell; escape ( ) [ ] with a backslash)"
    if isinstance(e, ValueError):
        return str(e)
    return (f"{type(e).__name__}: {e} (unexpected; run again with --debug for the traceback "
            f"and report it)")
