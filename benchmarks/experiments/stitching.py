"""Stitching site encoders into the global space: does a head of the global space transfer through T?

Per seed: the synthetic federation and stratified split of ``benchmarks/experiments/zero_shot.py``; a global
PIRNet is pretrained on all training patients (``--pretrain-epochs``, no DP). Then each site k
fine-tunes its own copy of it on its own training patients (self-supervised, ``--local-epochs`` at
``--local-lr``): its encoder drifts. A head of the global space, a logistic regression on global
pooled X_h with the labels of the *other* sites' training patients, is applied to site k's
held-out patients

- ``global``: head(global encoder(x)), the reference;
- ``naive``: head(local encoder(x)), the drifted encoder read as if it were the global one;
- ``stitched-<method>``: head(T(local encoder(x))), T fitted on site k's training patients
  embedded by both encoders (``fedpir.alignment.stitching``), for Procrustes and ridge.

Also the mismatch ||T(z_local) - z_global|| / ||z_global - mean|| on the held-out patients (naive:
T = identity). Metrics are pooled over the sites' held-out patients of a seed.

    python benchmarks/experiments/stitching.py --seeds 0,1,2 --out docs/results/stitching.json

(10 to 20 minutes on one CPU thread of a shared machine; results in docs/alignment.md.)
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset
from zero_shot import federation_splits, task_labels

from fedpir.alignment.anchors import embed_dataset
from fedpir.alignment.stitching import StitchedHead, fit_stitch
from fedpir.alignment.zeroshot import binary_metrics, linear_probe
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.privacy.dp import DPConfig
from fedpir.training.trainer import LocalTrainer

STITCH_METHODS = ("procrustes", "ridge")


def run_seed(seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Global pretraining, per-site fine-tuning and the three ways of reading site embeddings."""
    start = time.perf_counter()
    vocab, trains, tests = federation_splits(seed, args, workdir)
    torch.manual_seed(seed)
    global_model = PIRNet(PIRConfig(vocab, spatial_size=(args.size,) * 3))
    LocalTrainer(global_model, ConcatDataset(trains), dp=DPConfig(enabled=False), batch_size=args.batch_size,
                 lr=args.lr, seed=seed).train_round("pretrain", args.pretrain_epochs, progress=False)
    train_z = [embed_dataset(global_model, s)[0] for s in trains]
    scores: dict[str, dict[str, list[np.ndarray]]] = {t: {} for t in args.tasks}
    labels: dict[str, list[np.ndarray]] = {t: [] for t in args.tasks}
    mismatch: dict[str, list[float]] = {}
    for k, (train_k, test_k) in enumerate(zip(trains, tests, strict=True)):
        local = copy.deepcopy(global_model)
        LocalTrainer(local, train_k, dp=DPConfig(enabled=False), batch_size=args.batch_size, lr=args.local_lr,
                     seed=seed * 100 + k).train_round("pretrain", args.local_epochs, progress=False)
        z_global, _ = embed_dataset(global_model, test_k)
        z_local, _ = embed_dataset(local, test_k)
        spread = float(np.linalg.norm(z_global - z_global.mean(0)))
        maps = {m: fit_stitch(local, global_model, train_k, m, alpha=args.ridge_alpha) for m in STITCH_METHODS}
        mismatch.setdefault("naive", []).append(float(np.linalg.norm(z_local - z_global)) / spread)
        for m, amap in maps.items():
            mismatch.setdefault(f"stitched-{m}", []).append(float(np.linalg.norm(amap(z_local) - z_global)) / spread)
        others = [j for j in range(len(trains)) if j != k]
        for task in args.tasks:
            head_z = np.concatenate([train_z[j] for j in others])
            head_y = np.concatenate([task_labels(trains[j], task) for j in others])

            def head(z: np.ndarray, hz: np.ndarray = head_z, hy: np.ndarray = head_y) -> np.ndarray:
                return linear_probe(hz, hy, z, seed=seed)[:, 1]

            readings = {"global": head(z_global), "naive": head(z_local)}
            readings |= {f"stitched-{m}": StitchedHead(amap, head)(z_local) for m, amap in maps.items()}
            for name, s in readings.items():
                scores[task].setdefault(name, []).append(s)
            labels[task].append(task_labels(test_k, task))
    metrics = {task: {name: binary_metrics(np.concatenate(s), np.concatenate(labels[task]), threshold=0.5)
                      for name, s in per.items()} for task, per in scores.items()}
    return {"seed": seed, "metrics": metrics, "mismatch": {k: float(np.mean(v)) for k, v in mismatch.items()},
            "mismatch_per_site": mismatch, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=6)
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=4)
    parser.add_argument("--local-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ridge-alpha", type=float, default=0.1)
    parser.add_argument("--tasks", default="volume,lesion", help="comma list of benchmarks/experiments/zero_shot.py TASKS")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    torch.set_num_threads(args.threads)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
            runs.append(run_seed(seed, args, Path(tmp)))
            print(json.dumps({"seed": seed, "mismatch": runs[-1]["mismatch"], "seconds": runs[-1]["seconds"]}),
                  file=sys.stderr, flush=True)
    summary: dict[str, Any] = {"mismatch": {k: float(np.mean([r["mismatch"][k] for r in runs])) for k in runs[0]["mismatch"]}}
    for task in args.tasks:
        for name in runs[0]["metrics"][task]:
            for metric in ("accuracy", "balanced_accuracy", "auroc"):
                values = [r["metrics"][task][name][metric] for r in runs]
                summary.setdefault(task, {}).setdefault(name, {})[metric] = {
                    "mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": values}
    doc = {"command": "python benchmarks/experiments/stitching.py " + shlex.join(sys.argv[1:] if argv is None else argv),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "torch": torch.__version__, "summary": summary, "runs": runs}
    text = json.dumps(doc, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    print(json.dumps(summary["mismatch"]), file=sys.stderr)
    for task in args.tasks:
        for name, m in summary[task].items():
            print(f"{task:>7} {name:>20}  acc {m['accuracy']['mean']:.3f}  bal {m['balanced_accuracy']['mean']:.3f}"
                  f"  auroc {m['auroc']['mean']:.3f}±{m['auroc']['std']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
