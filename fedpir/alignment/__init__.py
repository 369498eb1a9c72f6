"""Latent-space alignment: anchor maps, text encoders, zero-shot, stitching and the alignment records."""
