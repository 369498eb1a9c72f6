"""Evaluation of a PIR network: cross-modal synthesis (PSNR/SSIM), segmentation Dice,
classification accuracy/AUROC, and pooled X_h embeddings.

Heterogeneous federations: the decoder always outputs the whole vocabulary, so a (source ->
target) synthesis pair is scored on every patient that has both, including modalities that the
site never trained on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, PSNRMetric, SSIMMetric, compute_roc_auc
from torch import Tensor, nn

from fedpir.models.losses import check_batch
from fedpir.models.pir import PIRNet, pool_levels, unwrap

# MONAI warns when a site's held-out labels hold one class; AUROC is then NaN, as documented in
# evaluate(), and the report shows it as missing.
warnings.filterwarnings("ignore", message="y values can not be all", category=UserWarning)


def _device(net: PIRNet) -> torch.device:
    return next(net.parameters()).device


def _on_device(net: PIRNet, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    device = _device(net)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def embed(model: nn.Module, batch: dict[str, Tensor], modality: str | int | None = None) -> Tensor:
    """Globally pooled X_h [B, C] of one modality, or (``modality=None``) of the mean X_h over each
    patient's available modalities. With a modality given, rows of patients lacking it are
    meaningless; filter them with ``batch["present"]``."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        image, present = check_batch(net, _on_device(net, batch))
        if modality is None:
            x_h = net.represent(image, present)
        else:
            m = net.modality_index(modality)
            x_h = net.encode(image[:, m : m + 1], m)
    finally:
        net.train(was_training)
    return x_h.mean((2, 3, 4))


def _unit_range(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale by each target volume's min/max to [0, 1] (prediction clipped), so PSNR/SSIM use
    data range 1 on z-scored volumes."""
    dims = tuple(range(1, target.dim()))
    low = target.amin(dims, keepdim=True)
    span = (target.amax(dims, keepdim=True) - low).clamp(min=1e-6)
    return ((pred - low) / span).clamp(0, 1), (target - low) / span


def _ssim_window(shape: Sequence[int]) -> int:
    """MONAI's default 11-voxel SSIM window, shrunk (odd) for volumes smaller than that."""
    smallest = min(shape)
    return min(11, smallest if smallest % 2 else smallest - 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, Tensor]], modalities: Sequence[str] | None = None) -> dict[str, float]:
    """Metrics over all batches of ``loader`` (dict batches as in the losses).

    Only ``modalities`` (default: the vocabulary) count as available inputs and targets.
    Returns "psnr/{src}->{tgt}" and "ssim/{src}->{tgt}" for each pair that co-occurs in a patient
    (plus their means "psnr", "ssim"); "dice" if batches carry "mask" (mean over patients with a
    non-empty mask; NaN if there are none); "accuracy" and "auroc" if they carry "label"
    (-1 = unlabeled). AUROC is NaN when the labels hold a single class.
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    names = list(modalities) if modalities is not None else list(net.cfg.modalities)
    selected = torch.zeros(len(net.cfg.modalities), dtype=torch.bool, device=_device(net))
    selected[[net.modality_index(n) for n in names]] = True
    psnr: dict[tuple[int, int], PSNRMetric] = {}
    ssim: dict[tuple[int, int], SSIMMetric] = {}
    dice = DiceMetric(include_background=True, reduction="mean", ignore_empty=True)
    has_mask, lesion_patients = False, 0
    probs: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for raw in loader:
            batch = _on_device(net, raw)
            image, present = check_batch(net, batch)
            present = present & selected
            encoded = net.encode_available(image, present)
            if not encoded:
                continue
            x_hs = {m: e.x_h for m, e in encoded.items()}
            for s, x_h in x_hs.items():
                pred = net.decode(x_h)
                for t in x_hs:
                    both = present[:, s] & present[:, t]
                    if t == s or not both.any():
                        continue
                    p, y = _unit_range(pred[both, t : t + 1], image[both, t : t + 1])
                    if (s, t) not in psnr:
                        psnr[(s, t)] = PSNRMetric(max_val=1.0)
                        ssim[(s, t)] = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=_ssim_window(y.shape[2:]))
                    psnr[(s, t)](p, y)
                    ssim[(s, t)](p, y)
            pooled = pool_levels(encoded, present)
            has_any = present.any(1)
            if "mask" in batch:
                has_mask = True
                seg = (torch.sigmoid(net.segment(*pooled)) > 0.5).float()
                mask = batch["mask"][has_any].float()
                dice(seg[has_any], mask)
                lesion_patients += int((mask.flatten(1).sum(1) > 0).sum())
            if "label" in batch:
                keep = has_any & (batch["label"] >= 0)
                probs.append(F.softmax(net.classify(pooled.x_h[keep]), dim=1).cpu())
                labels.append(batch["label"][keep].long().cpu())
    finally:
        net.train(was_training)
    return _summarize(net, psnr, ssim, (dice, lesion_patients) if has_mask else None, probs, labels)


def _summarize(
    net: PIRNet,
    psnr: dict[tuple[int, int], PSNRMetric],
    ssim: dict[tuple[int, int], SSIMMetric],
    dice: tuple[DiceMetric, int] | None,
    probs: list[Tensor],
    labels: list[Tensor],
) -> dict[str, float]:
    names = net.cfg.modalities
    out: dict[str, float] = {}
    for (s, t), metric in psnr.items():
        out[f"psnr/{names[s]}->{names[t]}"] = metric.aggregate().item()
        out[f"ssim/{names[s]}->{names[t]}"] = ssim[(s, t)].aggregate().item()
    if psnr:
        out["psnr"] = sum(out[f"psnr/{names[s]}->{names[t]}"] for s, t in psnr) / len(psnr)
        out["ssim"] = sum(out[f"ssim/{names[s]}->{names[t]}"] for s, t in psnr) / len(psnr)
    if dice is not None:
        metric, lesion_patients = dice
        out["dice"] = metric.aggregate().item() if lesion_patients else float("nan")
    if labels and torch.cat(labels).numel():
        prob, label = torch.cat(probs), torch.cat(labels)
        out["accuracy"] = (prob.argmax(1) == label).float().mean().item()
        if prob.shape[1] == 2:
            out["auroc"] = float(compute_roc_auc(prob[:, 1], label))
        else:
            out["auroc"] = float(compute_roc_auc(prob, F.one_hot(label, prob.shape[1]), average="macro"))
    return out
