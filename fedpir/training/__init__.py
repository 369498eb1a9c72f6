"""Local training: the trainer (DP-SGD), model building and the public warm-start recipe."""
