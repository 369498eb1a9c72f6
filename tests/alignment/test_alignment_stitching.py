"""Stitching a drifted local encoder into the global space: a global head transfers through T."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from scipy.stats import ortho_group
from torch.utils.data import ConcatDataset, Subset

from fedpir.alignment.maps import fit_pairs
from fedpir.alignment.stitching import StitchedHead, fit_stitch
from fedpir.alignment.zeroshot import auroc, linear_probe


def test_global_head_transfers_through_the_map_and_not_without_it() -> None:
    rng = np.random.default_rng(0)
    d = 12
    # drift: the label's direction moves to another coordinate, then a rotation of the others and a rescaling
    shift = np.roll(np.eye(d), 1, axis=1)
    rest = np.eye(d)
    rest[2:, 2:] = ortho_group.rvs(d - 2, random_state=1)
    drift = shift @ rest * rng.uniform(0.5, 2.0, size=d)

    def patients(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        z_global = rng.normal(size=(n, d)) + 2.0 * y[:, None] * np.eye(d)[0]
        return z_global, z_global @ drift + 3.0 + rng.normal(scale=0.05, size=(n, d)), y

    train_global, _, train_y = patients(200)  # where the head was trained (global space only)
    anchors_global, anchors_local, _ = patients(60)  # the site's anchors, embedded by both encoders
    test_global, test_local, test_y = patients(300)

    def head(z: np.ndarray) -> np.ndarray:
        return linear_probe(train_global, train_y, z)[:, 1]

    stitched = StitchedHead(fit_pairs(anchors_local, anchors_global, "lstsq"), head)
    reference, naive = auroc(head(test_global), test_y), auroc(head(test_local), test_y)
    through = auroc(stitched(test_local), test_y)
    assert reference > 0.85
    assert through > reference - 0.03
    assert abs(naive - 0.5) < abs(through - 0.5) - 0.2


def test_stitching_a_perturbed_pir_encoder_reduces_the_mismatch(small_federation: Path) -> None:
    from fedpir.alignment.anchors import embed_dataset
    from fedpir.data.dataset import load_site
    from fedpir.models.pir import PIRConfig, PIRNet

    torch.manual_seed(0)
    vocab = ["t1", "t2", "flair", "pd"]
    global_model = PIRNet(PIRConfig(vocab, spatial_size=(32, 32, 32), channels=(4, 8, 16), prior_tokens=4, num_heads=2))
    local_model = copy.deepcopy(global_model)
    with torch.no_grad():  # a local fine-tuning stand-in: the encoder's weights drift
        for p in local_model.encoder.parameters():
            p.add_(0.1 * p.std() * torch.randn_like(p))
    sites = [load_site(small_federation / f"site-{k}", vocab, (32, 32, 32))[0] for k in range(4)]
    anchors = ConcatDataset([Subset(s, range(6)) for s in sites])
    held_out = ConcatDataset([Subset(s, range(6, len(s))) for s in sites])
    amap = fit_stitch(local_model, global_model, anchors, "procrustes")
    z_local, _ = embed_dataset(local_model, held_out)
    z_global, _ = embed_dataset(global_model, held_out)
    anchor_mean = embed_dataset(global_model, anchors)[0].mean(0)
    spread = np.linalg.norm(z_global - z_global.mean(0))
    naive = np.linalg.norm(z_local - z_global) / spread
    stitched = np.linalg.norm(amap(z_local) - z_global) / spread
    constant = np.linalg.norm(anchor_mean - z_global) / spread  # one global embedding for every patient
    assert stitched < 0.5 * naive, (stitched, naive)
    assert stitched < 0.7 * constant, (stitched, constant)
