"""The PIR network (personalized invariant representation) and its shared/local split.

One shared encoder E maps any single modality of a patient to X_h; a shared learnable biological
prior P refines the bottleneck (attention + fusion); a shared decoder D rebuilds every modality of
the vocabulary from X_h. Site-local: per-modality input adapters, every normalization affine
parameter, and (by default) the task heads. The split is declared once, in
:meth:`PIRNet.key_groups`; everything else reads it from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch
from opacus import GradSampleModule
from torch import Tensor, nn

from fedpir.models.blocks import CNNEncoder, LesionProbe, ModalityAdapter, ModalityDecoder, PriorFusion
from fedpir.models.groups import KEY_POLICIES, OBJECTIVE_MODULES, PARAMETER_GROUPS
from fedpir.models.heads import PooledLinearHead, ProjectionHead, SegmentationHead

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
@dataclass
class PIRConfig:
    """Architecture of :class:`PIRNet`.

    ``channels``: CNN widths from input resolution to bottleneck (one stride-2 level per extra
    width).
    """

    modalities: list[str]
    spatial_size: tuple[int, int, int]  # the run settings' volume-size, cubed (fedpir.training.model)
    channels: tuple[int, ...] = (8, 16, 32, 64)
    prior_tokens: int = 16
    num_heads: int = 4
    proj_dim: int = 32
    num_classes: int = 2

    def __post_init__(self) -> None:
        self.modalities = list(self.modalities)
        self.spatial_size = tuple(int(s) for s in self.spatial_size)  # type: ignore[assignment]
        self.channels = tuple(int(c) for c in self.channels)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be a non-empty list of unique names, got {self.modalities}")
        if len(self.spatial_size) != 3:
            raise ValueError(f"spatial_size must have 3 entries, got {self.spatial_size}")
        stride = self.stride
        if any(s % stride for s in self.spatial_size):
            raise ValueError(f"spatial_size {self.spatial_size} must be divisible by the encoder stride {stride}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")

    @property
    def stride(self) -> int:
        """Downsampling factor between the input and X_h."""
        return 2 ** (len(self.channels) - 1)


class Encoded(NamedTuple):
    """What the encoder gives the heads for one modality, or averaged over a patient's modalities:
    X_h [B, C, d, h, w], the encoder's features above the bottleneck (input resolution first) and
    the lesion probe's evidence [B, 1, D, H, W]."""

    x_h: Tensor
    skips: list[Tensor]
    evidence: Tensor


@dataclass(frozen=True)
class KeyGroups:
    """State-dict keys of a :class:`PIRNet` split into the three ownership groups of docs/architecture.md
    (``norms``: the normalization keys, a subset of ``local``, for the FedBN baseline)."""

    shared: list[str] = field(default_factory=list)
    local: list[str] = field(default_factory=list)
    task_heads: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)


class PIRNet(nn.Module):
    """Encoder + biological prior + fusion + decoder, SSL heads, and task heads (see module doc).

    Every method keeps the batch dimension equal to patients: modalities are encoded one call at a
    time, which Opacus handles by accumulating per-sample gradients over repeated layer calls.
    """

    LOCAL_MODULES = ("adapters",)
    TASK_HEADS = ("seg_head", "cls_head")

    def __init__(self, cfg: PIRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.adapters = ModalityAdapter(len(cfg.modalities))
        self.encoder = CNNEncoder(cfg.channels)
        widths = self.encoder.widths
        dim = widths[-1]
        self.fusion = PriorFusion(dim, cfg.prior_tokens, cfg.num_heads)
        self.decoder = ModalityDecoder(widths, cfg.modalities)
        self.rotation_head = PooledLinearHead(dim, 4)
        self.projection_head = ProjectionHead(dim, cfg.proj_dim)
        self.seg_head = SegmentationHead(widths)
        self.lesion_probe = LesionProbe(len(cfg.modalities), widths)
        self.cls_head = PooledLinearHead(dim, cfg.num_classes)

    @property
    def dim(self) -> int:
        """Channel width C of X_h."""
        return self.encoder.widths[-1]

    def modality_index(self, modality: str | int) -> int:
        """Index of a modality name (or a checked index) in the vocabulary."""
        if isinstance(modality, str):
            if modality not in self.cfg.modalities:
                raise KeyError(f"modality {modality!r} is not in the vocabulary {self.cfg.modalities}")
            return self.cfg.modalities.index(modality)
        if not 0 <= modality < len(self.cfg.modalities):
            raise IndexError(f"modality index {modality} out of range for {len(self.cfg.modalities)} modalities")
        return int(modality)

    def encode(self, x: Tensor, modality: int) -> Tensor:
        """One modality [B, 1, D, H, W] -> X_h [B, C, d, h, w]."""
        return self.encode_levels(x, modality)[0]

    def encode_levels(self, x: Tensor, modality: int) -> Encoded:
        """One modality -> its :class:`Encoded` (the probe reads the decoder's rebuild of this modality
        from its own X_h, as a constant)."""
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"encode expects [B, 1, D, H, W], got {tuple(x.shape)}")
        m = self.modality_index(modality)
        calibrated = self.adapters(x, m)
        levels = self.encoder.levels(calibrated)
        x_h = self.fusion(levels[-1])
        with torch.no_grad():  # a feature of the probe, not a path for gradients (nor Opacus hooks) into the decoder
            rebuilt = self.decoder(x_h)[:, m : m + 1]
        return Encoded(x_h, levels[:-1], self.lesion_probe(calibrated, levels, calibrated - rebuilt, m))

    def decode(self, x_h: Tensor) -> Tensor:
        """X_h -> every modality of the vocabulary [B, M, D, H, W]."""
        return self.decoder(x_h)

    def segment(self, x_h: Tensor, skips: list[Tensor], evidence: Tensor) -> Tensor:
        """A patient's :class:`Encoded` (from :meth:`represent`) -> lesion logits [B, 1, D, H, W]: the
        head's, plus the lesion probe's evidence."""
        return self.seg_head(x_h, skips) + evidence

    def classify(self, x_h: Tensor) -> Tensor:
        """X_h -> class logits [B, num_classes]."""
        return self.cls_head(x_h)

    def encode_available(self, image: Tensor, present: Tensor) -> dict[int, Encoded]:
        """The :class:`Encoded` of every modality that some patient of the batch has, by modality index."""
        return {m: self.encode_levels(image[:, m : m + 1], m) for m in torch.nonzero(present.any(0)).flatten().tolist()}

    def represent(self, image: Tensor, present: Tensor, with_skips: bool = False) -> Tensor | Encoded:
        """Mean of X_h over each patient's available modalities (zeros for a patient with none).

        image [B, M, D, H, W], present bool [B, M] -> [B, C, d, h, w]; with ``with_skips`` the whole
        per-patient mean :class:`Encoded` (for :meth:`segment`).
        """
        encoded = self.encode_available(image, present)
        if not encoded:
            raise ValueError("no patient in the batch has any modality")
        pooled = pool_levels(encoded, present)
        return pooled if with_skips else pooled.x_h

    # ---- the shared/local split (declared once) -------------------------------------------
    def key_groups(self) -> KeyGroups:
        """Classify every state-dict key: norm affine params and adapters are local, task heads
        are their own group, everything else (encoder convs, prior, attention, fusion, decoder,
        SSL heads) is shared."""
        owner: dict[str, nn.Module] = {}
        owner_path: dict[str, str] = {}
        for path, module in self.named_modules():
            for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                key = f"{path}.{name}" if path else name
                owner[key], owner_path[key] = module, path
        groups = KeyGroups()
        for key in self.state_dict():
            top = owner_path[key].split(".")[0]
            if isinstance(owner[key], NORM_TYPES):
                groups.norms.append(key)
            if isinstance(owner[key], NORM_TYPES) or top in self.LOCAL_MODULES:
                groups.local.append(key)
            elif top in self.TASK_HEADS:
                groups.task_heads.append(key)
            else:
                groups.shared.append(key)
        return groups

    def federated_keys(self, policy: str) -> list[str]:
        """Keys a site exchanges with the server under a key policy (fedpir and the baselines):
        "fedpir" the shared keys; "fedavg" every key; "fedbn" all but normalization; "fedper" all
        but the task heads; "local" none."""
        groups, every = self.key_groups(), list(self.state_dict())
        if policy == "fedpir":
            return groups.shared
        if policy == "fedavg":
            return every
        if policy == "fedbn":
            return [k for k in every if k not in set(groups.norms)]
        if policy == "fedper":
            return [k for k in every if k.split(".")[0] not in self.TASK_HEADS]
        if policy == "local":
            return []
        raise ValueError(f"unknown key policy {policy!r}; valid: {', '.join(KEY_POLICIES)}")

    @staticmethod
    def modality_of_key(key: str) -> str | None:
        """The modality a shared key belongs to (the decoder's per-modality output heads), else None."""
        parts = key.split(".")
        return parts[2] if parts[:2] == ["decoder", "out"] and len(parts) > 3 else None

    # ---- what trains ----------------------------------------------------------------------
    def group_of(self, name: str) -> str:
        """The :data:`PARAMETER_GROUPS` entry of a parameter: normalization affine parameters are
        "norms" wherever they are; a task head's output layer is "task_out" (a few hundred
        parameters) and the rest of it "task_head"; the prior P is "prior", the lesion probe "probe", the rotation and
        projection heads are "ssl_heads", and the rest is named after its top-level module."""
        top = name.split(".")[0]
        if name.rsplit(".", 1)[0] in self.norm_paths:
            return "norms"
        if name.startswith(("seg_head.out.", "cls_head.linear.")):
            return "task_out"
        if top == "lesion_probe":
            return "probe"
        if top in self.TASK_HEADS:
            return "task_head"
        if name.startswith("fusion.prior."):
            return "prior"
        if top in ("rotation_head", "projection_head"):
            return "ssl_heads"
        return top

    @cached_property
    def norm_paths(self) -> frozenset[str]:
        """Module paths of the normalization layers."""
        return frozenset(path for path, module in self.named_modules() if isinstance(module, NORM_TYPES))

    def set_trainable(self, objective: str, groups: tuple[str, ...] = PARAMETER_GROUPS) -> list[str]:
        """Make trainable exactly the parameters of ``groups`` inside the modules ``objective`` uses;
        return their names.

        Needed under Opacus, whose optimizer rejects trainable parameters that received no
        per-sample gradient (e.g. the task heads during pretraining). Call before wrapping the
        model with Opacus.
        """
        if objective not in OBJECTIVE_MODULES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {tuple(OBJECTIVE_MODULES)}")
        used = OBJECTIVE_MODULES[objective]
        trained = []
        for name, param in self.named_parameters():
            on = name.split(".")[0] in used and self.group_of(name) in groups
            param.requires_grad_(on)
            if on:
                trained.append(name)
        if not trained:
            raise ValueError(f"no parameter of groups {groups} is used by objective {objective!r}")
        return trained


def average_over_modalities(x_hs: dict[int, Tensor], present: Tensor) -> Tensor:
    """Per-patient mean of {modality: X_h [B, ...]} over the modalities the patient has."""
    weights = present.to(next(iter(x_hs.values())).dtype)
    shape = (-1,) + (1,) * (next(iter(x_hs.values())).dim() - 1)
    total = sum(weights[:, m].view(shape) * x_h for m, x_h in x_hs.items())
    return total / weights.sum(1).clamp(min=1).view(shape)


def pool_levels(encoded: dict[int, Encoded], present: Tensor) -> Encoded:
    """Per-patient mean over available modalities of X_h, of each encoder skip level and of the
    probe's evidence."""
    x_h = average_over_modalities({m: e.x_h for m, e in encoded.items()}, present)
    depth = len(next(iter(encoded.values())).skips)
    skips = [average_over_modalities({m: e.skips[i] for m, e in encoded.items()}, present) for i in range(depth)]
    return Encoded(x_h, skips, average_over_modalities({m: e.evidence for m, e in encoded.items()}, present))


def unwrap(model: nn.Module) -> PIRNet:
    """The plain :class:`PIRNet` inside an Opacus ``GradSampleModule`` (or the model itself)."""
    while isinstance(model, GradSampleModule):
        model = model._module
    if not isinstance(model, PIRNet):
        raise TypeError(f"expected a PIRNet (optionally wrapped by Opacus), got {type(model).__name__}")
    return model
