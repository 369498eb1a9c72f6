"""`fedpir synth`: write a synthetic hospital federation (MR phantoms as NIfTI + manifests)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpir.data.manifest import FEDERATION_FILE, MANIFEST_FILE
from fedpir.synthetic.anatomy import ANATOMIES
from fedpir.synthetic.federation import generate_federation
from fedpir.synthetic.scanners import MODALITIES
from fedpir.synthetic.sizes import site_sizes

HELP = "write a synthetic hospital federation (physics-based MR phantoms, NIfTI + manifests)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `fedpir synth`."""
    p.add_argument("--out", type=Path, required=True, help="output folder (must be new or empty)")
    p.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    p.add_argument("--subjects", default="24",
                   help="patients per site: one number, or a comma list cycled over the sites (default 24)")
    p.add_argument("--size", type=int, nargs="+", default=[48], metavar="N",
                   help="volume size: one int for a cube or three (default 48)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--anatomy", choices=ANATOMIES, default="auto",
                   help="icbm (nilearn's ICBM152 maps), procedural (ellipsoids), auto (icbm if available)")
    p.add_argument("--homogeneous", action="store_true",
                   help=f"every site acquires all of {', '.join(MODALITIES)} (default: per-site subsets)")


def run(args: argparse.Namespace) -> int:
    """Generate the federation and print a short summary."""
    if len(args.size) not in (1, 3):
        raise SystemExit(f"fedpir synth: --size takes one or three ints, got {len(args.size)}")
    shape = tuple(args.size * 3 if len(args.size) == 1 else args.size)
    subsets = [list(MODALITIES)] * args.sites if args.homogeneous else None
    try:
        out = generate_federation(
            args.out, n_sites=args.sites, subjects_per_site=site_sizes(args.subjects, args.sites), shape=shape, seed=args.seed,
            anatomy=args.anatomy, modality_subsets=subsets, progress=True,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"fedpir synth: {err}") from err
    meta = json.loads((out / FEDERATION_FILE).read_text())
    print(f"wrote {meta['anatomy']} federation to {out}: {args.sites} sites of {args.subjects} subjects, "
          f"{'x'.join(map(str, meta['shape']))} voxels of {meta['spacing_mm']:.2f} mm, "
          f"modalities {', '.join(meta['modalities'])}")
    for site in meta["sites"]:
        print(f"  {site['name']}: {', '.join(site['modalities'])}  ({out / site['name'] / MANIFEST_FILE})")
    return 0
