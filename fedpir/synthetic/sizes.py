"""The light facts of a synthetic federation (no numpy, so the commands can check flags at once): how many
patients each site holds, and the names of the lesion classes (``phantoms.LESION_CLASSES`` holds them)."""

from __future__ import annotations

from collections.abc import Sequence

#: The lesion classes: "A" the one public data holds, "B" the sites' private target.
LESION_CLASS_NAMES: tuple[str, ...] = ("A", "B")


def site_sizes(spec: int | str | Sequence[int], n_sites: int) -> list[int]:
    """Patients of each of ``n_sites`` synthetic sites from one number for every site, or a list
    (comma string or sequence) cycled over the sites: hospitals of unequal size."""
    try:
        sizes = [int(n) for n in (spec.split(",") if isinstance(spec, str) else [spec] if isinstance(spec, int) else spec)]
    except ValueError:
        raise ValueError(f"subjects per site must be a number or a comma list of numbers, got {spec!r}") from None
    if n_sites < 1 or not sizes or min(sizes) < 1:
        raise ValueError(f"need at least one site and at least one patient per site, got {n_sites} sites of {spec!r}")
    return [sizes[s % len(sizes)] for s in range(n_sites)]
