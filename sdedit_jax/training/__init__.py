"""Training: the loop's pieces, losses, orbax checkpoints, training data."""
