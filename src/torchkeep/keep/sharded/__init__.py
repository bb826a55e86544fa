"""Saving and restoring across the ranks of a process group through torch.distributed.checkpoint."""
