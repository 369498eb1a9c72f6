"""`fedpir simulate`: a synthetic (or given) federation, fedpir and the baselines, one report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from fedpir.commands.flags import add_noise_flag
from fedpir.run_config import RunSettings
from fedpir.wire.protocol import TRANSFER_DTYPES

HELP = "simulate a federation on this machine: fedpir vs baselines, with a Markdown report and plots"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags; defaults are small enough for a 2-core laptop CPU (a few minutes)."""
    from fedpir.simulation.runner import DEFAULT_METHODS, METHODS

    d = RunSettings()
    p.add_argument("--out", type=Path, default=Path("fedpir-out"), help="output folder (default: fedpir-out)")
    p.add_argument("--federation", type=Path, help="existing federation folder (default: generate a synthetic one)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--sites", type=int, default=d.num_sites)
    p.add_argument("--subjects", default=d.subjects_per_site,
                   help="patients per synthetic site: one number, or a comma list cycled over the sites "
                        f"(default {d.subjects_per_site}: hospitals of unequal size)")
    p.add_argument("--size", type=int, default=d.volume_size, help="model grid edge (voxels)")
    p.add_argument("--pretrain-rounds", type=int, default=d.pretrain_rounds)
    p.add_argument("--finetune-rounds", type=int, default=d.finetune_rounds)
    p.add_argument("--local-epochs", type=int, default=d.local_epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--task", choices=("segmentation", "classification"), default=d.finetune_task)
    p.add_argument("--strategy", default=d.strategy, help="server strategy of the federated methods")
    p.add_argument("--epsilon", type=float, default=d.epsilon_budget, help="privacy budget per site")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the federation, of its training and of the public corpus of --warm-start auto")
    add_noise_flag(p)
    p.add_argument("--pretrain-trainable", default=d.pretrain_trainable,
                   help="parameter groups a pretraining round trains (preset or comma list; see docs/architecture.md)")
    p.add_argument("--finetune-trainable", default=d.finetune_trainable,
                   help="parameter groups a fine-tuning round trains (\"head\": the task head only)")
    p.add_argument("--mim", action="store_true", help="add Alice's masked image modelling term to pretraining")
    p.add_argument("--anatomical", action="store_true", help="add Alice's anatomical contrast term to pretraining")
    p.add_argument("--proximal-mu", type=float, default=d.proximal_mu, help="FedProx mu (with --strategy fedprox)")
    p.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--warm-start", default="auto",
                   help="auto: the public warm start, built once and cached (~/.fedpir/warm-starts); none: random "
                        "initialisation; or a file made by `fedpir pretrain-public`")
    p.add_argument("--noinv-warm-start", type=Path,
                   help="warm-start file of the fedpir-noinv ablation, with --warm-start FILE (pretrained with "
                        "--invariance-weight 0)")
    p.add_argument("--augment-views", type=int, default=d.augment_views,
                   help="fine-tuning: augmented views per patient averaged before clipping")
    p.add_argument("--transfer-dtype", choices=TRANSFER_DTYPES, default=d.transfer_dtype,
                   help="how sites send their shared weights (float16/int8 halve/quarter the bytes)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")


def _quiet(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """Generate or take the federation, run every method, write the report."""
    from fedpir.models.groups import trainable_groups
    from fedpir.simulation.cross_modal import cross_modal_summary
    from fedpir.simulation.report import write_report
    from fedpir.simulation.runner import METHODS, method_settings, run_method
    from fedpir.simulation.warm_starts import run_warm_starts
    from fedpir.synthetic.prepare import synthetic_federation

    _quiet(args.verbose)
    for spec in (args.pretrain_trainable, args.finetune_trainable):
        trainable_groups(spec)  # a bad value stops here, before anything is written
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    out = args.out.expanduser().resolve()
    taken = [m for m in methods if (out / m / "metrics.jsonl").exists()]
    if taken:
        print(f"error: {out} already holds runs of {', '.join(taken)}; choose another --out", file=sys.stderr)
        return 2
    settings = RunSettings(
        federation_dir=str(args.federation.expanduser().resolve()) if args.federation else str(out / "federation"),
        run_dir=str(out), seed=args.seed, num_sites=args.sites, subjects_per_site=args.subjects,
        volume_size=args.size, pretrain_rounds=args.pretrain_rounds, finetune_rounds=args.finetune_rounds,
        local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, strategy=args.strategy,
        dp=not args.no_dp, epsilon_budget=args.epsilon, secret_noise=not args.reproducible_noise,
        finetune_task=args.task, pretrain_trainable=args.pretrain_trainable,
        finetune_trainable=args.finetune_trainable, mim=args.mim, anatomical=args.anatomical,
        proximal_mu=args.proximal_mu, device=args.device, augment_views=args.augment_views,
        transfer_dtype=args.transfer_dtype,
        min_sites=min(RunSettings().min_sites, args.sites),
    )
    settings, noinv = run_warm_starts(settings, args.warm_start, args.noinv_warm_start, methods)
    if not args.federation:
        print(f"generating a synthetic federation: {args.sites} sites of {settings.site_sizes} patients, {args.size}^3")
        synthetic_federation(settings)
    elif not settings.federation_path.is_dir():
        print(f"error: federation folder {settings.federation_path} does not exist", file=sys.stderr)
        return 2
    start = time.perf_counter()
    for i, method in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {method} ...", flush=True)
        t0 = time.perf_counter()
        run_method(method, settings, out, noinv)
        print(f"[{i}/{len(methods)}] {method} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print("scoring each site's final model on every single input modality ...", flush=True)
    cross_modal = cross_modal_summary(out, {m: method_settings(m, settings, out / m, noinv) for m in methods})
    report = write_report(out, methods, settings, cross_modal)
    print(f"all methods done in {time.perf_counter() - start:.0f} s; report: {report}")
    return 0
