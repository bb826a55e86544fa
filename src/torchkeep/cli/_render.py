"""Shared rendering helpers for the CLI: consoles, sizes, progress bars quiet when piped."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def console(stderr: bool = False) -> Console:
    """A rich console; when piped, wide enough that tables are not cut to 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def human_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: int) -> str:
    return f"{n:,}"


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


@contextmanager
def progress(description: str, total: float | None) -> Iterator[Any]:
    """A progress bar on a terminal (stderr); a no-op object when piped."""
    if not sys.stderr.isatty():
        class _Quiet:
            def advance(self, n: float = 1) -> None:
                pass
        yield _Quiet()
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=console(stderr=True), transient=True) as p:
        task = p.add_task(description, total=total)

        class _Bar:
            def advance(self, n: float = 1) -> None:
                p.advance(task, n)
        yield _Bar()


@contextmanager
def percent_progress(description: str) -> Iterator[Any]:
    """A progress bar driven by ``on_progress(done, total)`` callbacks (the library's progress
    hook); yields that callback. Quiet when piped, like :func:`progress`."""
    with progress(description, 100) as bar:
        shown = [0.0]

        def on_progress(done: int, total: int) -> None:
            pct = 100.0 * done / total if total else 100.0
            bar.advance(pct - shown[0])
            shown[0] = pct

        yield on_progress
