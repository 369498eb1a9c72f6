"""Zero-shot classification through a federated latent alignment, on the synthetic federation.

Per seed: write a synthetic federation (``--sites`` x ``--subjects``, ``--size``^3 voxels) whose
reports state the lesion finding and the brain volume (``report_brain_volume=True``);
``--held-out`` subjects of each site, drawn at random with the site's share of lesion-bearing
patients (stratified), are the test patients, the rest the training patients.
The image encoder (``--encoder``) is either a PIRNet pretrained here (``pretrain``: self-supervised,
no labels, no DP, on the training patients pooled for ``--pretrain-epochs``), or the public warm
start (``warm-start``: ``fedpir.simulation.warm_starts.cached_warm_start`` for the grid and the
generator's full modality vocabulary, built once on the public synthetic corpus with PIR
pretraining and a segmentation head trained on the corpus' own lesion masks; no site data, no site
label; ``--warm-start FILE`` names another file). Each site then computes the sufficient statistics
of its anchors (each training patient's embedding by ``--poolings``, ``fedpir.alignment.anchors.POOLINGS``:
pooled X_h, or the warm start's lesion map as "lesion", paired with the text embedding of its report;
``fedpir.alignment.anchors.site_alignment_statistics``); their sum gives T in closed form
(``fedpir.alignment.maps``), checked against the fit on the pooled anchors. On the test
patients, two binary tasks (``TASKS``) are predicted: ``lesion`` (present/absent; a small focal
finding) and ``volume`` (brain volume reduced/normal; a global one), each

- zero-shot: argmax over class prompts of cos(T(z), t_c) (``fedpir.alignment.zeroshot``), for the
  Procrustes, least-squares and ridge maps;
- naive: the same with the identity map (standardized image and text coordinates paired up as
  they are, no alignment);
- probe: a supervised logistic regression on the same embeddings with the training labels.

Every text encoder available is run on the same embeddings: all-MiniLM-L6-v2 when the extra
``fedpir[text]`` is installed, and always the hashed n-gram fallback. The ``pretrain`` encoder is
also measured at its random initialisation (``encoder: "random"``), before pretraining. A control
replaces the encoder by hand-made image features (``encoder: "intensity"``, ``pooling:
"percentiles"``: per modality, the 50/90/95/99/99.9th percentiles of the normalized volume, zero for
a missing modality): whether the image carries a finding that the pooled X_h does not.

Writes JSON (with the command) and a PNG beside it. The setting of docs/results/zero_shot.json:

    python benchmarks/experiments/zero_shot.py --seeds 0,1,2 --out docs/results/zero_shot.json

(7.5 minutes on one CPU thread of a shared machine; results in docs/alignment.md), and of
docs/results/zero_shot_warm_start.json:

    python benchmarks/experiments/zero_shot.py --seeds 0,1,2 --encoder warm-start --poolings mean,max,lesion \
        --out docs/results/zero_shot_warm_start.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from fedpir.alignment.anchors import embed_dataset, site_alignment_statistics, site_anchors
from fedpir.alignment.maps import AlignmentStatistics, fit_alignment
from fedpir.alignment.text import load_text_encoder, minilm_available
from fedpir.alignment.zeroshot import LESION_PROMPTS, VOLUME_PROMPTS, class_embeddings, compare
from fedpir.data.dataset import load_site
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.models.warm_start import file_sha256
from fedpir.privacy.dp import DPConfig
from fedpir.run_config import RunSettings
from fedpir.simulation.warm_starts import cached_warm_start
from fedpir.synthetic.federation import generate_federation
from fedpir.synthetic.report_text import reported_volume_reduced
from fedpir.training.model import build_model
from fedpir.training.trainer import LocalTrainer

MAPS = ("procrustes", "lstsq", "ridge", "naive")
#: Zero-shot tasks: class prompts, and the ground truth of a subject record (generator's truth).
TASKS: dict[str, tuple[dict[str, tuple[str, ...]], Any]] = {
    "lesion": (LESION_PROMPTS, lambda rec: int(rec.label)),
    "volume": (VOLUME_PROMPTS, lambda rec: int(bool(reported_volume_reduced(rec.report or "")))),
}
METRICS = ("accuracy", "balanced_accuracy", "auroc")


def task_labels(subset: Subset, task: str) -> np.ndarray:
    """Ground truth of ``task`` for the subjects of a Subset of a SiteDataset."""
    records = subset.dataset.records  # type: ignore[attr-defined]
    return np.array([TASKS[task][1](records[i]) for i in subset.indices], dtype=int)


def split_site(labels: list[int | None], held_out: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Stratified random split of a site: ``held_out`` test subjects with the site's share of each label."""
    by_label: dict[int | None, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    groups = [idx for _, idx in sorted(by_label.items(), key=lambda kv: str(kv[0]))]
    test: list[int] = []
    for j, idx in enumerate(groups):
        take = held_out - len(test) if j == len(groups) - 1 else round(held_out * len(idx) / len(labels))
        test.extend(rng.choice(idx, size=min(max(take, 0), len(idx)), replace=False).tolist())
    test = sorted(test)
    return [i for i in range(len(labels)) if i not in set(test)], test


def federation_splits(seed: int, args: argparse.Namespace, workdir: Path,
                      vocab: list[str] | None = None) -> tuple[list[str], list[Subset], list[Subset]]:
    """The seed's synthetic federation (reports state the brain volume), its modality vocabulary
    (``vocab``, default the federation's own) and, per site, its training and held-out patients
    (stratified by lesion)."""
    fed = generate_federation(workdir / f"fed-{seed}", n_sites=args.sites, subjects_per_site=args.subjects,
                              shape=(args.size,) * 3, seed=seed, report_brain_volume=True)
    vocab = vocab or json.loads((fed / "federation.json").read_text())["modalities"]
    trains, tests = [], []
    for k, site_dir in enumerate(sorted(p for p in fed.iterdir() if p.is_dir())):
        ds, _ = load_site(site_dir, vocab, (args.size,) * 3)
        train_idx, test_idx = split_site([r.label for r in ds.records], args.held_out, np.random.default_rng([seed, k, 7]))
        trains.append(Subset(ds, train_idx))
        tests.append(Subset(ds, test_idx))
    return vocab, trains, tests


def split_record(train: Subset, test: Subset) -> dict[str, Any]:
    """What the split of one site held out: its test subjects, and each side's patients and lesion-bearing ones."""
    records = test.dataset.records  # type: ignore[attr-defined]
    return {"test_subjects": [records[i].subject_id for i in test.indices],
            "patients": {"train": len(train), "test": len(test)},
            "lesion": {"train": int(task_labels(train, "lesion").sum()), "test": int(task_labels(test, "lesion").sum())}}


#: Percentiles of each modality's normalized intensities in the ``intensity`` control.
INTENSITY_PERCENTILES = (50, 90, 95, 99, 99.9)


def intensity_features(dataset: Dataset) -> np.ndarray:
    """[n, modalities x percentiles]: :data:`INTENSITY_PERCENTILES` of each present modality (0 if absent)."""
    rows = []
    for i in range(len(dataset)):
        item = dataset[i]
        image, present = item["image"].numpy(), item["present"].numpy().astype(bool)
        rows.append(np.concatenate([np.percentile(image[c], INTENSITY_PERCENTILES) if present[c]
                                    else np.zeros(len(INTENSITY_PERCENTILES)) for c in range(len(present))]))
    return np.asarray(rows, dtype=np.float64)


def site_reports_in_order(dataset: Subset) -> list[str]:
    """The report of each subject of a Subset of a SiteDataset, in the Subset's order."""
    records = dataset.dataset.records  # type: ignore[attr-defined]
    return [records[i].report or "" for i in dataset.indices]


def compare_maps(federated: AlignmentStatistics, pooled: AlignmentStatistics, args: argparse.Namespace, text_encoder: Any,
                 train_z: np.ndarray, test_z: np.ndarray, train_y: dict[str, np.ndarray], test_y: dict[str, np.ndarray],
                 seed: int, **labels: str) -> list[dict[str, Any]]:
    """Each map of :data:`MAPS` fitted on the federated statistics (and its gap to the pooled fit),
    then every task compared with the probe: one result per task, tagged with ``labels``."""
    maps, gap = {}, {}
    for name in MAPS:
        method = "identity" if name == "naive" else name
        maps[name] = fit_alignment(federated, method, alpha=args.ridge_alpha)
        reference = fit_alignment(pooled, method, alpha=args.ridge_alpha)
        # largest difference between the federated and pooled maps, relative to the largest entry
        gap[name] = float(np.abs(maps[name].matrix - reference.matrix).max() / np.abs(reference.matrix).max())
    results = []
    for task, (prompts, _) in TASKS.items():
        classes = class_embeddings(text_encoder, prompts)
        metrics = compare(maps, classes, train_z, train_y[task], test_z, test_y[task], seed=seed)
        results.append({"task": task, **labels, "text_encoder": text_encoder.name, "federated_vs_pooled_max_rel_diff": gap,
                        "metrics": metrics})
    return results


def warm_start_model(seed: int, args: argparse.Namespace) -> tuple[PIRNet, str]:
    """The public warm start for ``--size`` and the default modality vocabulary (``--warm-start``, or
    the cached one, built if absent), and its SHA-256."""
    grid = RunSettings(seed=seed, volume_size=args.size)
    path, sha = ((str(args.warm_start), file_sha256(args.warm_start)) if args.warm_start
                 else cached_warm_start(grid, invariance_weight=1.0))
    return build_model(RunSettings(seed=seed, volume_size=args.size, warm_start=path, warm_start_sha256=sha)), sha


def run_seed(seed: int, args: argparse.Namespace, encoders: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Everything of one seed: federation, image encoder (pretraining or warm start), federated
    alignment, evaluation."""
    start = time.perf_counter()
    warm, warm_sha = warm_start_model(seed, args) if args.encoder == "warm-start" else (None, None)
    vocab, trains, tests = federation_splits(seed, args, workdir, list(warm.cfg.modalities) if warm else None)
    test_all, train_all = ConcatDataset(tests), ConcatDataset(trains)
    train_y = {t: np.concatenate([task_labels(s, t) for s in trains]) for t in TASKS}
    test_y = {t: np.concatenate([task_labels(s, t) for s in tests]) for t in TASKS}
    synth_s = time.perf_counter() - start

    torch.manual_seed(seed)
    model = warm or PIRNet(PIRConfig(vocab, spatial_size=(args.size,) * 3))
    out: dict[str, Any] = {"seed": seed, "n_train": len(train_y["lesion"]), "n_test": len(test_y["lesion"]),
                           "test_positive": {t: int(y.sum()) for t, y in test_y.items()},
                           "train_positive": {t: int(y.sum()) for t, y in train_y.items()},
                           "sites": [split_record(tr, te) for tr, te in zip(trains, tests, strict=True)], "results": []}
    if warm_sha:
        out["warm_start_sha256"] = warm_sha
    stages = [("warm-start", 0)] if warm else [("random", 0), ("pretrained", args.pretrain_epochs)]
    for encoder_state, epochs in stages:
        if epochs:
            t0 = time.perf_counter()
            trainer = LocalTrainer(model, train_all, dp=DPConfig(enabled=False), batch_size=args.batch_size,
                                   lr=args.lr, seed=seed)
            losses = trainer.train_round("pretrain", epochs, progress=False)
            out["pretrain_seconds"] = time.perf_counter() - t0
            out["pretrain_loss_total"] = losses["loss_total"]
        for pooling in args.poolings.split(","):
            train_z, _ = embed_dataset(model, train_all, pooling=pooling)
            test_z, _ = embed_dataset(model, test_all, pooling=pooling)
            for text_name, encoder in encoders.items():
                per_site = [site_alignment_statistics(model, s, encoder, pooling=pooling) for s in trains]
                federated = sum(per_site, AlignmentStatistics.zeros(*per_site[0].dims))
                pooled_z, pooled_t = zip(*[site_anchors(model, s, encoder, pooling=pooling)[:2] for s in trains], strict=True)
                pooled = AlignmentStatistics.from_pairs(np.concatenate(pooled_z), np.concatenate(pooled_t))
                out["results"] += compare_maps(federated, pooled, args, encoder, train_z, test_z, train_y, test_y, seed,
                                               encoder=encoder_state, pooling=pooling, text=text_name)
    site_z = [intensity_features(s) for s in trains]
    train_z, test_z = np.concatenate(site_z), intensity_features(test_all)
    for text_name, encoder in encoders.items():
        site_t = [encoder.encode(site_reports_in_order(s)) for s in trains]
        per_site = [AlignmentStatistics.from_pairs(z, t) for z, t in zip(site_z, site_t, strict=True)]
        federated = sum(per_site, AlignmentStatistics.zeros(*per_site[0].dims))
        pooled = AlignmentStatistics.from_pairs(train_z, np.concatenate(site_t))
        out["results"] += compare_maps(federated, pooled, args, encoder, train_z, test_z, train_y, test_y, seed,
                                       encoder="intensity", pooling="percentiles", text=text_name)
    out["seconds"] = time.perf_counter() - start
    out["synth_seconds"] = synth_s
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of each metric, per (task, encoder state, pooling, text encoder, method), and the
    zero-shot / probe accuracy ratio."""
    rows = []
    keys = sorted({(r["task"], r["encoder"], r["pooling"], r["text"]) for run in runs for r in run["results"]})
    for key in keys:
        per_seed = [r["metrics"] for run in runs for r in run["results"]
                    if (r["task"], r["encoder"], r["pooling"], r["text"]) == key]
        for method in (*MAPS, "probe"):
            row: dict[str, Any] = dict(zip(("task", "encoder", "pooling", "text"), key, strict=True)) | {"method": method}
            for metric in METRICS:
                values = [m[method][metric] for m in per_seed]
                finite = [v for v in values if np.isfinite(v)]  # AUROC is NaN when a test set holds one class
                row[metric] = {"mean": float(np.mean(finite)) if finite else float("nan"),
                               "std": float(np.std(finite)) if finite else float("nan"), "per_seed": values}
            if method != "probe":
                ratios = [m[method]["accuracy"] / m["probe"]["accuracy"] for m in per_seed]
                row["accuracy_over_probe"] = {"mean": float(np.mean(ratios)), "per_seed": ratios}
            rows.append(row)
    return rows


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Bars: mean balanced accuracy and AUROC per method of the pretrained image encoder and of the
    intensity control, one row per task and one panel per (image features, text encoder); dots per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in summary})
    panels = sorted({(r["encoder"], r["pooling"], r["text"]) for r in summary if r["encoder"] != "random"})
    fig, axes = plt.subplots(len(tasks), len(panels), figsize=(3.6 * len(panels), 3.4 * len(tasks)), squeeze=False,
                             sharey=True)
    methods = [*MAPS, "probe"]
    for i, task in enumerate(tasks):
        for ax, (encoder, pooling, text) in zip(axes[i], panels, strict=True):
            rows = {r["method"]: r for r in summary
                    if (r["task"], r["encoder"], r["pooling"], r["text"]) == (task, encoder, pooling, text)}
            x = np.arange(len(methods))
            for offset, metric, color in ((-0.2, "balanced_accuracy", "tab:blue"), (0.2, "auroc", "tab:orange")):
                ax.bar(x + offset, [rows[m][metric]["mean"] for m in methods], 0.38, color=color, label=metric)
                for j, m in enumerate(methods):
                    ax.plot([x[j] + offset] * len(rows[m][metric]["per_seed"]), rows[m][metric]["per_seed"], "k.", ms=3)
            ax.axhline(0.5, color="grey", lw=0.6, ls="--")
            ax.set_xticks(x, methods, rotation=30)
            source = "intensity percentiles (control)" if encoder == "intensity" else f"{encoder} {pooling}"
            ax.set_title(f"{task}: {source}, text {text}", fontsize=9)
            ax.set_ylim(0, 1.05)
        axes[i][0].set_ylabel(f"{task} (held-out patients)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Zero-shot through the federated map T vs naive stitching vs linear probe (PIR encoder; "
                 "intensity control)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma list; each seeds federation, model and pretraining")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=24, help="subjects per site")
    parser.add_argument("--held-out", type=int, default=6, help="test subjects per site (drawn at random, stratified by lesion)")
    parser.add_argument("--size", type=int, default=24, help="volume edge in voxels")
    parser.add_argument("--encoder", choices=("pretrain", "warm-start"), default="pretrain",
                        help="pretrain a PIRNet here (self-supervised), or embed with the public warm start")
    parser.add_argument("--warm-start", type=Path, default=None,
                        help="with --encoder warm-start: this warm-start file instead of the cached public one")
    parser.add_argument("--pretrain-epochs", type=int, default=4, help="with --encoder pretrain")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--poolings", default="mean,max",
                        help="comma list of embeddings (fedpir.alignment.anchors.POOLINGS; lesion needs a trained "
                             "segmentation head: --encoder warm-start)")
    parser.add_argument("--ridge-alpha", type=float, default=1.0, help="ridge strength per anchor")
    parser.add_argument("--text", choices=("all", "minilm", "hashed"), default="all",
                        help="text encoders: all available (MiniLM if installed, and the hashed fallback), or one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (a PNG is written beside it)")
    args = parser.parse_args(argv)
    if args.warm_start and not args.warm_start.is_file():
        parser.error(f"--warm-start {args.warm_start} is not a file; build one with `fedpir pretrain-public`")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    encoders: dict[str, Any] = {}
    if args.text in ("all", "minilm") and (minilm_available() or args.text == "minilm"):
        encoders["minilm"] = load_text_encoder("minilm")
    if args.text in ("all", "hashed"):
        encoders["hashed"] = load_text_encoder("hashed")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            runs.append(run_seed(seed, args, encoders, Path(tmp)))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "results"}), file=sys.stderr, flush=True)
    summary = summarize(runs)
    doc = {"command": "python benchmarks/experiments/zero_shot.py " + shlex.join(sys.argv[1:] if argv is None else argv),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "prompts": {t: {k: list(v) for k, v in prompts.items()} for t, (prompts, _) in TASKS.items()},
           "text_encoders": {k: e.name for k, e in encoders.items()},
           "torch": torch.__version__, "summary": summary, "runs": runs}
    text = json.dumps(doc, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        plot(summary, args.out.with_suffix(".png"))
    else:
        print(text)
    for row in summary:
        label = f"{row['task']:>6} {row['encoder']:>10} {row['pooling']:>7} {row['text']:>7} {row['method']:>10}"
        print(f"{label}  acc {row['accuracy']['mean']:.3f}"
              f"±{row['accuracy']['std']:.3f}  bal {row['balanced_accuracy']['mean']:.3f}  auroc {row['auroc']['mean']:.3f}"
              f"±{row['auroc']['std']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (ValueError, OSError) as err:  # e.g. a --warm-start file that is missing or does not fit
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
