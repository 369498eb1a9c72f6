"""Preparing a simulated federation's data: the synthetic hospitals of a run's settings.

Called by the simulation side only: `fedpir simulate`, and the ClientApp when Flower's simulation
engine runs it without a federation folder (``flwr run .``). A deployed server or site never
generates data.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path
from typing import Protocol

from fedpir.data.manifest import FEDERATION_FILE
from fedpir.synthetic.federation import generate_federation

#: Patients per site of the simulation-only evaluation set in every modality.
EVAL_SUBJECTS = 6


class FederationSpec(Protocol):
    """What the synthetic federation of a run depends on (the run settings have these fields)."""

    federation_path: Path
    num_sites: int
    site_sizes: list[int]
    volume_size: int
    seed: int
    site_lesion: str
    heterogeneity: float


def synthetic_federation(settings: FederationSpec, eval_subjects: int = EVAL_SUBJECTS) -> Path:
    """The run's synthetic federation folder (with its evaluation sets), generated on first use.

    Simulated sites run in parallel processes: the first one to take the lock writes the
    federation (into a temporary folder, renamed when complete), the others wait and reuse it.
    """
    path = settings.federation_path
    if (path / FEDERATION_FILE).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / FEDERATION_FILE).is_file():
            partial = path.with_name(f".{path.name}.partial")
            if partial.exists():  # left by a simulation killed mid-write
                shutil.rmtree(partial)
            size = settings.volume_size
            generate_federation(partial, n_sites=settings.num_sites, subjects_per_site=settings.site_sizes,
                                shape=(size, size, size), seed=settings.seed, eval_subjects=eval_subjects,
                                progress=True, lesion_class=settings.site_lesion,
                                heterogeneity=settings.heterogeneity)
            partial.rename(path)
    return path
