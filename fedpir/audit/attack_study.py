"""The membership-inference study of `fedpir audit attack`: the attack over seeds and epsilons, as a table and JSON.

The default is an overfitting configuration that runs on a laptop CPU in a few minutes: one
synthetic site of 32 patients at 16^3 voxels, half of them members, 50 local epochs of lesion
classification with every parameter trained and no augmentation. Without DP the model memorizes
its members' labels (member loss near 0, non-member loss large); DP-SGD at epsilon 1 must keep the
attack near a coin toss. ``--site`` attacks a model trained on a real site folder instead.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedpir.audit.attack import AttackResult, attack_site
from fedpir.data.dataset import SiteDataset, load_site
from fedpir.data.layouts import site_vocabulary
from fedpir.data.manifest import MANIFEST_FILE
from fedpir.run_config import RunSettings
from fedpir.synthetic.federation import generate_federation

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


def _site(site: Path | None, patients: int, data_seed: int, size: int, scratch: Path) -> tuple[SiteDataset, list[str]]:
    """The attacked site's patients: ``site``, else one synthetic site of ``patients`` patients."""
    if site is None:
        if patients < 2:
            raise ValueError(f"--patients must be >= 2, got {patients}")
        print(f"synthesizing one site of {patients} patients at {size}^3 (seed {data_seed})", flush=True)
        federation = generate_federation(scratch, n_sites=1, subjects_per_site=patients, shape=(size,) * 3,
                                         seed=data_seed)
        site = next(p for p in sorted(federation.iterdir()) if (p / MANIFEST_FILE).is_file())
    modalities = site_vocabulary(site)
    dataset, report = load_site(site, modalities, (size,) * 3)
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


@dataclass(frozen=True)
class AttackStudy:
    """What `fedpir audit attack` trains and attacks (the command's flags of the same names hold the defaults)."""

    out: Path
    epsilons: str
    seeds: int
    site: Path | None
    patients: int
    data_seed: int
    size: int
    task: str
    epochs: int
    batch_size: int
    lr: float
    trainable: str
    max_grad_norm: float
    device: str
    progress: bool


def run_study(study: AttackStudy) -> int:
    """Train and attack one model per (seed, epsilon); print the table and write ``study.out``."""
    epsilons = parse_epsilons(study.epsilons)
    if study.seeds < 1 or study.epochs < 1:
        raise ValueError(f"--seeds and --epochs must be >= 1, got {study.seeds} and {study.epochs}")
    if study.out.exists() and study.out.is_dir():
        raise ValueError(f"--out {study.out} is a folder; give a file name, e.g. {study.out / 'attack.json'}")
    with tempfile.TemporaryDirectory(prefix="fedpir-attack-") as scratch:
        dataset, modalities = _site(study.site, study.patients, study.data_seed, study.size, Path(scratch))
        base = RunSettings(volume_size=study.size, modalities=",".join(modalities), finetune_task=study.task,
                           finetune_trainable=study.trainable, batch_size=study.batch_size, lr=study.lr,
                           max_grad_norm=study.max_grad_norm, augment_views=0, secret_noise=False,
                           device=study.device)
        results: list[AttackResult] = []
        for seed in range(study.seeds):
            for target in epsilons:
                label = "no DP" if target is None else f"epsilon {target:g}"
                print(f"seed {seed}, {label}: training on half of the patients for {study.epochs} epochs", flush=True)
                result = attack_site(dataset, replace(base, seed=seed), epsilon=target, epochs=study.epochs,
                                     progress=study.progress)
                results.append(result)
                print(f"seed {seed}, {label}: epsilon spent {result.epsilon_label}, AUROC {result.auroc:.3f} "
                      f"({result.train_seconds:.0f} s)", flush=True)
    summary = summarize(results)
    print("\n".join(table(summary)))
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(study).items()}
    document = {"attack": ATTACK_NAME, "score": "-loss per patient", "config": config,
                "summary": summary, "runs": [r.to_json() for r in results]}
    study.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = study.out.with_name(study.out.name + ".part")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(study.out)
    print(f"wrote {study.out}")
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
