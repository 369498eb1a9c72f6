"""``fedpir train``: a short local training run of one site, private by default, reported as JSON.

Example::

    fedpir train --site fed/site-0 --stage pretrain --epochs 2 --rounds 3 --epsilon 8 --out run.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fedpir.client.trainer import STAGES, LocalTrainer
from fedpir.data.dataset import load_site
from fedpir.data.manifest import load_manifest
from fedpir.models.losses import TASKS, LossConfig
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.privacy.budget import BudgetExceededError
from fedpir.privacy.dp import ACCOUNTANTS, DPConfig

HELP = "train one site locally (patient-level DP-SGD unless --no-dp) and report losses, epsilon, metrics"
EXIT_BUDGET = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedpir train``."""
    parser.add_argument("--site", type=Path, required=True, help="site folder (or its manifest)")
    parser.add_argument(
        "--modalities",
        help="comma-separated modality vocabulary (default: SITE/../federation.json, else the site's own)",
    )
    parser.add_argument("--stage", choices=STAGES, default="pretrain")
    parser.add_argument("--task", choices=TASKS, help="fine-tuning task (needed with --stage finetune)")
    parser.add_argument("--freeze-encoder", action="store_true", help="fine-tune the task head only")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--rounds", type=int, default=1, help="local rounds (each is one ledger entry)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="site budget; the run is planned to reach it")
    parser.add_argument("--noise-multiplier", type=float, help="fixed noise multiplier instead of planning for --epsilon")
    parser.add_argument("--delta", type=float, help="default: the ledger's, else min(1e-5, 1/(10 n_patients))")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-patient clipping bound")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp")
    parser.add_argument("--no-dp", action="store_true", help="train without differential privacy (baselines)")
    parser.add_argument("--batch-size", type=int, default=4, help="expected patients per batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=32, help="cubic input size the volumes are resampled to")
    parser.add_argument("--out", type=Path, help="write the per-round records and the config here (JSON)")
    parser.add_argument("--state-dir", type=Path, help="site state folder holding the privacy ledger")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reproducible-noise", action="store_true",
                        help="seed DP noise and sampling from --seed (experiments only: whoever knows the seed can replay the noise)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def vocabulary(site: Path, given: str | None) -> list[str]:
    """The modality vocabulary: ``given``, else the federation's, else the site manifest's."""
    if given:
        return [m.strip() for m in given.split(",") if m.strip()]
    federation = (site if site.is_dir() else site.parent).parent / "federation.json"
    if federation.is_file():
        return list(json.loads(federation.read_text())["modalities"])
    return load_manifest(site).modalities


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN metrics (e.g. AUROC of a single class) as null, so the file is strict JSON."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}


def run(args: argparse.Namespace) -> int:
    """Train ``--rounds`` rounds, evaluate after each, print and write the records."""
    if args.stage == "finetune" and args.task is None:
        print("error: --stage finetune needs --task", file=sys.stderr)
        return 2
    modalities = vocabulary(args.site, args.modalities)
    dataset, report = load_site(args.site, modalities, (args.size,) * 3)
    print(report.summary())
    if len(dataset) == 0:
        print(f"error: {report.summary()}", file=sys.stderr)
        return 2
    dp = DPConfig(
        enabled=not args.no_dp,
        target_epsilon=None if args.noise_multiplier is not None else args.epsilon,
        noise_multiplier=args.noise_multiplier,
        delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        accountant=args.accountant,
        budget_epsilon=args.epsilon,
        planned_rounds=args.rounds,
        secret_noise=not args.reproducible_noise,
    )
    torch.manual_seed(args.seed)
    model = PIRNet(PIRConfig(modalities, spatial_size=(args.size,) * 3))
    trainer = LocalTrainer(
        model, dataset, dp=dp, loss_cfg=LossConfig(), batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, state_dir=args.state_dir,
    )
    task = args.task if args.stage == "finetune" else None
    rounds: list[dict[str, Any]] = []
    status = 0
    for r in range(args.rounds):
        try:
            train = trainer.train_round(
                args.stage, epochs=args.epochs, task=task, progress=not args.no_progress, freeze_encoder=args.freeze_encoder
            )
        except BudgetExceededError as err:
            print(f"round {r}: {err}", file=sys.stderr)
            status = EXIT_BUDGET
            break
        record = _finite({"round": r, **train, **{f"eval_{k}": v for k, v in trainer.evaluate(dataset).items()}})
        rounds.append(record)
        eps = f" epsilon={record['epsilon']:.3f}" if "epsilon" in record else " (no DP)"
        print(f"round {r}: loss={record['loss_total']:.4f}{eps} steps={int(record['steps'])}")
    result = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")},
            "modalities": modalities,
            "dp": asdict(dp),
            "delta": trainer.delta,
            "validation": report.to_dict(),
        },
        "rounds": rounds,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return status
