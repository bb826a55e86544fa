"""Write the HTML report: prepare the data, stream the statistics, render, write atomically."""
from __future__ import annotations

import os
from typing import Callable

from torchkeep.look.report.data import ReportData, ReportOptions, prepare
from torchkeep.look.report.page import render_html
from torchkeep.store.files import atomic_write


def write_report(path: str | os.PathLike, other: str | os.PathLike | None = None,
                 out: str | os.PathLike = "report.html", *, options: ReportOptions | None = None,
                 progress: Callable[[int], None] | None = None) -> ReportData:
    """Analyse ``path`` (and the pair ``path`` → ``other``) and write the page to ``out``
    atomically. Returns what the page shows."""
    with prepare(path, other, options) as plan:
        data = plan.collect(progress)
    page = render_html(data)
    with atomic_write(out, "w") as f:
        f.write(page)
    return data
