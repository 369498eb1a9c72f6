"""Synthetic hospital federation (MR phantoms), local federation runner, reports."""
