"""The PIR network, its losses, augmentations, heads and evaluation metrics."""
