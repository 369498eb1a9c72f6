"""Flower ServerApp: stages, rounds, checkpoint and resume, metrics, model export."""
