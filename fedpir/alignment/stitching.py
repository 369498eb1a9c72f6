"""Stitching a site's own encoder into the federation's (global) latent space.

A site that fine-tunes its copy of the encoder drifts away from the global X_h space, so heads
trained on global embeddings (at the server, or at other sites) no longer read its embeddings.
With anchors, the site's own patients embedded by both encoders, an alignment T from the local
space to the global one (:mod:`fedpir.alignment.maps`) restores the interface:
head(T(z_local)). The anchors and both embeddings stay at the site; if the map is to be fitted
elsewhere (e.g. pooled over several sites fine-tuned alike), only
:class:`~fedpir.alignment.maps.AlignmentStatistics` leave it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from fedpir.alignment.anchors import embed_dataset
from fedpir.alignment.maps import AlignmentMap, AlignmentStatistics, fit_alignment


def stitch_statistics(local_model: nn.Module, global_model: nn.Module, anchors: Dataset, *,
                      pooling: str = "mean", batch_size: int = 8) -> AlignmentStatistics:
    """Statistics of (local X_h, global X_h) pairs of the same patients ``anchors``."""
    z_local, ids_local = embed_dataset(local_model, anchors, batch_size, pooling)
    z_global, ids_global = embed_dataset(global_model, anchors, batch_size, pooling)
    if ids_local != ids_global:
        raise RuntimeError("the two encoders saw the anchors in different orders")
    return AlignmentStatistics.from_pairs(z_local, z_global)


def fit_stitch(local_model: nn.Module, global_model: nn.Module, anchors: Dataset, method: str = "procrustes", *,
               pooling: str = "mean", **kwargs: Any) -> AlignmentMap:
    """T: local X_h space -> global X_h space, fitted on ``anchors`` (see :func:`fit_alignment`)."""
    return fit_alignment(stitch_statistics(local_model, global_model, anchors, pooling=pooling), method, **kwargs)


@dataclass(frozen=True)
class StitchedHead:
    """A head of the global space applied to a local encoder's embeddings through T."""

    amap: AlignmentMap
    head: Callable[[np.ndarray], np.ndarray]

    def __call__(self, z_local: Any) -> np.ndarray:
        """head(T(z_local))."""
        return self.head(self.amap.transform(z_local))
