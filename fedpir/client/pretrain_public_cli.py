"""``fedpir pretrain-public``: build a warm start on public data, without privacy cost.

The offline default corpus is synthetic (:func:`fedpir.synthetic.federation.generate_public_corpus`):
every modality of each public patient comes from a scanner of its own (randomized protocols, noise,
bias, resolution), with anatomy and noise streams disjoint from every site's. ``--corpus DIR`` uses
any folder of public NIfTI that `fedpir validate` reads instead. The model is pretrained with the
PIR losses, then its segmentation head is trained on the corpus' lesion masks (public labels), by
default with every modality as input; ``--segment-modalities flair`` trains it on FLAIR alone, as
with public lesion masks that come with few modalities (then the invariant encoder is what carries
the segmentation to the other modalities). In those epochs each modality of a patient's view is
left out with probability ``--modality-dropout`` (one is always kept), so that one modality alone
also segments. The file is what a run names as ``warm-start`` with its ``warm-start-sha256``.

Example::

    fedpir pretrain-public --out warm_start.pt --size 24 --pretrain-epochs 8 --segment-epochs 32 --modality-dropout 0.5
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedpir.client.trainer import LocalTrainer
from fedpir.data.dataset import load_site
from fedpir.models.losses import check_modality_dropout
from fedpir.models.pir import build_model
from fedpir.models.warm_start import save_warm_start
from fedpir.run_config import RunSettings

HELP = "build a warm-start file on public data (synthetic by default), with its SHA-256"
#: How a warm start is made by default (the flags of the same names; `fedpir simulate` uses these).
RECIPE: dict[str, int | float | str] = {"subjects": 32, "pretrain_epochs": 8, "segment_epochs": 32, "lr": 2e-3,
                                        "batch_size": 4, "segment_modalities": "all", "modality_dropout": 0.5}
#: Bumped whenever the generator or the losses change what a recipe builds (cached warm starts are keyed by it).
RECIPE_VERSION = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedpir pretrain-public``."""
    d = RunSettings()
    parser.add_argument("--out", type=Path, required=True, help="the warm-start file to write")
    parser.add_argument("--corpus", type=Path, help="a folder of public NIfTI (default: generate the synthetic corpus)")
    parser.add_argument("--subjects", type=int, default=RECIPE["subjects"], help="patients of the generated corpus")
    parser.add_argument("--size", type=int, default=d.volume_size, help="model grid edge (must match the run's)")
    parser.add_argument("--modalities", default=d.modalities, help="modality vocabulary (must match the run's)")
    parser.add_argument("--pretrain-epochs", type=int, default=RECIPE["pretrain_epochs"])
    parser.add_argument("--segment-epochs", type=int, default=RECIPE["segment_epochs"],
                        help="epochs on the public lesion masks (0: none)")
    parser.add_argument("--segment-modalities", default=RECIPE["segment_modalities"],
                        help="input modalities of those epochs: all, or a comma list (e.g. flair)")
    parser.add_argument("--modality-dropout", type=float, default=RECIPE["modality_dropout"],
                        help="in those epochs, leave each modality of a patient out with this probability "
                             "(one is always kept), so that one modality alone also segments; 0: none")
    parser.add_argument("--invariance-weight", type=float, default=1.0, help="0 for the fedpir-noinv ablation")
    parser.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus (its streams differ from every site's)")
    parser.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--no-progress", action="store_true")


def build_warm_start(
    out: Path, *, size: int, modalities: str, subjects: int = int(RECIPE["subjects"]),
    pretrain_epochs: int = int(RECIPE["pretrain_epochs"]), segment_epochs: int = int(RECIPE["segment_epochs"]),
    invariance_weight: float = 1.0, batch_size: int = int(RECIPE["batch_size"]), lr: float = float(RECIPE["lr"]),
    seed: int = 0, device: str = "auto", corpus: Path | None = None,
    segment_modalities: str = str(RECIPE["segment_modalities"]),
    modality_dropout: float = float(RECIPE["modality_dropout"]), progress: bool = True, command: str = "",
) -> str:
    """Pretrain on the public corpus, write ``out`` and return its SHA-256; the segmentation epochs
    see only ``segment_modalities`` ("all" or a comma list), each left out of a patient's view with
    probability ``modality_dropout``."""
    check_modality_dropout(modality_dropout)  # before the corpus is generated
    settings = RunSettings(seed=seed, volume_size=size, modalities=modalities, batch_size=batch_size, lr=lr,
                           dp=False, invariance_weight=invariance_weight, device=device)
    with tempfile.TemporaryDirectory(prefix="fedpir-public-") as tmp:
        if corpus is None:
            from fedpir.synthetic.federation import generate_public_corpus

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
            metrics = trainers[objective].train_round(objective, 1, progress=False)
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


def run(args: argparse.Namespace) -> int:
    """Build the warm start and print what a run config needs."""
    if args.out.exists():
        print(f"error: {args.out} exists; choose another --out", file=sys.stderr)
        return 2
    sha = build_warm_start(
        args.out, size=args.size, modalities=args.modalities, subjects=args.subjects,
        pretrain_epochs=args.pretrain_epochs, segment_epochs=args.segment_epochs,
        invariance_weight=args.invariance_weight, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, corpus=args.corpus, segment_modalities=args.segment_modalities,
        modality_dropout=args.modality_dropout, progress=not args.no_progress,
        command=shlex.join(["fedpir", "pretrain-public", *sys.argv[2:]]),
    )
    print(f"wrote {args.out}\nsha256 {sha}\nrun config: warm-start=\"{args.out.resolve()}\" warm-start-sha256=\"{sha}\"")
    return 0
