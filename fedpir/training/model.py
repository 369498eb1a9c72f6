"""The federation's model for a run's settings, built the same way at the server and at every site."""

from __future__ import annotations

from pathlib import Path

import torch

from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.models.warm_start import load_warm_start
from fedpir.run_config import RunSettings


def build_model(settings: RunSettings) -> PIRNet:
    """The federation's model for a run's settings, identical at the server and at every site:
    seeded, then loaded from the run's public warm start when it names one (checksum checked)."""
    torch.manual_seed(settings.seed)
    size = settings.volume_size
    model = PIRNet(PIRConfig(modalities=settings.vocabulary, spatial_size=(size, size, size)))
    if settings.warm_start:
        load_warm_start(model, Path(settings.warm_start), settings.warm_start_sha256)
    return model
