"""Consolidate a rank-sharded checkpoint into one safetensors file."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import torch

from torchkeep.errors import CorruptCheckpointError, StateError
from torchkeep.read.formats import native
from torchkeep.read.formats import nativeshards as sharded

if TYPE_CHECKING:  # pragma: no cover
    from torchkeep.look.conversion import ConvertResult


def consolidate(src: str | os.PathLike, dst: str | os.PathLike, *, step: int | None = None,
                everything: bool = False, dtype: str | torch.dtype | None = None,
                overwrite: bool = False, verify: bool = True,
                on_progress: Callable[[int, int], None] | None = None) -> "ConvertResult":
    """Write the full tensors of a sharded checkpoint into one safetensors file, for inference
    or for a single-process run.

    ``src`` is a manager's folder (its newest committed checkpoint, or ``step``), one checkpoint
    folder, or a plain DCP folder. By default the model weights are written under the names a
    bare model uses; ``everything`` writes every tensor of the state under its dotted path
    (``optimizer.state.fc.weight.exp_avg``). With ``verify`` (the default) the shard files are
    checked against the manifest's checksums first. The output is written under a temporary name,
    fsynced, re-read and compared, then renamed into place (see :func:`torchkeep.convert`).
    """
    from torchkeep.look.conversion import convert
    from torchkeep.read.checkpoint import open as open_checkpoint
    from torchkeep.read.formats.base import TensorRef
    from torchkeep.store.backends import storage_for

    path = os.fspath(src)
    if step is not None:
        path = os.path.join(path, native.step_dirname(int(step)))
        if not os.path.isdir(path):
            raise StateError(f"no checkpoint at step {step}", path=os.fspath(src))
    ck = open_checkpoint(path)
    try:
        folder = getattr(ck.reader, "folder", None)
        if verify and ck.format == "torchkeep" and folder:
            storage, _ = storage_for(folder)
            manifest = ck.reader.manifest  # type: ignore[attr-defined]
            bad = sharded.verify(storage, folder, manifest)
            if bad:
                raise CorruptCheckpointError(str(bad[0]), path=folder,
                                             hint="torchkeep verify shows every problem")
        if everything:
            flat = {k: v for k, v in ck.flat().items() if isinstance(v, TensorRef)}
            return convert(flat, dst, dtype=dtype, overwrite=overwrite, on_progress=on_progress)
        return convert(ck, dst, dtype=dtype, overwrite=overwrite, on_progress=on_progress)
    finally:
        ck.close()
