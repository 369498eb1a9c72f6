"""Shared-only aggregation strategies, robust and modality-aware aggregation, baselines."""
