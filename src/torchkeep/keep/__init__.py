"""Keep training state: TrainState and its parts, CheckpointManager, retention, the sharded writer
behind the manager's seam, the resume doctor, and the migrating restore (which calls carry)."""
