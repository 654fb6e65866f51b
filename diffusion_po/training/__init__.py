"""The shared trainer (accelerate), checkpoints and reference handling."""
