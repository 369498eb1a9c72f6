"""How many patients each synthetic site holds: one number for every site, or a list cycled over them."""

from __future__ import annotations

from collections.abc import Sequence


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
