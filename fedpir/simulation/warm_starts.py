"""The warm starts of a simulation: built once on the public synthetic corpus, then reused.

Each is cached under ``~/.fedpir/warm-starts/`` by the settings that make it, so a second simulation
with the same model grid and vocabulary starts at once. fedpir and the baselines start from the
warm start with the invariance term; the ``fedpir-noinv`` ablation from one pretrained without it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from fedpir.models.warm_start import file_sha256
from fedpir.run_config import STATE_ROOT, RunSettings
from fedpir.training.model import build_model
from fedpir.training.recipe import RECIPE, RECIPE_VERSION
from fedpir.training.warm_start import build_warm_start

CACHE = STATE_ROOT / "warm-starts"


def cached_warm_start(settings: RunSettings, invariance_weight: float, cache: Path = CACHE,
                      segment_modalities: str = RECIPE.segment_modalities, public_seed: int = 0,
                      ) -> tuple[str, str]:
    """(path, SHA-256) of the warm start for the run's grid and vocabulary, built if not cached
    (``segment_modalities``: the inputs of its segmentation epochs, see ``fedpir pretrain-public``;
    ``public_seed``: the seed of the public corpus and of its training)."""
    recipe = replace(RECIPE, segment_modalities=segment_modalities)
    made = {"size": settings.volume_size, "modalities": settings.modalities, "invariance_weight": invariance_weight,
            "seed": public_seed}
    key_fields = {**asdict(recipe), **made, "version": RECIPE_VERSION}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"warm-start-{key}.pt"
    if path.is_file():
        return str(path), file_sha256(path)
    print(f"building the public warm start (invariance weight {invariance_weight:g}) into {path}", flush=True)
    sha = build_warm_start(path, recipe=recipe, device=settings.device, **made)
    return str(path), sha


def run_warm_starts(settings: RunSettings, warm_start: str, noinv_warm_start: Path | None,
                    methods: list[str]) -> tuple[RunSettings, tuple[str, str]]:
    """The run's warm start (in its settings) and the fedpir-noinv ablation's (path, SHA-256):
    ``warm_start`` "auto" (the cached public ones, built from the public corpus of the run's seed),
    "none" (random initialisation) or a file, with ``noinv_warm_start`` for the ablation."""
    if warm_start == "none":
        return settings, ("", "")
    noinv_needed = "fedpir-noinv" in methods
    if warm_start == "auto":
        main = cached_warm_start(settings, 1.0, public_seed=settings.seed)  # the seeds sample the warm start too
        noinv = cached_warm_start(settings, 0.0, public_seed=settings.seed) if noinv_needed else ("", "")
    else:
        path = Path(warm_start).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--warm-start {path} does not exist; build one with `fedpir pretrain-public`")
        main = (str(path), file_sha256(path))
        if noinv_needed and noinv_warm_start is None:
            raise ValueError("method fedpir-noinv needs --noinv-warm-start with --warm-start FILE")
        noinv = (str(noinv_warm_start.resolve()), file_sha256(noinv_warm_start)) if noinv_needed else ("", "")
        for path, sha in (main, noinv):  # a file that does not fit the model stops here, not inside the sites
            if path:
                build_model(replace(settings, warm_start=path, warm_start_sha256=sha))
    return replace(settings, warm_start=main[0], warm_start_sha256=main[1]), noinv
