"""A run directory: its checksummed, atomically written artifacts, checkpoints and cache policy."""
