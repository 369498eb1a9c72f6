"""Heads on the per-patient representation X_h [B, C, d, h, w]: SSL heads and task heads."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fedpir.models.blocks import UpDecoder


class PooledLinearHead(nn.Module):
    """Global average pool of X_h, then a linear layer: rotation (4-way) and classification heads."""

    def __init__(self, dim: int, outputs: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.linear = nn.Linear(dim, outputs)

    def forward(self, x_h: Tensor) -> Tensor:
        return self.linear(self.pool(x_h).flatten(1))


class ProjectionHead(nn.Module):
    """Contrastive projection applied at every spatial location: 1x1x1 conv, GELU, 1x1x1 conv."""

    def __init__(self, dim: int, proj_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(dim, dim, 1), nn.GELU(), nn.Conv3d(dim, proj_dim, 1))

    def forward(self, x_h: Tensor) -> Tensor:
        return self.net(x_h)


class SegmentationHead(UpDecoder):
    """Lesion segmentation head: skip-free upsampling decoder from X_h to 1-channel logits."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__(widths, out_channels=1)
