"""Preparing a simulated federation's data: the synthetic hospitals of a run's settings.

Called by the simulation side only: `fedpir simulate`, and the ClientApp when Flower's simulation
engine runs it without a federation folder (``flwr run .``). A deployed server or site never
generates data.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

from fedpir.run_config import RunSettings
from fedpir.synthetic.federation import generate_federation

#: Patients per site of the simulation-only evaluation set in every modality.
EVAL_SUBJECTS = 6


def synthetic_federation(settings: RunSettings, eval_subjects: int = EVAL_SUBJECTS) -> Path:
    """The run's synthetic federation folder (with its evaluation sets), generated on first use.

    Simulated sites run in parallel processes: the first one to take the lock writes the
    federation (into a temporary folder, renamed when complete), the others wait and reuse it.
    """
    path = settings.federation_path
    if (path / "federation.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "federation.json").is_file():
            partial = path.with_name(f".{path.name}.partial")
            if partial.exists():  # left by a simulation killed mid-write
                shutil.rmtree(partial)
            size = settings.volume_size
            generate_federation(partial, n_sites=settings.num_sites, subjects_per_site=settings.site_sizes,
                                shape=(size, size, size), seed=settings.seed, eval_subjects=eval_subjects,
                                progress=True)
            partial.rename(path)
    return path
