"""Seconds per local training step: pretraining and fine-tuning, with and without DP, per torch thread count.

One synthetic site whose patients hold all four modalities (the most expensive case: pretraining
encodes every available modality four times per patient), ``--size``^3 volumes, the default PIRNet
widths. Each configuration runs one warm-up round, then ``--repeats`` rounds of ``--epochs`` epochs
timed by ``LocalTrainer.train_round``; seconds per step = round seconds / steps (median and min over
the repeats; the machine may be shared, so the min is the less load-dependent figure). DP rounds use Poisson
sampling (batch size varies around ``--batch-size``) and a fixed noise multiplier of 1.0.

    python benchmarks/cost/training_speed.py --out docs/results/training_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedpir.data.dataset import load_site
from fedpir.models.groups import objective_for
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.privacy.dp import DPConfig
from fedpir.synthetic.federation import generate_federation
from fedpir.synthetic.scanners import MODALITIES
from fedpir.training.trainer import LocalTrainer

ROUNDS: tuple[tuple[str, str | None], ...] = (("pretrain", None), ("finetune", "segmentation"))


def make_trainer(size: int, dataset: Any, dp: bool, batch_size: int) -> LocalTrainer:
    """A trainer on a fresh default-width PIRNet (seed 0); DP with a fixed noise multiplier of 1.0."""
    torch.manual_seed(0)
    model = PIRNet(PIRConfig(list(MODALITIES), spatial_size=(size,) * 3))
    config = DPConfig(noise_multiplier=1.0, budget_epsilon=1e9) if dp else DPConfig(enabled=False)
    return LocalTrainer(model, dataset, dp=config, batch_size=batch_size, seed=0)


def measure(
    size: int, batch_size: int, patients: int, epochs: int, repeats: int, threads: Sequence[int], work_dir: Path
) -> list[dict[str, Any]]:
    """One row per (threads, stage, dp): median and min seconds per step over ``repeats`` timed rounds.

    Repeats are the outer loop and thread counts the inner one, so that a change of background
    load on the shared machine hits every thread count alike.
    """
    fed = generate_federation(work_dir / "federation", n_sites=1, subjects_per_site=patients, shape=(size,) * 3,
                              seed=0, modality_subsets=[list(MODALITIES)])
    dataset, _ = load_site(fed / "site-0", list(MODALITIES), (size,) * 3)
    configs = [(stage, task, dp) for stage, task in ROUNDS for dp in (False, True)]
    trainers = {c: make_trainer(size, dataset, c[2], batch_size) for c in configs}
    for (stage, task, _), trainer in trainers.items():  # warm-up (allocator, Opacus wrapping)
        trainer.train_round(objective_for(stage, task), 1, progress=False)
    samples: dict[tuple[int, str, bool], list[float]] = {(n, s, dp): [] for n in threads for s, _, dp in configs}
    for _ in range(repeats):
        for n in threads:
            torch.set_num_threads(n)
            for (stage, task, dp), trainer in trainers.items():
                metrics = trainer.train_round(objective_for(stage, task), epochs, progress=False)
                samples[(n, stage, dp)].append(metrics["seconds"] / max(metrics["steps"], 1))
    rows = []
    for (n, stage, dp), values in samples.items():
        rows.append({"threads": n, "stage": stage, "dp": dp, "median_seconds_per_step": statistics.median(values),
                     "min_seconds_per_step": min(values), "samples": values})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write the JSON summary here too")
    p.add_argument("--size", type=int, default=32, help="volume edge (voxels)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--patients", type=int, default=8, help="patients of the timed site")
    p.add_argument("--epochs", type=int, default=1, help="epochs per timed round")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration")
    p.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2])
    args = p.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpir-speed-") as tmp:
        rows = measure(args.size, args.batch_size, args.patients, args.epochs, args.repeats, args.threads, Path(tmp))
    result = {
        "command": shlex.join(["python", "benchmarks/cost/training_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "size": args.size, "batch_size": args.batch_size, "patients": args.patients, "repeats": args.repeats,
        "modalities_per_patient": len(MODALITIES), "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "torch": torch.__version__,
        "rows": rows, "total_seconds": time.perf_counter() - start,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
