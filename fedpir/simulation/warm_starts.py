"""The warm starts of a simulation: built once on the public synthetic corpus, then reused.

Each is cached under ``~/.fedpir/warm-starts/`` by the settings that make it, so a second simulation
with the same model grid and vocabulary starts at once. fedpir and the baselines start from the
warm start with the invariance term; the ``fedpir-noinv`` ablation from one pretrained without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedpir.client.pretrain_public_cli import RECIPE, RECIPE_VERSION, build_warm_start
from fedpir.models.warm_start import file_sha256
from fedpir.run_config import RunSettings

CACHE = Path.home() / ".fedpir" / "warm-starts"


def cached_warm_start(settings: RunSettings, invariance_weight: float, cache: Path = CACHE,
                      segment_modalities: str = str(RECIPE["segment_modalities"]), public_seed: int = 0,
                      ) -> tuple[str, str]:
    """(path, SHA-256) of the warm start for the run's grid and vocabulary, built if not cached
    (``segment_modalities``: the inputs of its segmentation epochs, see ``fedpir pretrain-public``;
    ``public_seed``: the seed of the public corpus and of its training)."""
    recipe = {**RECIPE, "size": settings.volume_size, "modalities": settings.modalities,
              "invariance_weight": invariance_weight, "seed": public_seed,
              "segment_modalities": segment_modalities}
    key_fields = {**recipe, "version": RECIPE_VERSION}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"warm-start-{key}.pt"
    if path.is_file():
        return str(path), file_sha256(path)
    print(f"building the public warm start (invariance weight {invariance_weight:g}) into {path}", flush=True)
    sha = build_warm_start(path, device=settings.device, **recipe)  # type: ignore[arg-type]
    return str(path), sha
