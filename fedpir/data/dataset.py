"""Training datasets of one site: validated subjects as fixed-size multi-modal tensors.

Items are dicts (torch's default_collate batches them; "subject" becomes a list of str):
``image`` float32 [M, D, H, W] in the order of the federation's modality vocabulary (zeros where
the subject lacks a modality), ``present`` bool [M], ``mask`` float32 [1, D, H, W] (zeros if none),
``has_mask`` bool, ``label`` int64 (-1 if unknown), ``subject`` str.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, Dataset
from torch.utils.data import Dataset as TorchDataset

from fedpir.data.manifest import SiteManifest, SubjectRecord
from fedpir.data.transforms import MASK_KEY, site_transforms
from fedpir.data.validation import ValidationReport, validate_site


def _source_dict(rec: SubjectRecord, modalities: Sequence[str]) -> dict[str, Any]:
    """MONAI input of one subject: a path per vocabulary modality it has, its mask, label and id."""
    item: dict[str, Any] = {m: str(rec.images[m]) for m in modalities if m in rec.images}
    if rec.mask is not None:
        item[MASK_KEY] = str(rec.mask)
    item["label"] = -1 if rec.label is None else rec.label
    item["subject"] = rec.subject_id
    return item


#: The share of this machine's memory that a site's cached volumes may take.
CACHE_MEMORY_SHARE = 0.5


def cache_bytes(subjects: int, modalities: int, spatial_size: Sequence[int]) -> int:
    """Memory the cached, preprocessed volumes of ``subjects`` take (float32, every modality and the mask)."""
    return subjects * (modalities + 1) * math.prod(int(edge) for edge in spatial_size) * 4


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_cache_fits(needed: int, available: int, what: str) -> None:
    """ValueError (one line, with the way out) if ``needed`` bytes exceed :data:`CACHE_MEMORY_SHARE` of ``available``."""
    if needed > CACHE_MEMORY_SHARE * available:
        raise ValueError(f"{what} would take {needed / 2**30:.1f} GiB in memory, more than "
                         f"{CACHE_MEMORY_SHARE:.0%} of this machine's {available / 2**30:.1f} GiB; "
                         "choose a smaller volume size (--size)")


class SiteDataset(TorchDataset):
    """Subjects of one site as model-ready dicts (see the module docstring).

    Modalities a subject has beyond ``modalities`` are not loaded. With ``cache`` the deterministic
    preprocessing runs once per subject (MONAI CacheDataset) and items are served from memory.
    """

    def __init__(
        self,
        records: list[SubjectRecord],
        modalities: Sequence[str],
        spatial_size: Sequence[int] = (32, 32, 32),
        cache: bool = True,
    ) -> None:
        if not modalities:
            raise ValueError("SiteDataset needs at least one modality")
        self.modalities = list(modalities)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.records = list(records)
        if cache:
            check_cache_fits(cache_bytes(len(self.records), len(self.modalities), self.spatial_size), machine_memory(),
                             f"caching {len(self.records)} subjects at {'x'.join(map(str, self.spatial_size))} voxels")
        data = [_source_dict(rec, self.modalities) for rec in self.records]
        transform = site_transforms(self.modalities, self.spatial_size, with_mask=True)
        self._data: Dataset = (
            CacheDataset(data, transform, progress=False) if cache else Dataset(data, transform)
        )

    def __len__(self) -> int:
        return len(self._data)

    def with_only(self, keep: Sequence[str], cache: bool = True) -> SiteDataset:
        """The subjects that have one of the modalities ``keep``, with only those loaded (public
        lesion masks often come with few modalities); the files must still be readable."""
        unknown = sorted(set(keep) - set(self.modalities))
        if not keep or unknown:
            raise ValueError(f"modalities {list(keep)} must be a non-empty subset of {self.modalities}")
        records = [replace(rec, images={m: p for m, p in rec.images.items() if m in keep}) for rec in self.records]
        return SiteDataset([rec for rec in records if rec.images], self.modalities, self.spatial_size, cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        loaded = self._data[index]
        zeros = torch.zeros((1, *self.spatial_size), dtype=torch.float32)
        present = [m in loaded for m in self.modalities]
        return {
            "image": torch.cat([loaded[m] if p else zeros for m, p in zip(self.modalities, present)]),
            "present": torch.tensor(present, dtype=torch.bool),
            "mask": loaded.get(MASK_KEY, zeros),
            "has_mask": torch.tensor(MASK_KEY in loaded),
            "label": torch.tensor(loaded["label"], dtype=torch.int64),
            "subject": loaded["subject"],
        }


class DataPathError(ValueError):
    """A site's manifest points outside its folders: training refuses the whole site."""


def load_site(
    source: Path | str | SiteManifest,
    modalities: Sequence[str],
    spatial_size: Sequence[int] = (32, 32, 32),
    cache: bool = True,
    data_roots: Sequence[Path | str] = (),
) -> tuple[SiteDataset, ValidationReport]:
    """Validate a site, then build its dataset on the good subjects (bad ones are in the report).

    Raises DataPathError if any subject has a file outside the site folder and ``data_roots``: a
    manifest that reaches elsewhere is a configuration to fix, not a subject to skip.
    """
    report = validate_site(source, data_roots)
    if report.outside:
        first = report.outside[0]
        raise DataPathError(f"site {report.site}: {len(report.outside)} subject(s) have files outside the site "
                            f"folder, training refused; first: {first} (run `fedpir validate` for all)")
    return SiteDataset(report.good, modalities, spatial_size, cache=cache), report
