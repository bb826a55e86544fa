"""accelerate: ``accelerator.save_state`` folders made durable and verifiable, and the resume
that picks the newest one that is whole.

::

    from torchkeep.integrations import accelerate as tk

    tk.load_state(accelerator)                  # the newest good checkpoint, if any
    ...
    tk.save_state(accelerator)                  # instead of accelerator.save_state()

With ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)``, accelerate deletes
the oldest folders *before* it writes the new one; :func:`save_state` lets it write, seals the new
folder (fsync, manifest with the xxh3-128 of each file, commit record last,
:mod:`torchkeep.integrations.sealed`) and only then deletes what ``total_limit`` no longer keeps.
The files stay accelerate's own (its optimizer and RNG files are pickles).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from torchkeep.integrations import sealed

log = logging.getLogger(__name__)

PREFIX = "checkpoint_"   # accelerate's automatic checkpoint naming


def checkpoints_dir(accelerator: Any) -> str:
    """Where automatic checkpoint naming puts its ``checkpoint_N`` folders."""
    return os.path.join(accelerator.project_dir, "checkpoints")


def save_state(accelerator: Any, output_dir: str | os.PathLike | None = None, **kwargs: Any) -> str:
    """``accelerator.save_state(output_dir, **kwargs)``, then the folder sealed (by the main
    process) and, with automatic naming, old folders rotated. Returns the folder."""
    pc = accelerator.project_configuration
    automatic = bool(pc.automatic_checkpoint_naming)
    limit = pc.total_limit
    if automatic:
        stale = os.path.join(checkpoints_dir(accelerator), f"{PREFIX}{pc.iteration}")
        if accelerator.is_main_process and os.path.isdir(stale) and not sealed.is_sealed(stale):
            log.warning("removing %s: never sealed (a save was interrupted); writing it again", stale)
            sealed.remove(stale)
        accelerator.wait_for_everyone()
        pc.total_limit = None   # rotate after the new folder is sealed, not before it is written
    try:
        folder = os.fspath(accelerator.save_state(None if output_dir is None else os.fspath(output_dir),
                                                  **kwargs))
    finally:
        pc.total_limit = limit
    if accelerator.is_main_process:
        step = sealed.step_of(folder) if automatic else None
        sealed.seal(folder, step=step if step is not None else getattr(accelerator, "step", None))
        if automatic:
            for f in sealed.rotate(checkpoints_dir(accelerator), PREFIX, limit):
                log.info("deleted %s (total_limit=%s)", f, limit)
    accelerator.wait_for_everyone()
    return os.fspath(folder)


def last_good_checkpoint(directory: str | os.PathLike, prefix: str = PREFIX) -> str | None:
    """The newest ``<prefix>N`` folder in ``directory`` (a project folder's ``checkpoints`` is
    looked into) that is sealed and verifies; a warning names each newer one skipped."""
    directory = os.fspath(directory)
    inner = os.path.join(directory, "checkpoints")
    if not sealed.candidates(directory, prefix) and os.path.isdir(inner):
        directory = inner
    return sealed.last_good(directory, prefix)


def load_state(accelerator: Any, directory: str | os.PathLike | None = None, **kwargs: Any) -> str | None:
    """Load the newest good checkpoint of ``directory`` (default: the project's ``checkpoints``)
    into ``accelerator``; with automatic naming the next save continues the numbering. Returns
    the folder loaded, or None when there is none (a fresh run)."""
    where = directory if directory is not None else checkpoints_dir(accelerator)
    folder = last_good_checkpoint(where)
    if folder is None:
        return None
    accelerator.load_state(folder, **kwargs)
    step = sealed.step_of(folder)
    if accelerator.project_configuration.automatic_checkpoint_naming and step is not None:
        accelerator.project_configuration.iteration = step + 1
    return folder
