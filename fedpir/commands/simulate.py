"""`fedpir simulate`: a synthetic (or given) federation, fedpir and the baselines, one report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from fedpir.commands.flags import add_settings_flags, settings_from_args
from fedpir.run_config import STATE_ROOT, RunSettings
from fedpir.simulation.methods import DEFAULT_METHODS, METHODS
from fedpir.simulation.presets import PRESET_KNOBS, PRESETS
from fedpir.simulation.sweep import NO_DP, SWEEP_SITE_SIZE, parse_sweep, value_changes

#: The run settings `fedpir simulate` offers as flags (the rest keep their defaults).
KNOBS: tuple[str, ...] = (
    "seed", "num_sites", "subjects_per_site", "site_lesion", "heterogeneity", "volume_size", "pretrain_rounds",
    "finetune_rounds", "local_epochs",
    "batch_size", "lr", "optimizer", "segment_positive_weight", "max_grad_norm", "finetune_task", "strategy", "dp",
    "epsilon_budget",
    "secret_noise", "pretrain_trainable",
    "finetune_trainable", "mim", "anatomical", "proximal_mu", "device", "cpus_per_site", "tracking", "augment_views",
    "transfer_dtype",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags; defaults are small enough for a 2-core laptop CPU (a few minutes)."""
    p.add_argument("--out", type=Path, default=Path("fedpir-out"), help="output folder")
    p.add_argument("--federation", type=Path, help="existing federation folder (default: generate a synthetic one)")
    p.add_argument("--preset", choices=PRESETS, default="default",
                   help="the federation: quick (a smoke run of a minute or two), default (8 sites of 4-20 patients), "
                        "hospital (32 sites of 4-60); a flag given here overrides its value (default: %(default)s)")
    p.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default: the preset's, else "
                                     f"{','.join(DEFAULT_METHODS)})")
    p.add_argument("--warm-start",
                   help=f"auto (the default, but for --preset quick's none): the public warm starts, built once "
                        f"and cached ({STATE_ROOT / 'warm-starts'}) from the public corpus of --seed; none: random "
                        "initialisation; or a file made by `fedpir pretrain-public`")
    p.add_argument("--noinv-warm-start", type=Path,
                   help="warm-start file of the fedpir-noinv ablation, with --warm-start FILE (pretrained with "
                        "--invariance-weight 0)")
    p.add_argument("--sweep", metavar="KNOB=V1,V2,...",
                   help="one simulation per value, then sweep.md and sweep.png: sites=1,2,4,8,16 (every site of "
                        f"--subjects patients, {SWEEP_SITE_SIZE} unless given), epsilon=1,3,8,{NO_DP} or h=0,0.5,1 "
                        "(--heterogeneity); each run in OUT/KNOB-VALUE")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    add_settings_flags(p.add_argument_group("run settings"), KNOBS, defaults=dict.fromkeys(PRESET_KNOBS))


def apply_preset(args: argparse.Namespace) -> None:
    """Fill in the knobs and methods that no flag gave from ``--preset`` (else RunSettings' defaults)."""
    preset = PRESETS[args.preset]
    for name in PRESET_KNOBS:
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, getattr(RunSettings, name)))
    if args.methods is None:
        args.methods = preset.get("methods", ",".join(DEFAULT_METHODS))
    if args.warm_start is None:
        args.warm_start = preset.get("warm_start", "auto")


def checked_settings(args: argparse.Namespace, out: Path) -> tuple[RunSettings, list[str]]:
    """The run's settings and methods, every flag checked before anything is built or written
    (ValueError or FileNotFoundError naming the flag)."""
    apply_preset(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(METHODS)}")
    taken = [m for m in methods if (out / m / "metrics.jsonl").exists()]
    if taken:
        raise ValueError(f"{out} already holds runs of {', '.join(taken)}; choose another --out")
    if args.federation and not args.federation.expanduser().is_dir():
        raise FileNotFoundError(f"--federation {args.federation} is not a folder")
    for flag, value in (("--warm-start", args.warm_start), ("--noinv-warm-start", args.noinv_warm_start)):
        if value is not None and str(value) not in ("auto", "none") and not Path(value).expanduser().is_file():
            raise FileNotFoundError(f"{flag} {value} does not exist; build one with `fedpir pretrain-public`")
    settings = settings_from_args(
        args, KNOBS, run_dir=str(out), min_sites=min(RunSettings.min_sites, args.num_sites),
        federation_dir=str(args.federation.expanduser().resolve()) if args.federation else str(out / "federation"))
    return settings, methods


def _quiet(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _print_gates(out: Path) -> None:
    """The validity gates of the run, as the report states them (from its summary.json)."""
    from fedpir.simulation.gates import Gate, verdict

    gates = [Gate(**g) for g in json.loads((out / "summary.json").read_text())["gates"]]
    for g in gates:
        state = "not measured" if g.holds is None else "holds" if g.holds else "FAILS"
        shown = "" if g.measured is None else f" (measured {g.measured:.3f})"
        print(f"gate: {g.name}: {g.rule}{shown}: {state}")
    if gates:
        print(verdict(gates))


def run(args: argparse.Namespace) -> int:
    """One simulation, or with ``--sweep`` one per value and the sweep's report."""
    out = args.out.expanduser().resolve()
    if not args.sweep:
        return simulate(args, out)
    knob, values = parse_sweep(args.sweep)
    if args.federation:
        raise ValueError("--sweep generates a federation per value: leave out --federation")
    if knob == "sites" and args.subjects_per_site is None:  # not given: not the preset's sizes, cycled over K
        args.subjects_per_site = SWEEP_SITE_SIZE
    apply_preset(args)
    runs = {value: _with(args, value_changes(knob, value)) for value in values}
    methods = set()
    for value, value_args in runs.items():  # every value's flags checked before anything runs
        methods |= set(checked_settings(value_args, out / f"{knob}-{value}")[1])
    from fedpir.simulation.engine import engine_for

    with engine_for(sorted(methods)):  # one engine start for the whole sweep
        for value, value_args in runs.items():
            print(f"== {knob} = {value}", flush=True)
            simulate(value_args, out / f"{knob}-{value}")
    from fedpir.simulation.report import write_sweep_report
    from fedpir.simulation.sweep import sweep_rows

    print(f"sweep report: {write_sweep_report(out, knob, sweep_rows(out, knob, values))}")
    return 0


def _with(args: argparse.Namespace, changes: dict) -> argparse.Namespace:
    """A copy of the flags with ``changes``; a one-site value runs no method that needs several sites."""
    copy = argparse.Namespace(**{**vars(args), **changes})
    if changes.get("num_sites") == 1:
        copy.methods = ",".join(m for m in args.methods.split(",") if m.strip() != "fedpir-dn")
    return copy


def simulate(args: argparse.Namespace, out: Path) -> int:
    """Generate or take the federation, run every method, write the report."""
    settings, methods = checked_settings(args, out)
    from fedpir.simulation.cross_modal import cross_modal_summary
    from fedpir.simulation.engine import engine_for
    from fedpir.simulation.forecast import site_forecasts
    from fedpir.simulation.report import FORECAST_OF, write_report
    from fedpir.simulation.runner import method_settings, run_method
    from fedpir.simulation.warm_starts import run_warm_starts
    from fedpir.synthetic.prepare import synthetic_federation

    _quiet(args.verbose)  # after Flower is imported: its import sets its logger's level
    settings, noinv = run_warm_starts(settings, args.warm_start, args.noinv_warm_start, methods)
    if not args.federation:
        print(f"generating a synthetic federation: {settings.num_sites} sites of {settings.site_sizes} patients, "
              f"{settings.volume_size}^3")
        synthetic_federation(settings)
    start = time.perf_counter()
    with engine_for(methods):  # one start of Flower's simulation engine for every method
        for i, method in enumerate(methods, 1):
            print(f"[{i}/{len(methods)}] {method} ...", flush=True)
            t0 = time.perf_counter()
            run_method(method, settings, out, noinv)
            print(f"[{i}/{len(methods)}] {method} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print("scoring each site's final model on every single input modality ...", flush=True)
    cross_modal = cross_modal_summary(out, {m: method_settings(m, settings, out / m, noinv) for m in methods})
    forecasts = []
    if settings.dp and settings.finetune_task == "segmentation" and any(m in methods for m in FORECAST_OF):
        print("measuring each site's gradient coherence for the DP forecast ...", flush=True)
        forecasts = site_forecasts(method_settings("fedpir", settings, out / "fedpir", noinv))
    report = write_report(out, methods, settings, cross_modal, forecasts)
    _print_gates(out)
    print(f"all methods done in {time.perf_counter() - start:.0f} s; report: {report}")
    return 0
