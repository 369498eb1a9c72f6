"""Differential privacy (Opacus DP-SGD), budget and ledger, secure aggregation, encryption."""
