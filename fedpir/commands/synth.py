"""`fedpir synth`: write a synthetic hospital federation (MR phantoms as NIfTI + manifests)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpir.commands.flags import add_settings_flags
from fedpir.data.manifest import FEDERATION_FILE, MANIFEST_FILE
from fedpir.run_config import RunSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `fedpir synth`."""
    p.add_argument("--out", type=Path, required=True, help="output folder (must be new or empty)")
    p.add_argument("--size", type=int, nargs="+", default=[RunSettings.volume_size], metavar="N",
                   help="volume size in voxels: one int for a cube or three (default: the run settings' grid, "
                        f"{RunSettings.volume_size})")
    p.add_argument("--anatomy", default="auto",
                   help="icbm (nilearn's ICBM152 maps), procedural (ellipsoids), auto (icbm if available)")
    p.add_argument("--homogeneous", action="store_true",
                   help="every site acquires every modality (default: per-site subsets)")
    add_settings_flags(p.add_argument_group("run settings (the federation `fedpir simulate` generates by default)"),
                       ("num_sites", "subjects_per_site", "site_lesion", "heterogeneity", "seed"))


def run(args: argparse.Namespace) -> int:
    """Generate the federation and print a short summary."""
    if len(args.size) not in (1, 3):
        raise ValueError(f"--size takes one or three ints, got {len(args.size)}")
    from fedpir.synthetic.anatomy import ANATOMIES
    from fedpir.synthetic.federation import generate_federation
    from fedpir.synthetic.scanners import MODALITIES
    from fedpir.synthetic.sizes import site_sizes

    if args.anatomy not in ANATOMIES:
        raise ValueError(f"--anatomy {args.anatomy!r} unknown; valid: {', '.join(ANATOMIES)}")
    shape = tuple(args.size * 3 if len(args.size) == 1 else args.size)
    sizes = site_sizes(args.subjects_per_site, args.num_sites)
    subsets = [list(MODALITIES)] * args.num_sites if args.homogeneous else None
    out = generate_federation(args.out, n_sites=args.num_sites, subjects_per_site=sizes, shape=shape, seed=args.seed,
                              anatomy=args.anatomy, modality_subsets=subsets, progress=True,
                              lesion_class=args.site_lesion, heterogeneity=args.heterogeneity)
    meta = json.loads((out / FEDERATION_FILE).read_text())
    print(f"wrote {meta['anatomy']} federation to {out}: {args.num_sites} sites of {args.subjects_per_site} subjects, "
          f"{'x'.join(map(str, meta['shape']))} voxels of {meta['spacing_mm']:.2f} mm, "
          f"modalities {', '.join(meta['modalities'])}, lesion class {meta['lesion_class']['name']}")
    for site in meta["sites"]:
        print(f"  {site['name']}: {', '.join(site['modalities'])}  ({out / site['name'] / MANIFEST_FILE})")
    return 0
