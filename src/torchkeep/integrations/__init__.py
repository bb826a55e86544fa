"""Adapters for the frameworks people train with. Each module imports its framework only when
used, and ``import torchkeep`` imports none of them:

* :mod:`.lightning`: ``TorchkeepCheckpointIO``, a Lightning ``CheckpointIO`` plugin that writes
  every checkpoint in torchkeep's format (atomic, checksummed, deduplicated, pickle-free);
* :mod:`.transformers`: ``TorchkeepCallback`` and ``last_good_checkpoint`` for the Trainer's
  ``checkpoint-N`` folders;
* :mod:`.accelerate`: ``save_state`` and ``last_good_checkpoint`` for ``accelerator.save_state``;
* :mod:`.sealed`: what the last two share: a folder another library wrote, made durable and
  verifiable (xxh3-128 of every file in a manifest, a commit record written last).
"""
