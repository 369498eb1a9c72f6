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

    fedpir pretrain-public --out warm_start.pt --size 24 --pretrain-epochs 8 --segment-epochs 32
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from fedpir.commands.flags import add_settings_flags
from fedpir.training.recipe import WarmStartRecipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedpir pretrain-public``: the output, the corpus, the recipe's steps and the run knobs
    the file must match."""
    parser.add_argument("--out", type=Path, required=True, help="the warm-start file to write")
    parser.add_argument("--corpus", type=Path, help="a folder of public NIfTI (default: generate the synthetic corpus)")
    recipe = parser.add_argument_group("recipe")
    for step in fields(WarmStartRecipe):
        flag = "--corpus-subjects" if step.name == "subjects" else "--" + step.name.replace("_", "-")
        recipe.add_argument(flag, dest=step.name, type=type(step.default), default=step.default, help=step.metadata["help"])
    knobs = parser.add_argument_group("run settings the warm start must match (seed: of the public corpus)")
    add_settings_flags(knobs, ("volume_size", "modalities", "invariance_weight", "seed", "device"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Build the warm start and print what a run config needs."""
    from fedpir.training.warm_start import build_warm_start

    if args.out.exists():
        print(f"fedpir pretrain-public: error: {args.out} exists; choose another --out", file=sys.stderr)
        return 2
    recipe = WarmStartRecipe(**{step.name: getattr(args, step.name) for step in fields(WarmStartRecipe)})
    sha = build_warm_start(
        args.out, size=args.volume_size, modalities=args.modalities, recipe=recipe,
        invariance_weight=args.invariance_weight, seed=args.seed, device=args.device, corpus=args.corpus,
        progress=not args.no_progress, command=shlex.join(["fedpir", "pretrain-public", *sys.argv[2:]]),
    )
    print(f"wrote {args.out}\nsha256 {sha}\nrun config: warm-start=\"{args.out.resolve()}\" warm-start-sha256=\"{sha}\"")
    return 0
