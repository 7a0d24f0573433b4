"""The reward model: CLIP, losses, triplet data, training, sweeps, scoring."""
