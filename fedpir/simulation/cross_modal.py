"""Cross-modal generalization: each site's final model scored on one input modality at a time.

The synthetic federation's evaluation sets (``<federation>/eval/<site>``) hold further patients of
each site rendered in every modality by the site's scanner. For each method and site, the site's
final model (warm start, then the run's final exchanged weights, then the site's own layers) is
given a single input modality and scored on the lesion Dice; modalities are split into those the
site trains on ("seen") and the others ("unseen"), which the invariant representation should carry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedpir.data.dataset import load_site
from fedpir.data.manifest import FEDERATION_FILE
from fedpir.models.evaluation import evaluate
from fedpir.models.pir import PIRNet
from fedpir.privacy.at_rest import load_tensors
from fedpir.privacy.dp import collate_patients
from fedpir.run_config import RunSettings
from fedpir.synthetic.federation import EVAL_DIR
from fedpir.training.model import build_model


def final_site_model(run_settings: RunSettings, site: str) -> PIRNet:
    """A site's model at the end of a run, rebuilt from what the run left on disk."""
    model = build_model(run_settings)
    run = run_settings.run_path
    for path in (run / "global_model.pt", run / "pooled_model.pt", run / "sites" / site / "local_state.pt"):
        if path.is_file():
            model.load_state_dict(load_tensors(path), strict=False)
    return model.eval()


def site_cross_modal(model: PIRNet, loader: DataLoader, modalities: list[str]) -> dict[str, float]:
    """Dice on an evaluation set with each single modality as the only input."""
    with torch.no_grad():
        return {m: float(evaluate(model, loader, modalities=[m])["dice"]) for m in modalities}


def cross_modal_summary(out_dir: Path, settings: dict[str, RunSettings]) -> dict[str, Any]:
    """{method: {"sites": {site: {modality: dice}}, "seen": mean, "unseen": mean}} for every method
    whose run folder exists; empty when the federation has no evaluation sets."""
    any_settings = next(iter(settings.values()))
    eval_root = any_settings.federation_path / EVAL_DIR
    if not eval_root.is_dir():
        return {}
    meta = json.loads((any_settings.federation_path / FEDERATION_FILE).read_text())
    trained_on = {site["name"]: set(site["modalities"]) for site in meta["sites"]}
    size, vocabulary = any_settings.volume_size, any_settings.vocabulary
    loaders = {site: DataLoader(load_site(eval_root / site, vocabulary, (size,) * 3)[0], batch_size=4,
                                collate_fn=collate_patients) for site in trained_on}  # loaded once, for every method
    summary: dict[str, Any] = {}
    for method, run_settings in settings.items():
        if not (Path(out_dir) / method).is_dir():
            continue
        sites = {}
        seen, unseen = [], []
        for site in sorted(trained_on):
            scores = site_cross_modal(final_site_model(run_settings, site), loaders[site], vocabulary)
            sites[site] = scores
            for modality, dice in scores.items():
                (seen if modality in trained_on[site] else unseen).append(dice)
        summary[method] = {"sites": sites, "seen": float(np.nanmean(seen)) if seen else float("nan"),
                           "unseen": float(np.nanmean(unseen)) if unseen else float("nan")}
    return summary
