"""The method-blind training engine: the epoch loop, compiled units, checkpoints, many runs, logs."""
