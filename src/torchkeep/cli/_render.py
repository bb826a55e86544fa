"""Shared rendering for the CLI, one style for every command: rich tables and colour on a
terminal, plain aligned text when piped (no box characters, no padding or wrapping at 80
columns), strict JSON, and progress bars (bytes and throughput) on a terminal only."""
from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table
from rich.text import Text

from torchkeep.look.textable import aligned

# Wide enough that a piped line is never wrapped; soft_wrap keeps rich from padding it.
_PIPED_WIDTH = 100_000


def console(stderr: bool = False) -> Console:
    """A rich console: styled on a terminal; plain, unwrapped and unpadded when piped."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(stderr=stderr, highlight=False, soft_wrap=not tty,
                   width=None if tty else _PIPED_WIDTH)


def show_table(out: Console, header: Sequence[str], rows: Iterable[Sequence[str]], *,
               right: Iterable[int] = (), title: str | None = None) -> None:
    """Print a table: a rich table on a terminal, :func:`torchkeep.look.textable.aligned` text when
    piped. Cells may hold rich markup (``[green]ok[/]``); it is dropped when piped."""
    rows = [list(r) for r in rows]
    right = set(right)
    if out.is_terminal:
        t = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
        for i, col in enumerate(header):
            t.add_column(col, justify="right" if i in right else "left")
        for r in rows:
            t.add_row(*r)
        out.print(t)
        return
    if title:
        out.print(Text.from_markup(title).plain, markup=False)
    plain = [[Text.from_markup(c).plain for c in r] for r in rows]
    out.print(aligned(header, plain, right=right), markup=False)


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


NONFINITE_SUFFIX = "_nonfinite"


def _nonfinite(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``null``, flagged next to it: a dict value
    at key ``k`` adds ``k_nonfinite: "inf"|"-inf"|"nan"``; floats inside a list at key ``k`` add
    ``k_nonfinite: {"<index>": "nan", ...}``. Tuples become lists; other objects their str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            k = str(k)
            if isinstance(v, float) and not math.isfinite(v):
                out[k], out[k + NONFINITE_SUFFIX] = None, _nonfinite(v)
                continue
            out[k] = strict_json(v)
            if isinstance(v, (list, tuple)):
                bad = {str(i): _nonfinite(x) for i, x in enumerate(v)
                       if isinstance(x, float) and not math.isfinite(x)}
                if bad:
                    out[k + NONFINITE_SUFFIX] = bad
        return out
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def print_json(obj: Any) -> None:
    """Strict JSON on stdout (RFC 8259: no NaN or Infinity), see :func:`strict_json`."""
    json.dump(strict_json(obj), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


class _Quiet:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, completed: float, total: float | None = None) -> None:
        pass


@contextmanager
def progress(description: str, total: float | None, *, unit: str = "bytes") -> Iterator[Any]:
    """A progress bar on a terminal (stderr); a no-op object when piped. With ``unit="bytes"``
    it shows bytes done and throughput; a spinner and the elapsed time move from the start,
    before the first byte arrives."""
    if not sys.stderr.isatty():
        yield _Quiet()
        return
    cols: list[Any] = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
    if unit == "bytes":
        cols += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
    else:
        cols += [TextColumn("{task.completed:.0f}/{task.total:.0f}")]
    cols += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=console(stderr=True), transient=True,
                  refresh_per_second=10) as p:
        task = p.add_task(description, total=total)

        class _Bar:
            def advance(self, n: float = 1) -> None:
                p.advance(task, n)

            def update(self, completed: float, total: float | None = None) -> None:
                p.update(task, completed=completed, total=total)
        yield _Bar()


@contextmanager
def bytes_progress(description: str) -> Iterator[Any]:
    """A byte progress bar driven by ``on_progress(done, total)`` callbacks (the library's
    progress hook, in bytes); yields that callback. Quiet when piped."""
    with progress(description, None) as bar:
        def on_progress(done: int, total: int) -> None:
            bar.update(done, total)

        yield on_progress


percent_progress = bytes_progress  # the former name
