"""Building blocks of the PIR network: input adapters, 3D encoders, biological prior, decoder.

Every block keeps the batch dimension equal to patients in every layer call (Opacus per-sample
gradients, privacy unit = patient) and uses only layers with an Opacus grad sampler: Conv3d, Linear,
Embedding, GroupNorm/LayerNorm, DPMultiheadAttention. There is no ConvTranspose3d (Opacus has no
grad sampler for it): upsampling is trilinear interpolation followed by a convolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from opacus.layers import DPMultiheadAttention
from torch import Tensor, nn

ACT = ("leakyrelu", {"negative_slope": 0.1})


def group_norm(channels: int) -> tuple[str, dict[str, int]]:
    """MONAI norm spec for a GroupNorm with up to 8 groups that divide ``channels``."""
    return ("group", {"num_groups": math.gcd(channels, 8)})


class ModalityAdapter(nn.Module):
    """Per-modality intensity calibration x -> a_m * x + b_m (site-local "scanner" layer).

    The (a_m, b_m) pairs are the rows of one ``nn.Embedding`` looked up with the modality index,
    so a single module serves every modality: Opacus has a grad sampler for embeddings, and the
    weight always receives a per-sample gradient when any modality is encoded (a separate module
    per modality would have no per-sample gradient in batches that lack that modality, which the
    Opacus optimizer rejects).
    """

    def __init__(self, num_modalities: int) -> None:
        super().__init__()
        self.calibration = nn.Embedding(num_modalities, 2)
        with torch.no_grad():
            self.calibration.weight[:, 0] = 1.0
            self.calibration.weight[:, 1] = 0.0

    def forward(self, x: Tensor, modality: int) -> Tensor:
        index = torch.full((x.shape[0],), modality, dtype=torch.long, device=x.device)
        scale_shift = self.calibration(index).view(x.shape[0], 2, *([1] * (x.dim() - 1)))
        return x * scale_shift[:, 0] + scale_shift[:, 1]


class CNNEncoder(nn.Module):
    """Small 3D CNN: a stride-1 stem, then one stride-2 MONAI ResidualUnit per further width.

    ``widths`` lists the feature widths from input resolution to the bottleneck; the bottleneck is
    ``2 ** (len(widths) - 1)`` times smaller than the input.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"the CNN encoder needs at least 2 widths, got {tuple(channels)}")
        self.widths = tuple(channels)
        self.stem = Convolution(3, 1, channels[0], strides=1, kernel_size=3, act=ACT, norm=group_norm(channels[0]))
        self.down = nn.Sequential(
            *(
                ResidualUnit(3, c_in, c_out, strides=2, kernel_size=3, subunits=2, act=ACT, norm=group_norm(c_out))
                for c_in, c_out in zip(channels[:-1], channels[1:])
            )
        )

    def levels(self, x: Tensor) -> list[Tensor]:
        """Features at every level, input resolution first, bottleneck last."""
        out = [self.stem(x)]
        for block in self.down:
            out.append(block(out[-1]))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.levels(x)[-1]


class BiologicalPrior(nn.Module):
    """The population-level prior P: ``tokens`` learnable vectors of width ``dim``.

    Realised as an ``nn.Embedding`` looked up with ``arange`` for every patient (a bare
    ``nn.Parameter`` has no Opacus grad sampler), so P gets per-patient gradients.
    """

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(tokens, dim)

    def forward(self, batch_size: int) -> Tensor:
        """Return P repeated for each patient: [batch_size, tokens, dim]."""
        index = torch.arange(self.tokens.num_embeddings, device=self.tokens.weight.device)
        return self.tokens(index.expand(batch_size, -1))


class PriorFusion(nn.Module):
    """X_h = fuse([h, T(A)]) with A = attention(query=h, key=value=P) over bottleneck tokens h."""

    def __init__(self, dim: int, prior_tokens: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"bottleneck width {dim} is not divisible by num_heads={num_heads}")
        self.prior = BiologicalPrior(prior_tokens, dim)
        self.attention = DPMultiheadAttention(dim, num_heads, batch_first=True)
        self.transform = nn.Linear(dim, dim)
        self.fuse = nn.Conv3d(2 * dim, dim, kernel_size=1)

    def forward(self, h: Tensor) -> Tensor:
        tokens = h.flatten(2).transpose(1, 2)  # [B, N, C]
        prior = self.prior(h.shape[0])
        attended, _ = self.attention(tokens, prior, prior, need_weights=False)
        refined = self.transform(attended).transpose(1, 2).reshape(h.shape)
        return self.fuse(torch.cat([h, refined], dim=1))


class LesionProbe(nn.Module):
    """Per-modality linear lesion evidence at input resolution from the calibrated image, the encoder's first
    two levels of features (the second upsampled) and the decoder's residual (the image minus its rebuild from
    the modality's own X_h: what the population-wide decoders cannot explain), each map instance-normalized
    per patient so that a weight means the same at every site and scanner.

    Its few dozen parameters per modality are what DP-SGD over a federation's patients can learn (noise over
    signal ~ sigma * sqrt(d) / (rho * n)); a modality's own weights let a lesion be bright in one contrast and
    dark in another, which an average over modalities would cancel. One Conv3d computes every modality's
    evidence and the caller keeps its own channel (as :class:`ModalityAdapter`: every weight gets a per-sample
    gradient under Opacus). Zero-initialised: the evidence is 0 and a model segments with its head alone until
    a private phase trains the probe.
    """

    def __init__(self, num_modalities: int, widths: Sequence[int]) -> None:
        super().__init__()
        inputs = 2 + widths[0] + widths[1]
        self.norm = nn.InstanceNorm3d(inputs, affine=False)
        self.linear = nn.Conv3d(inputs, num_modalities, kernel_size=1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, image: Tensor, levels: Sequence[Tensor], residual: Tensor, modality: int) -> Tensor:
        """image, residual [B, 1, D, H, W] and the encoder's levels (input resolution first) -> evidence
        [B, 1, D, H, W]."""
        second = nn.functional.interpolate(levels[1], size=image.shape[2:], mode="trilinear", align_corners=False)
        maps = torch.cat([image, levels[0], second, residual], dim=1)
        return self.linear(self.norm(maps))[:, modality : modality + 1]


def upsampling_trunk(widths: Sequence[int]) -> nn.Sequential:
    """Per level: trilinear x2 upsampling + MONAI Convolution, from the bottleneck back to input
    resolution (``widths`` runs from input resolution to the bottleneck, as the encoder's)."""
    levels: list[nn.Module] = []
    for c_in, c_out in zip(widths[:0:-1], widths[-2::-1]):
        levels += [
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            Convolution(3, c_in, c_out, kernel_size=3, act=ACT, norm=group_norm(c_out)),
        ]
    return nn.Sequential(*levels)


class ModalityDecoder(nn.Module):
    """Shared upsampling trunk and one 1x1x1 output conv per modality (state-dict keys
    ``out.<modality>.*``), so that modality-aware aggregation can average each modality's output
    head only over the sites that hold that modality. Output: [B, M, D, H, W] in vocabulary order."""

    def __init__(self, widths: Sequence[int], modalities: Sequence[str]) -> None:
        super().__init__()
        self.up = upsampling_trunk(widths)
        self.out = nn.ModuleDict({m: nn.Conv3d(widths[0], 1, kernel_size=1) for m in modalities})

    def forward(self, x: Tensor) -> Tensor:
        features = self.up(x)
        return torch.cat([conv(features) for conv in self.out.values()], dim=1)
