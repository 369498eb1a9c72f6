"""Shared fixtures. Tests run on a 2-core CPU: keep volumes and subject counts small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic federation on disk (NIfTI + manifests), shared read-only by all tests.

    Tests must not modify it; copy it first if they need to break something.
    """
    from fedpir.synthetic.federation import generate_federation

    out = tmp_path_factory.mktemp("federation")
    return generate_federation(out, n_sites=4, subjects_per_site=8, shape=(32, 32, 32), seed=0)
