"""Training: train state and update step, optimizers and schedules, checkpoints (verified by
checksums), metric writers and the Python configs' helpers."""
