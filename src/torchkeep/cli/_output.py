"""One overwrite rule for every command that writes a file: an existing output is refused
unless ``--force`` is given, and a destination whose folder does not exist is named as such
(not as the temporary file the write would have gone through). Checked before any work."""
from __future__ import annotations

import argparse
import os

from torchkeep.errors import TorchkeepError


def add_force(p: argparse.ArgumentParser) -> None:
    """``--force`` (and its old spelling ``--overwrite``, hidden) on a command that writes."""
    p.add_argument("--force", action="store_true", help="replace the output if it exists")
    p.add_argument("--overwrite", dest="force", action="store_true", help=argparse.SUPPRESS)


def check_output(path: str, force: bool, *, option: str = "") -> None:
    """Raise a one-line error when ``path`` cannot be written under the overwrite rule."""
    what = f"{option} {path}" if option else path
    if os.path.isdir(path) and not force:
        raise TorchkeepError(f"{what} exists and is a folder",
                             hint="pass --force to replace it, or choose another name")
    if os.path.exists(path) and not force:
        raise TorchkeepError(f"{what} exists", hint="pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        kind = "is a file, not a folder" if os.path.exists(parent) else "does not exist"
        raise TorchkeepError(f"cannot write {path}: its folder {os.path.dirname(path) or parent} {kind}",
                             hint="create the folder first, or choose another destination")
