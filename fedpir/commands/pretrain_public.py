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
from pathlib import Path

from fedpir.run_config import RunSettings
from fedpir.training.warm_start import RECIPE, build_warm_start

HELP = "build a warm-start file on public data (synthetic by default), with its SHA-256"


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
