"""The public warm start: pretrain on public data, without privacy cost, and save the file a run names.

The offline default corpus is synthetic (:func:`fedpir.synthetic.federation.generate_public_corpus`):
every modality of each public patient comes from a scanner of its own (randomized protocols, noise,
bias, resolution), with anatomy and noise streams disjoint from every site's. A folder of public NIfTI
that `fedpir validate` reads can be used instead. The model is pretrained with the PIR losses, then
its segmentation head is trained on the corpus' lesion masks (public labels), by default with every
modality as input, or with some only (as with public lesion masks that come with FLAIR alone: then the
invariant encoder carries the segmentation to the other modalities). In those epochs each modality of
a patient's view is left out with probability ``modality_dropout`` (one is always kept), so that one
modality alone also segments. The command is `fedpir pretrain-public`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedpir.data.dataset import load_site
from fedpir.models.groups import PARAMETER_GROUPS
from fedpir.models.losses import check_modality_dropout
from fedpir.models.warm_start import save_warm_start
from fedpir.run_config import RunSettings
from fedpir.synthetic.federation import generate_public_corpus
from fedpir.training.model import build_model
from fedpir.training.recipe import RECIPE, WarmStartRecipe
from fedpir.training.trainer import LocalTrainer

#: What public training trains: everything but the lesion probe, which stays at zero (the warm start
#: segments with its head) for the sites' private phase to learn.
PUBLIC_GROUPS: tuple[str, ...] = tuple(g for g in PARAMETER_GROUPS if g != "probe")


def build_warm_start(
    out: Path, *, size: int, modalities: str, recipe: WarmStartRecipe = RECIPE, invariance_weight: float = 1.0,
    seed: int = 0, device: str = "auto", corpus: Path | None = None, progress: bool = True, command: str = "",
) -> str:
    """Pretrain on the public corpus (``corpus``, else the synthetic one of ``seed``) by ``recipe``, write
    ``out`` and return its SHA-256."""
    subjects, pretrain_epochs, segment_epochs = recipe.subjects, recipe.pretrain_epochs, recipe.segment_epochs
    segment_modalities, modality_dropout = recipe.segment_modalities, recipe.modality_dropout
    check_modality_dropout(modality_dropout)  # before the corpus is generated
    settings = RunSettings(seed=seed, volume_size=size, modalities=modalities, batch_size=recipe.batch_size, lr=recipe.lr,
                           dp=False, invariance_weight=invariance_weight, device=device)
    with tempfile.TemporaryDirectory(prefix="fedpir-public-") as tmp:
        if corpus is None:
            corpus = generate_public_corpus(Path(tmp) / "corpus", subjects=subjects, shape=(size,) * 3, seed=seed,
                                            progress=progress)
        dataset, report = load_site(corpus, settings.vocabulary, (size,) * 3)
        if len(dataset) == 0:
            raise ValueError(f"public corpus {corpus}: no usable subject ({report.summary()})")
        seg_set = dataset if segment_modalities == "all" else dataset.with_only(
            [m.strip() for m in segment_modalities.split(",") if m.strip()])
    if len(seg_set) == 0:
        raise ValueError(f"public corpus {corpus}: no subject has any of --segment-modalities {segment_modalities}")
    model = build_model(settings)
    trainers = {"pretrain": LocalTrainer.for_run(settings, model, dataset, state_dir=None, seed=seed, name="public",
                                                 modality_dropout=modality_dropout)}
    trainers["segmentation"] = trainers["pretrain"] if seg_set is dataset else LocalTrainer.for_run(
        settings, model, seg_set, state_dir=None, seed=seed, name="public", modality_dropout=modality_dropout)
    history: list[dict[str, Any]] = []
    has_masks = any(bool(seg_set[i]["has_mask"]) for i in range(len(seg_set)))
    plan = [("pretrain", pretrain_epochs)] + ([("segmentation", segment_epochs)] if has_masks else [])
    bar = tqdm(total=sum(e for _, e in plan), desc="warm start", unit="epoch", disable=not progress)
    for objective, epochs in plan:
        for _ in range(epochs):
            metrics = trainers[objective].train_round(objective, 1, groups=PUBLIC_GROUPS, progress=False)
            history.append({"objective": objective, "loss": metrics["loss_total"]})
            bar.set_postfix(objective=objective, loss=f"{metrics['loss_total']:.3f}")
            bar.update()
    bar.close()
    meta = {"command": command, "corpus": str(corpus) if corpus else "synthetic", "subjects": len(dataset),
            "settings": settings.to_run_config(), "pretrain_epochs": pretrain_epochs,
            "segment_epochs": segment_epochs if has_masks else 0, "segment_modalities": segment_modalities,
            "modality_dropout": modality_dropout,
            "history": history}
    return save_warm_start(model.cpu(), out, meta)
