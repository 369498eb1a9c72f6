"""MONAI dictionary transforms from a subject's files to tensors on the model grid.

Keys are modality names (one file each) and ``"mask"``. Every step allows missing keys, so one
pipeline serves subjects holding any subset of the modalities.

Steps: load with nibabel (a trailing singleton 4th dimension becomes the channel), channel first,
reorient to RAS, resample to the model grid, z-score each modality over its nonzero voxels.

Resampling choice: ``Resized`` to ``spatial_size`` (the whole field of view fills the grid), not
``Spacingd`` + ``ResizeWithPadOrCropd``. Sites' volumes share a registered field of view (the
synthetic phantoms, BraTS in SRI24 space) but differ in resolution; resizing the field of view puts
the same anatomy at the same grid coordinate at every site whatever its scanner resolution, which
the cross-site objectives rely on, and nothing is cropped away. The price is that a non-cubic field
of view is stretched to the grid's aspect ratio (consistently for all subjects of that geometry).
Images use ``area`` interpolation (MONAI's default: box averaging, i.e. anti-aliased, when
downsampling as real scans 240^3 -> 32^3 always are; about 100x faster than trilinear with Gaussian
anti-aliasing, 0.01 s vs 1.2 s per BraTS volume on CPU); where a grid axis is finer than the scan it
repeats voxels like nearest neighbour. Masks use nearest neighbour and are then binarized
(label > 0); note that nearest-neighbour downsampling can drop a lesion smaller than a grid voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    Resized,
)

MASK_KEY = "mask"


def site_transforms(modalities: Sequence[str], spatial_size: Sequence[int], with_mask: bool) -> Compose:
    """Compose mapping {modality: path, ["mask": path]} to float32 tensors [1, *spatial_size].

    Modalities are z-scored over their nonzero voxels (brain MR: the background stays 0); the mask
    (only when ``with_mask``) is resampled with nearest neighbour and binarized to 0/1.
    """
    images = list(modalities)
    keys = images + [MASK_KEY] if with_mask else images
    size = tuple(int(s) for s in spatial_size)
    steps = [
        LoadImaged(keys, reader="NibabelReader", image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(keys, allow_missing_keys=True),
        Orientationd(keys, axcodes="RAS", labels=None, allow_missing_keys=True),
        Resized(images, spatial_size=size, mode="area", allow_missing_keys=True),
        NormalizeIntensityd(images, nonzero=True, channel_wise=True, allow_missing_keys=True),
    ]
    if with_mask:
        steps += [
            Resized(MASK_KEY, spatial_size=size, mode="nearest-exact", allow_missing_keys=True),
            AsDiscreted(MASK_KEY, threshold=0.5, allow_missing_keys=True),
        ]
    steps.append(EnsureTyped(keys, data_type="tensor", track_meta=False, allow_missing_keys=True))
    return Compose(steps)
