"""The transformers ``Trainer``: every ``checkpoint-N`` folder it writes made durable and
verifiable, and the resume that picks the newest one that is whole.

::

    from torchkeep.integrations.transformers import TorchkeepCallback, last_good_checkpoint

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[TorchkeepCallback()])
    trainer.train(resume_from_checkpoint=last_good_checkpoint(args.output_dir))

After the Trainer saved a checkpoint, the callback fsyncs its files, writes a manifest with the
xxh3-128 of each and then a commit record (:mod:`torchkeep.integrations.sealed`). It takes over
``save_total_limit``: the Trainer deletes old folders *before* the new one is complete, so a kill
at that moment can leave no good checkpoint; the callback deletes them only after the new one is
sealed (commit record first), and never the newest good one or the best one. The files stay the
Trainer's own (its optimizer and RNG files are pickles, loaded by the Trainer as usual).
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from transformers import TrainerCallback

from torchkeep.integrations import sealed

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"   # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR + "-"


def last_good_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that is sealed and whose every file
    matches its manifest (for ``trainer.train(resume_from_checkpoint=...)``); a warning names
    each newer folder skipped and why. None when there is none (train from scratch)."""
    return sealed.last_good(output_dir, PREFIX)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class TorchkeepCallback(TrainerCallback):
    """Seals each checkpoint the Trainer saves, and rotates them (``save_total_limit``) only
    once the new one is sealed. Add it to ``Trainer(callbacks=[...])``."""

    def __init__(self) -> None:
        self.keep: int | None = None
        self._took_rotation = False

    def _take_rotation(self, args: Any) -> None:
        if self._took_rotation:
            return
        self._took_rotation = True
        self.keep = args.save_total_limit
        if self.keep:
            args.save_total_limit = None   # the Trainer would delete before the new one is whole
            log.info("torchkeep rotates the checkpoints (save_total_limit=%d) once each is sealed",
                     self.keep)

    def on_init_end(self, args, state, control, **kwargs):
        self._take_rotation(args)

    def on_train_begin(self, args, state, control, **kwargs):
        self._take_rotation(args)

    def _folder(self, args: Any, state: Any) -> str:
        return os.path.join(args.output_dir, f"{PREFIX}{state.global_step}")

    def _before_save(self, args: Any, state: Any, control: Any) -> None:
        # A resumed run may write a step again: its old folder stops being a checkpoint first.
        if control.should_save and args.should_save:
            folder = self._folder(args, state)
            if os.path.isdir(folder):
                sealed.unseal(folder)

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        _barrier()                 # every process has written its part of the folder
        if not args.should_save:   # another process of a multi-process run
            return
        folder = self._folder(args, state)
        if not os.path.isdir(folder):
            warnings.warn(f"torchkeep: the Trainer reported a save but {folder} does not exist "
                          f"(a hyperparameter search writes into run-* folders; those are not sealed)",
                          stacklevel=2)
            return
        sealed.seal(folder, step=state.global_step)
        removed = sealed.rotate(args.output_dir, PREFIX, self.keep,
                                protect=[state.best_model_checkpoint])
        for f in removed:
            log.info("deleted %s (save_total_limit=%s)", f, self.keep)
