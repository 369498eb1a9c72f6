"""Stage 1 (self-supervised pretraining) and stage 2 (fine-tuning) losses of the PIR network.

Privacy unit = patient. Opacus (``loss_reduction="mean"``) needs every loss to be the mean over
patients of a per-patient loss that depends on that patient only. So each term below is computed
as a vector [B] of per-patient values, averaged over the patient's available modalities, then over
patients, and all random augmentations come from per-patient streams (:mod:`fedpir.models.augment`).

Deviation from the papers, on purpose: the PIR/Swin-SSL contrastive term and Alice's anatomical
term use *other patients* as negatives (or positives). That couples patients inside a batch: one
patient's per-sample gradient would depend on the others and Opacus' per-patient clipping would no
longer bound its influence. Here both terms are per patient:

* contrastive: two intensity-only views of a modality; projected X_h at each spatial location is a
  token; positive = the same location in the other view, negatives = the other locations of the
  same patient (InfoNCE, temperature 0.1, symmetric);
* anatomical (Alice, optional): crops at the same coordinates (= the same anatomy, volumes share a
  common space) in the two views are positives, crops at other coordinates of the same patient are
  negatives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor, nn

from fedpir.models.augment import (
    Purpose,
    crop_starts,
    intensity_view,
    patch_mask,
    patient_seeds,
    random_rotation,
    rotate,
    stream,
)
from fedpir.models.groups import TASKS
from fedpir.models.pir import PIRNet, unwrap

#: The pretraining terms always computed (the Alice terms "mim" and "anatomical" are optional).
CORE_TERMS: tuple[str, ...] = ("rotation", "contrastive", "reconstruction", "invariance")
#: The optional Alice terms (LossConfig.mim, LossConfig.anatomical; run config ``mim``, ``anatomical``).
ALICE_TERMS: tuple[str, ...] = ("mim", "anatomical")


@dataclass
class LossConfig:
    """Weights and settings of the pretraining losses (Alice terms ``mim``/``anatomical`` off by default),
    and the fine-tuning segmentation loss's ``positive_weight`` (see :func:`finetune_losses`)."""

    w_rotation: float = 1.0
    w_contrastive: float = 1.0
    w_reconstruction: float = 1.0
    w_invariance: float = 1.0
    temperature: float = 0.1
    fg_threshold: float = -0.35
    fg_weight: float = 10.0
    mim: bool = False
    mim_ratio: float = 0.75
    w_mim: float = 1.0
    anatomical: bool = False
    w_anatomical: float = 0.5
    anatomical_crops: int = 4
    positive_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.mim_ratio < 1:
            raise ValueError(f"mim_ratio must be in (0, 1), got {self.mim_ratio}")
        if self.anatomical_crops < 2:
            raise ValueError(f"anatomical_crops must be >= 2 (one positive, negatives), got {self.anatomical_crops}")


def check_batch(net: PIRNet, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Validate and return (image [B, M, D, H, W], present bool [B, M])."""
    for key in ("image", "present"):
        if key not in batch:
            raise KeyError(f"batch has no {key!r} entry (keys: {sorted(batch)})")
    image, present = batch["image"], batch["present"].bool()
    n_mod = len(net.cfg.modalities)
    if image.dim() != 5 or image.shape[1] != n_mod:
        raise ValueError(f"image must be [B, {n_mod}, D, H, W], got {tuple(image.shape)}")
    if present.shape != image.shape[:2]:
        raise ValueError(f"present must be [B, {n_mod}], got {tuple(present.shape)}")
    if any(s % net.cfg.stride for s in image.shape[2:]):
        raise ValueError(f"spatial size {tuple(image.shape[2:])} is not divisible by the encoder stride {net.cfg.stride}")
    return image, present.to(image.device)


def per_patient(
    x: Tensor, seeds: list[int], modality: int, purpose: Purpose, fn: Callable[[Tensor, torch.Generator], Tensor]
) -> Tensor:
    """Apply ``fn(x[i], generator_i)`` with patient i's stream and stack the results."""
    return torch.stack([fn(x[i], stream(s, modality, purpose)) for i, s in enumerate(seeds)])


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE within each patient: tokens a, b [B, N, P]; a[:, i] and b[:, i] are
    positives, the patient's other tokens negatives. Returns [B]."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.transpose(1, 2) / temperature  # [B, N(a), N(b)]
    target = torch.arange(a.shape[1], device=a.device).expand(a.shape[0], -1)
    a_to_b = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    b_to_a = F.cross_entropy(logits, target, reduction="none")
    return 0.5 * (a_to_b + b_to_a).mean(1)


def reconstruction_error(pred: Tensor, target: Tensor, present: Tensor, cfg: LossConfig) -> Tensor:
    """fg_weight * foreground MSE + MSE per available target modality, averaged over them: [B].

    Foreground = target >= fg_threshold (z-scored); absent modalities are masked out.
    """
    err = (pred - target) ** 2
    fg = (target >= cfg.fg_threshold).to(err.dtype)
    spatial = (2, 3, 4)
    mse = err.mean(spatial)
    fg_mse = (err * fg).sum(spatial) / fg.sum(spatial).clamp(min=1)
    weights = present.to(err.dtype)
    return ((cfg.fg_weight * fg_mse + mse) * weights).sum(1) / weights.sum(1).clamp(min=1)


def invariance(x_hs: dict[int, Tensor], weights: Tensor, eps: float = 1e-6) -> Tensor:
    """Sum over available modalities m of mean((X_h(x_m) - t_m)^2) / mean(t_m^2), with
    t_m = sg(mean X_h of the patient's other modalities): [B]; 0 for patients with fewer than two
    modalities.

    Divided by the (stop-gradient) scale of the target, unlike the paper's plain squared distance:
    the plain form can be lowered by shrinking X_h and grows with it, so over 20 pretraining epochs
    it rose (0.016 -> 0.050) while the scale-free same-patient / other-patient distance ratio fell
    (0.86 -> 0.26, docs/results/pretraining_quality.json before this change)."""
    count = weights.sum(1)
    shape = (-1,) + (1,) * (next(iter(x_hs.values())).dim() - 1)
    total = sum(weights[:, m].view(shape) * x_h.detach() for m, x_h in x_hs.items())
    others = (count - 1).clamp(min=1).view(shape)
    out = weights.new_zeros(weights.shape[0])
    for m, x_h in x_hs.items():
        target = (total - weights[:, m].view(shape) * x_h.detach()) / others
        scale = (target**2).flatten(1).mean(1).clamp(min=eps)
        out = out + weights[:, m] * (count > 1) * ((x_h - target) ** 2).flatten(1).mean(1) / scale
    return out


def level_invariance(levels: dict[int, list[Tensor]], present: Tensor) -> Tensor:
    """Per-patient invariance, averaged over the encoder levels of each available modality (X_h first,
    then the skips that the segmentation head reads) and over the patient's modalities: [B].

    Every level, not X_h alone: the segmentation head reads the skips too. A first look, not a
    multi-seed result: one public warm-start build per variant, scored on 3 federations' evaluation
    sets, gave Dice 0.716 on the sites' own modalities with every level and 0.652 with X_h only;
    keeping the term during fine-tuning gave 0.569, so fine-tuning does not use it."""
    weights = present.to(next(iter(levels.values()))[0].dtype)
    depth = len(next(iter(levels.values())))
    per_level = [invariance({m: feats[k] for m, feats in levels.items()}, weights) for k in range(depth)]
    return sum(per_level) / depth / weights.sum(1).clamp(min=1)


def _tokens(net: PIRNet, x_h: Tensor) -> Tensor:
    """Projected X_h, one token per spatial location: [B, N, P]."""
    return net.projection_head(x_h).flatten(2).transpose(1, 2)


def _mim_term(net: PIRNet, x: Tensor, m: int, seeds: list[int], cfg: LossConfig) -> Tensor:
    """Masked image modeling: zero ``mim_ratio`` of 4^3 patches, rebuild the masked voxels of x."""
    shape = tuple(x.shape[2:])
    mask = per_patient(x, seeds, m, Purpose.MIM, lambda xi, g: patch_mask(shape, g, 4, cfg.mim_ratio)[None])
    mask = mask.to(device=x.device, dtype=x.dtype)
    pred = net.decode(net.encode(x * (1 - mask), m))[:, m : m + 1]
    return ((pred - x) ** 2 * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


def _anatomical_term(net: PIRNet, views: tuple[Tensor, Tensor], m: int, seeds: list[int], cfg: LossConfig) -> Tensor:
    """Per-patient anatomical contrast: crops at the same coordinates of the two views are positives,
    crops at the patient's other coordinates negatives."""
    shape = tuple(views[0].shape[2:])
    stride = net.cfg.stride
    crop = tuple(max(stride, (s // 2) // stride * stride) for s in shape)  # about half, a multiple of the stride
    starts = [crop_starts(shape, crop, cfg.anatomical_crops, stream(s, m, Purpose.CROPS)) for s in seeds]
    embeddings = []
    for view in views:
        per_crop = []
        for k in range(cfg.anatomical_crops):
            cut = torch.stack(
                [v[:, a : a + crop[0], b : b + crop[1], c : c + crop[2]] for v, (a, b, c) in zip(view, (st[k] for st in starts))]
            )
            pooled = net.encode(cut, m).mean((2, 3, 4), keepdim=True)
            per_crop.append(net.projection_head(pooled).flatten(1))
        embeddings.append(torch.stack(per_crop, dim=1))  # [B, K, P]
    return info_nce(embeddings[0], embeddings[1], cfg.temperature)


def _pretrain_terms(cfg: LossConfig) -> list[str]:
    return [*CORE_TERMS, *["mim"] * cfg.mim, *["anatomical"] * cfg.anatomical]


def loss_terms(objective: str, cfg: LossConfig) -> list[str]:
    """The names of the terms a round of ``objective`` computes ("pretrain": :func:`pretrain_losses`,
    else the fine-tuning task: :func:`finetune_losses`), "total" last."""
    return [*(_pretrain_terms(cfg) if objective == "pretrain" else [objective]), "total"]


def pretrain_losses(
    model: nn.Module, batch: dict[str, Tensor], cfg: LossConfig | None = None, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Stage-1 losses: "rotation", "contrastive", "reconstruction", "invariance" (+ "mim",
    "anatomical" when enabled) and their weighted sum "total"; each is a mean over patients.

    batch: "image" [B, M, D, H, W] (z-scored, zeros where absent), "present" bool [B, M], optional
    "seed" int64 [B] (per-patient augmentation seeds; else drawn from ``generator``). ``model`` may
    be wrapped by Opacus. Per patient and available modality m, with x_m its volume:
    rotation CE (rot90 of x_m by a random k, predict k from pooled X_h); InfoNCE between two
    intensity views (see module doc); reconstruction of every available modality from X_h(x_m);
    invariance ||X_h(x_m) - sg(mean X_h of the other available modalities)||^2, relative to the
    target's scale (see :func:`invariance`; 0 for a patient with one modality). Patients without any modality contribute 0.
    """
    cfg = cfg or LossConfig()
    net = unwrap(model)
    image, present = check_batch(net, batch)
    if image.shape[-1] != image.shape[-2]:
        raise ValueError(f"rotation needs square (H, W) slices, got spatial size {tuple(image.shape[2:])}")
    if not present.any():
        raise ValueError("no patient in the batch has any modality: nothing to pretrain on")
    seeds = patient_seeds(image.shape[0], batch.get("seed"), generator)
    weights = present.to(image.dtype)
    names = _pretrain_terms(cfg)
    terms = {name: image.new_zeros(image.shape[0]) for name in names}
    levels: dict[int, list[Tensor]] = {}
    for m in torch.nonzero(present.any(0)).flatten().tolist():
        x, w = image[:, m : m + 1], weights[:, m]
        x_h, skips, _ = net.encode_levels(x, m)
        levels[m] = [x_h, *skips]
        terms["reconstruction"] += w * reconstruction_error(net.decode(x_h), image, present, cfg)

        ks = [random_rotation(stream(s, m, Purpose.ROTATION)) for s in seeds]
        rotated = torch.stack([rotate(x[i], k) for i, k in enumerate(ks)])
        logits = net.rotation_head(net.encode(rotated, m))
        terms["rotation"] += w * F.cross_entropy(logits, torch.tensor(ks, device=x.device), reduction="none")

        views = tuple(per_patient(x, seeds, m, p, intensity_view) for p in (Purpose.VIEW_A, Purpose.VIEW_B))
        tokens = [_tokens(net, net.encode(v, m)) for v in views]
        terms["contrastive"] += w * info_nce(tokens[0], tokens[1], cfg.temperature)

        if cfg.mim:
            terms["mim"] += w * _mim_term(net, x, m, seeds, cfg)
        if cfg.anatomical:
            terms["anatomical"] += w * _anatomical_term(net, views, m, seeds, cfg)

    count = weights.sum(1)
    losses = {name: (value / count.clamp(min=1)).mean() for name, value in terms.items()}
    losses["invariance"] = level_invariance(levels, present).mean()
    losses["total"] = sum(getattr(cfg, f"w_{name}") * losses[name] for name in names)
    return losses


def check_modality_dropout(p: float) -> None:
    """Raise ValueError unless ``p`` is a modality-dropout probability, in [0, 1) (see :func:`augmented_views`)."""
    if not 0 <= p < 1:
        raise ValueError(f"modality dropout must be in [0, 1), got {p}")


def augmented_views(
    batch: dict[str, Tensor], view: int, seeds: list[int], modality_dropout: float = 0.0
) -> dict[str, Tensor]:
    """View number ``view`` of a fine-tuning batch: per patient, from its own stream, a left-right
    flip (image and mask together) with probability 1/2 and an intensity view of each modality; with
    ``modality_dropout`` p > 0, each available modality is then left out with probability p (at least
    one is kept), so that the task head also learns from the representation of single modalities
    and small subsets, as at a site that has fewer modalities."""
    check_modality_dropout(modality_dropout)
    image, mask, present = batch["image"], batch.get("mask"), batch["present"].bool()
    images, masks, kept = [], [], []
    for i, seed in enumerate(seeds):
        g = stream(seed, view, Purpose.FINETUNE)
        flip = bool(torch.rand((), generator=g) < 0.5)
        x = torch.stack([intensity_view(image[i, m : m + 1], g)[0] for m in range(image.shape[1])])
        keep = present[i].clone()
        if modality_dropout > 0 and keep.sum() > 1:
            available = torch.nonzero(keep).flatten()
            drop = torch.rand(len(available), generator=g) < modality_dropout
            if drop.all():
                drop[int(torch.randint(len(available), (), generator=g))] = False
            keep[available[drop]] = False
        x = x * keep.view(-1, 1, 1, 1).to(x)  # absent (and left-out) modalities are zero
        images.append(x.flip(1) if flip else x)
        kept.append(keep)
        if mask is not None:
            masks.append(mask[i].flip(1) if flip else mask[i])
    out = dict(batch, image=torch.stack(images), present=torch.stack(kept))
    if mask is not None:
        out["mask"] = torch.stack(masks)
    return out


def finetune_losses(
    model: nn.Module, batch: dict[str, Tensor], task: str, views: int = 0, generator: torch.Generator | None = None,
    modality_dropout: float = 0.0, positive_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Stage-2 loss on X_h averaged over each patient's available modalities: {task, "total"}.

    ``views`` > 0 averages the loss over that many augmented views of each patient
    (:func:`augmented_views`): augmentation multiplicity. The views of a patient are one DP sample,
    so Opacus clips the gradient averaged over them (one gradient per patient); ``modality_dropout``
    leaves modalities out of each view (:func:`augmented_views`). ``views`` = 0: the batch as given
    (evaluation).

    "segmentation": MONAI DiceCELoss(sigmoid=True) against batch["mask"] [B, 1, D, H, W] (Dice per
    patient, so the batch loss is the mean of per-patient losses); with ``positive_weight`` > 0, the
    voxel-wise binary cross-entropy with lesion voxels weighted by it (convex in the lesion probe,
    which the few steps of a private phase need). "classification": CE against
    batch["label"] [B] (int64, -1 = unlabeled); unlabeled patients contribute 0 and the sum is
    divided by B, not by the number of labeled patients, to keep the per-patient decomposition.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if views > 0:
        seeds = patient_seeds(batch["image"].shape[0], batch.get("seed"), generator)
        losses = [finetune_losses(model, augmented_views(batch, v, seeds, modality_dropout), task,
                                  positive_weight=positive_weight) for v in range(views)]
        return {k: sum(loss[k] for loss in losses) / views for k in losses[0]}
    net = unwrap(model)
    image, present = check_batch(net, batch)
    if task == "segmentation":
        if "mask" not in batch:
            raise KeyError("segmentation needs a 'mask' entry in the batch")
        logits, mask = net.segment(*net.represent(image, present, with_skips=True)), batch["mask"].to(image)
        loss = (DiceCELoss(sigmoid=True)(logits, mask) if positive_weight <= 0 else
                F.binary_cross_entropy_with_logits(logits, mask, pos_weight=logits.new_tensor(positive_weight)))
    else:
        x_h = net.represent(image, present)
        if "label" not in batch:
            raise KeyError("classification needs a 'label' entry in the batch")
        label = batch["label"].to(image.device).long()
        if label.shape != (image.shape[0],) or (label >= net.cfg.num_classes).any() or (label < -1).any():
            raise ValueError(f"label must be [B] with values in -1..{net.cfg.num_classes - 1}, got {label.tolist()}")
        ce = F.cross_entropy(net.classify(x_h), label.clamp(min=0), reduction="none")
        loss = (ce * (label >= 0)).mean()
    return {task: loss, "total": loss}
