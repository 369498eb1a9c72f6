"""`fedpir audit attack`: the membership-inference attack over seeds and epsilons, as a table and JSON.

The default is an overfitting configuration that runs on a laptop CPU in a few minutes: one
synthetic site of 32 patients at 16^3 voxels, half of them members, 50 local epochs of lesion
classification with every parameter trained and no augmentation. Without DP the model memorizes
its members' labels (member loss near 0, non-member loss large); DP-SGD at epsilon 1 must keep the
attack near a coin toss. ``--site`` attacks a model trained on a real site folder instead.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpir.run_config import RunSettings

if TYPE_CHECKING:  # torch and MONAI load when the command runs, not when the CLI parses
    from fedpir.data.dataset import SiteDataset
    from fedpir.privacy.attack import AttackResult

ATTACK_NAME = "loss-threshold"


def parse_epsilons(spec: str) -> list[float | None]:
    """``"inf,1"`` as [None, 1.0] (inf or none: no DP)."""
    values: list[float | None] = []
    for part in (p.strip().lower() for p in spec.split(",") if p.strip()):
        if part in ("inf", "none"):
            values.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--epsilons: {part!r} is not a number or inf; e.g. --epsilons inf,8,1") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--epsilons: {part!r} must be > 0 (or inf for no DP)")
        values.append(value)
    if not values:
        raise ValueError("--epsilons is empty; e.g. --epsilons inf,1")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fedpir audit attack`."""
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="JSON file of the results")
    parser.add_argument("--epsilons", default="inf,1", help="comma-separated target epsilons, inf = no DP (default inf,1)")
    parser.add_argument("--seeds", type=int, default=3, help="repetitions: member split, initialisation, sampling (default 3)")
    parser.add_argument("--site", type=Path, help="a site folder to attack (default: a synthetic site)")
    parser.add_argument("--patients", type=int, default=32, help="synthetic site's patients, half members (default 32)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic site (default 0)")
    parser.add_argument("--size", type=int, default=16, help="volume edge in voxels (default 16)")
    parser.add_argument("--task", default="classification", choices=("classification", "segmentation"),
                        help="the objective whose per-patient loss is attacked (default classification)")
    parser.add_argument("--epochs", type=int, default=50, help="local epochs of the one training round (default 50)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--trainable", default="all", help="trained parameter groups (default all)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="DP clipping bound (default 1.0)")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _site(args: argparse.Namespace, scratch: Path) -> tuple[SiteDataset, list[str]]:
    from fedpir.client.train_cli import vocabulary
    from fedpir.data.dataset import load_site
    from fedpir.synthetic.federation import generate_federation

    site = args.site
    if site is None:
        if args.patients < 2:
            raise ValueError(f"--patients must be >= 2, got {args.patients}")
        print(f"synthesizing one site of {args.patients} patients at {args.size}^3 (seed {args.data_seed})", flush=True)
        federation = generate_federation(scratch, n_sites=1, subjects_per_site=args.patients,
                                         shape=(args.size,) * 3, seed=args.data_seed)
        site = next(p for p in sorted(federation.iterdir()) if (p / "manifest.json").is_file())
    modalities = vocabulary(site, None)
    dataset, report = load_site(site, modalities, (args.size,) * 3)
    if len(dataset) < 2:
        raise ValueError(f"site {site} has fewer than 2 usable patients ({report.summary()})")
    return dataset, modalities


def summarize(results: list[AttackResult]) -> list[dict[str, Any]]:
    """Per target epsilon (in first-seen order): AUROC mean, sd, min, max over seeds and the epsilon spent."""
    rows = []
    for target in dict.fromkeys(r.target_epsilon for r in results):
        runs = [r for r in results if r.target_epsilon == target]
        aurocs = np.array([r.auroc for r in runs])
        spent = [r.epsilon for r in runs if r.epsilon is not None]
        rows.append({"target_epsilon": target, "epsilon": max(spent) if spent else None, "seeds": len(runs),
                     "auroc_mean": float(aurocs.mean()), "auroc_sd": float(aurocs.std(ddof=1)) if len(runs) > 1 else 0.0,
                     "auroc_min": float(aurocs.min()), "auroc_max": float(aurocs.max()),
                     "member_loss_mean": float(np.mean([np.mean(r.member_losses) for r in runs])),
                     "nonmember_loss_mean": float(np.mean([np.mean(r.nonmember_losses) for r in runs]))})
    return rows


def table(summary: list[dict[str, Any]]) -> list[str]:
    """The summary as aligned text lines: epsilon next to the attack's AUROC."""
    lines = [f"{'epsilon':>8}  {'AUROC mean':>10}  {'sd':>5}  {'min':>5}  {'max':>5}  {'seeds':>5}  "
             f"{'member loss':>11}  {'non-member loss':>15}"]
    for row in summary:
        eps = "inf" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        lines.append(f"{eps:>8}  {row['auroc_mean']:>10.3f}  {row['auroc_sd']:>5.3f}  {row['auroc_min']:>5.3f}  "
                     f"{row['auroc_max']:>5.3f}  {row['seeds']:>5d}  {row['member_loss_mean']:>11.4f}  "
                     f"{row['nonmember_loss_mean']:>15.4f}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Train and attack one model per (seed, epsilon); print the table and write ``--out``."""
    from fedpir.privacy.attack import attack_site

    epsilons = parse_epsilons(args.epsilons)
    if args.seeds < 1 or args.epochs < 1:
        raise ValueError(f"--seeds and --epochs must be >= 1, got {args.seeds} and {args.epochs}")
    if args.out.exists() and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name, e.g. {args.out / 'attack.json'}")
    with tempfile.TemporaryDirectory(prefix="fedpir-attack-") as scratch:
        dataset, modalities = _site(args, Path(scratch))
        base = RunSettings(volume_size=args.size, modalities=",".join(modalities), finetune_task=args.task,
                           finetune_trainable=args.trainable, batch_size=args.batch_size, lr=args.lr,
                           max_grad_norm=args.max_grad_norm, augment_views=0, secret_noise=False,
                           device=args.device)
        results: list[AttackResult] = []
        for seed in range(args.seeds):
            for target in epsilons:
                label = "no DP" if target is None else f"epsilon {target:g}"
                print(f"seed {seed}, {label}: training on half of the patients for {args.epochs} epochs", flush=True)
                result = attack_site(dataset, replace(base, seed=seed), epsilon=target, epochs=args.epochs,
                                     progress=not args.no_progress)
                results.append(result)
                print(f"seed {seed}, {label}: epsilon spent {result.epsilon_label}, AUROC {result.auroc:.3f} "
                      f"({result.train_seconds:.0f} s)", flush=True)
    summary = summarize(results)
    print("\n".join(table(summary)))
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")}
    document = {"attack": ATTACK_NAME, "score": "-loss per patient", "config": config,
                "summary": summary, "runs": [r.to_json() for r in results]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".part")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


def load_results(path: Path) -> dict[str, Any]:
    """An attack result file written by :func:`run` (ValueError if it is not one)."""
    if not path.is_file():
        raise OSError(f"attack result {path} is not a file")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"attack result {path} is not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(document, dict) or not isinstance(document.get("summary"), list):
        raise ValueError(f"attack result {path} has no 'summary' list; write it with `fedpir audit attack --out`")
    return document
