"""Per-patient random streams and the augmentations used by the pretraining losses.

Privacy unit = patient: a patient's augmentations must not depend on which other patients share
its batch, otherwise its loss (and per-sample gradient) would. Every random draw therefore comes
from a stream keyed by (patient seed, modality, purpose), never from a batch-level generator.

The intensity augmentation is written with torch ops rather than MONAI's RandGaussianNoise /
RandAdjustContrast / RandBiasField because those draw from a NumPy RandomState per transform
object; here the draws come from the per-patient ``torch.Generator`` streams, on the CPU, so the
same patient gets the same views on CPU and GPU and whatever its batch.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class Purpose(IntEnum):
    """Key of the random stream a draw comes from."""

    ROTATION = 0
    VIEW_A = 1
    VIEW_B = 2
    MIM = 3
    CROPS = 4
    FINETUNE = 5


def patient_seeds(batch_size: int, seeds: Tensor | None = None, generator: torch.Generator | None = None) -> list[int]:
    """One seed per patient: ``seeds`` if given (e.g. ``batch["seed"]``), else drawn from ``generator``."""
    if seeds is not None:
        if seeds.shape != (batch_size,):
            raise ValueError(f"seeds must have shape ({batch_size},), got {tuple(seeds.shape)}")
        return [int(s) for s in seeds.tolist()]
    return torch.randint(0, 2**62, (batch_size,), generator=generator).tolist()


def stream(seed: int, modality: int, purpose: Purpose) -> torch.Generator:
    """CPU generator for one (patient seed, modality, purpose), mixed by NumPy's SeedSequence."""
    state = np.random.SeedSequence([seed % 2**63, modality, int(purpose)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) % 2**63)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def intensity_view(
    x: Tensor,
    g: torch.Generator,
    noise_std: tuple[float, float] = (0.0, 0.1),
    gamma: tuple[float, float] = (0.7, 1.5),
    bias_strength: float = 0.3,
) -> Tensor:
    """An intensity-only view of one volume x [C, D, H, W] (no spatial change).

    Gamma contrast on the min-max rescaled volume, a smooth multiplicative bias field (random
    2x2x2 log-field, trilinearly upsampled) on the intensities above the minimum, additive noise.
    """
    low = x.amin()
    span = (x.amax() - low).clamp(min=1e-6)
    unit = (x - low) / span
    unit = unit.clamp(min=0) ** _uniform(g, *gamma)
    log_field = bias_strength * (2 * torch.rand((1, 1, 2, 2, 2), generator=g) - 1)
    field = F.interpolate(log_field, size=tuple(x.shape[1:]), mode="trilinear", align_corners=True).exp()[0]
    out = unit * field.to(x) * span + low
    noise = torch.randn(tuple(x.shape), generator=g) * _uniform(g, *noise_std)
    return out + noise.to(x)


def random_rotation(g: torch.Generator) -> int:
    """k in {0, 1, 2, 3}: the number of 90 degree turns."""
    return int(torch.randint(4, (), generator=g))


def rotate(x: Tensor, k: int) -> Tensor:
    """Rotate x [..., H, W] by k * 90 degrees in the (H, W) plane."""
    return torch.rot90(x, k, dims=(-2, -1))


def patch_mask(shape: tuple[int, int, int], g: torch.Generator, patch: int = 4, ratio: float = 0.75) -> Tensor:
    """Bool [D, H, W], True on a random ``ratio`` of the ``patch``^3 blocks (masked image modeling)."""
    if any(s % patch for s in shape):
        raise ValueError(f"spatial size {shape} must be divisible by the MIM patch size {patch}")
    grid = tuple(s // patch for s in shape)
    count = int(np.prod(grid))
    masked = torch.zeros(count, dtype=torch.bool)
    masked[torch.randperm(count, generator=g)[: round(ratio * count)]] = True
    mask = masked.view(grid)
    for dim in range(3):
        mask = mask.repeat_interleave(patch, dim=dim)
    return mask


def crop_starts(
    shape: tuple[int, int, int], crop: tuple[int, int, int], count: int, g: torch.Generator
) -> list[tuple[int, int, int]]:
    """``count`` distinct corners of non-overlapping crops on the grid of crop-sized cells."""
    grid = [s // c for s, c in zip(shape, crop)]
    cells = int(np.prod(grid))
    if count > cells:
        raise ValueError(f"{count} crops of {crop} do not fit without overlap in {shape}")
    picked = torch.randperm(cells, generator=g)[:count].tolist()
    return [tuple(int(i) * c for i, c in zip(np.unravel_index(p, grid), crop)) for p in picked]
