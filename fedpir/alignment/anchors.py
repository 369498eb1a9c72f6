"""Anchors of a site for latent alignment: each patient's pooled X_h paired with the text
embedding of its report, reduced to the sufficient statistics that the site sends.

What leaves the site is :class:`fedpir.alignment.maps.AlignmentStatistics` only (sums over the
site's anchors, no per-patient row); the server adds the sites' statistics and solves T in closed
form. These statistics are not covered by the DP guarantee of training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fedpir.alignment.choices import POOLINGS
from fedpir.alignment.maps import AlignmentStatistics
from fedpir.alignment.text import TextEncoder
from fedpir.data.dataset import SiteDataset
from fedpir.models.evaluation import embed
from fedpir.models.losses import check_batch
from fedpir.models.pir import unwrap


@torch.no_grad()
def pooled_embedding(model: nn.Module, batch: dict[str, torch.Tensor], pooling: str = "mean") -> torch.Tensor:
    """X_h of each patient (mean over its modalities), pooled over space by ``pooling`` -> [B, C or 2C];
    or for "lesion" its segmentation map reduced to [B, 2] (:data:`POOLINGS`)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "mean":
        return embed(model, batch)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        device = next(net.parameters()).device
        image, present = check_batch(net, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if pooling == "lesion":
            logits = net.segment(*net.represent(image, present, with_skips=True)).flatten(1)
            return torch.stack([logits.amax(1), torch.sigmoid(logits).mean(1)], 1)
        x_h = net.represent(image, present)
    finally:
        net.train(was_training)
    peak = x_h.amax((2, 3, 4))
    return peak if pooling == "max" else torch.cat([x_h.mean((2, 3, 4)), peak], 1)


def embed_dataset(model: nn.Module, dataset: Dataset, batch_size: int = 8, pooling: str = "mean") -> tuple[np.ndarray, list[str]]:
    """The embedding of every patient by ``pooling`` (:func:`pooled_embedding`): ([n, dims], subject ids)."""
    rows: list[torch.Tensor] = []
    subjects: list[str] = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        rows.append(pooled_embedding(model, batch, pooling).cpu())
        subjects.extend(batch["subject"])
    if not rows:
        raise ValueError("the dataset has no patients")
    return torch.cat(rows).double().numpy(), subjects


def site_reports(dataset: SiteDataset | Subset) -> dict[str, str]:
    """Report text of each subject of a site dataset (or a Subset of one) that has a report."""
    base, indices = dataset, None
    if isinstance(dataset, Subset):
        base, indices = dataset.dataset, list(dataset.indices)
    if not isinstance(base, SiteDataset):
        raise TypeError(f"expected a SiteDataset or a Subset of one, got {type(base).__name__}")
    records = base.records if indices is None else [base.records[i] for i in indices]
    return {r.subject_id: r.report for r in records if r.report}


def site_anchors(model: nn.Module, dataset: SiteDataset | Subset, encoder: TextEncoder,
                 batch_size: int = 8, pooling: str = "mean") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(image embeddings [n, C], report embeddings [n, dy], subject ids) of the site's patients that
    have a report; patients without one are left out."""
    reports = site_reports(dataset)
    z, subjects = embed_dataset(model, dataset, batch_size, pooling)
    keep = [i for i, s in enumerate(subjects) if s in reports]
    if not keep:
        raise ValueError("no patient of the site has a report; alignment needs report texts as anchors")
    kept: Sequence[str] = [subjects[i] for i in keep]
    return z[keep], encoder.encode([reports[s] for s in kept]), list(kept)


def site_alignment_statistics(model: nn.Module, dataset: SiteDataset | Subset, encoder: TextEncoder,
                              batch_size: int = 8, pooling: str = "mean") -> AlignmentStatistics:
    """What a site sends for federated alignment: the statistics of its (X_h, report) anchors."""
    z, t, _ = site_anchors(model, dataset, encoder, batch_size, pooling)
    return AlignmentStatistics.from_pairs(z, t)
