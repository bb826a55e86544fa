"""Plain aligned text tables: what every report's ``__str__`` and the CLI print when piped."""
from __future__ import annotations

from typing import Iterable, Sequence


def aligned(header: Sequence[str], rows: Iterable[Sequence[object]], *,
            right: Iterable[int] = ()) -> str:
    """``header`` and ``rows`` as columns two spaces apart; columns whose index is in ``right``
    are right-aligned. Nothing is cut and no line is padded past its last column."""
    table = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    n = max(len(r) for r in table)
    for r in table:
        r.extend([""] * (n - len(r)))
    widths = [max(len(r[i]) for r in table) for i in range(n)]
    rset = set(right)
    lines = []
    for r in table:
        cells = [r[i].rjust(widths[i]) if i in rset else r[i].ljust(widths[i]) for i in range(n)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


__all__ = ["aligned"]
