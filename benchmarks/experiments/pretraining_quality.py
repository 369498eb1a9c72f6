"""Does PIR pretraining learn what it claims? Three measured claims on the synthetic federation.

(a) Pretraining lowers every loss term (rotation, contrastive, reconstruction, invariance):
    first vs last round of ``LocalTrainer.train_round`` (one round = one local epoch).
(b) The invariance objective makes X_h of two modalities of one patient closer than X_h of two
    different patients: on held-out patients, for every modality pair (a, b), the mean distance
    between X_h(x_a^i) and X_h(x_b^i) (same patient, "intra") over the mean distance between
    X_h(x_a^i) and X_h(x_b^j), i != j ("inter"); ratio < 1 means patient identity survives a change
    of modality. Also cross-modal retrieval top-1 (is patient i's nearest b-embedding its own?).
    Measured on pooled X_h (``fedpir.models.evaluation.embed``) and on the full X_h map, before and
    after pretraining.
(c) A pretrained encoder fine-tunes to a better lesion Dice than the same initialisation trained
    from scratch, with the same small label budget, on held-out patients: with the encoder frozen
    (the segmentation head alone learns; this measures the representation) and trainable ("full").

Protocol: the federation is written to a temporary folder; the last ``--held-out`` subjects of each
site are the test patients, the rest (all sites pooled, no labels) are the pretraining set.
Pretrained and scratch models start from the same weights (``--seed``, which also seeds the
federation and pretraining). Each of ``--finetune-seeds`` draws ``--labelled`` lesion-bearing
training patients and a data order, shared by both arms, which fine-tune for the same epochs; Dice
is measured every ``--eval-every`` epochs and summarised over seeds as the paired difference
(pretrained - scratch). Fine-tuning is never private (it compares representations); ``--dp`` makes
pretraining patient-level DP-SGD at ``--epsilon`` (planned over all its rounds).

The setting of docs/results/pretraining_quality.json (30-40 min on one CPU thread; the slow test
runs the command that file records; variants with both fine-tuning modes, lr 0.01 and DP pretraining are in
docs/results/pretraining_quality_variants/, each JSON with its command):

    python benchmarks/experiments/pretraining_quality.py --size 32 --pretrain-epochs 20 --finetune-epochs 150 \
        --finetune-lr 0.001 --finetune-seeds 0,1,2,3,4,5 --finetune-modes full \
        --out docs/results/pretraining_quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from fedpir.data.dataset import load_site
from fedpir.models.evaluation import embed
from fedpir.models.evaluation import evaluate as evaluate_model
from fedpir.models.groups import trainable_groups
from fedpir.models.losses import ALICE_TERMS, CORE_TERMS, LossConfig
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.privacy.dp import DPConfig, collate_patients
from fedpir.synthetic.federation import generate_federation
from fedpir.training.trainer import LocalTrainer

#: How the encoder is fine-tuned, with the plot's panel title of each mode.
FINETUNE_MODES: dict[str, str] = {"frozen": "encoder frozen (head only)", "full": "encoder fine-tuned too"}


@dataclass
class Settings:
    """One run of the benchmark (the command-line flags)."""

    size: int = 32
    sites: int = 4
    subjects: int = 12
    held_out: int = 3
    pretrain_epochs: int = 10
    finetune_epochs: int = 30
    labelled: int = 8
    seed: int = 0
    dp: bool = False
    epsilon: float = 8.0
    batch_size: int = 4
    lr: float = 1e-3
    finetune_lr: float = 1e-3
    channels: tuple[int, ...] = (8, 16, 32, 64)
    finetune_modes: tuple[str, ...] = tuple(FINETUNE_MODES)
    finetune_seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 25
    mim: bool = False
    anatomical: bool = False

    def __post_init__(self) -> None:
        if self.held_out < 2 or self.subjects <= self.held_out:
            raise ValueError(f"need 2 <= held_out < subjects, got held_out={self.held_out}, subjects={self.subjects}")
        if min(self.pretrain_epochs, self.finetune_epochs, self.labelled, self.sites, self.eval_every) < 1:
            raise ValueError("sites, pretrain/finetune epochs, labelled and eval_every must be >= 1")
        if not self.finetune_seeds:
            raise ValueError("need at least one fine-tuning seed")
        if not self.finetune_modes or set(self.finetune_modes) - set(FINETUNE_MODES):
            raise ValueError(f"finetune_modes must be a non-empty subset of {tuple(FINETUNE_MODES)}, got {self.finetune_modes}")


def make_model(vocab: Sequence[str], size: int, channels: Sequence[int], seed: int) -> PIRNet:
    """A PIRNet whose initial weights are a function of ``seed`` only."""
    torch.manual_seed(seed)
    return PIRNet(PIRConfig(list(vocab), spatial_size=(size,) * 3, channels=tuple(channels), proj_dim=16))


def split_federation(fed_dir: Path, size: int, held_out: int) -> tuple[list[str], Dataset, Dataset]:
    """(vocabulary, training patients of all sites pooled, the last ``held_out`` patients of each site)."""
    meta = json.loads((fed_dir / "federation.json").read_text())
    vocab = list(meta["modalities"])
    train: list[Dataset] = []
    test: list[Dataset] = []
    for site in meta["sites"]:
        dataset, report = load_site(fed_dir / site["name"], vocab, (size,) * 3)
        if report.bad:
            raise RuntimeError(f"synthetic site {site['name']} has bad subjects: {report.bad}")
        n = len(dataset)
        train.append(Subset(dataset, range(n - held_out)))
        test.append(Subset(dataset, range(n - held_out, n)))
    return vocab, ConcatDataset(train), ConcatDataset(test)


def pretrain(
    model: PIRNet, dataset: Dataset, epochs: int, settings: Settings, state_dir: Path | None = None, log: bool = False
) -> list[dict[str, float]]:
    """``epochs`` rounds of one local epoch each; returns every round's trainer metrics (``log``:
    one line per round on stderr)."""
    dp = (
        DPConfig(target_epsilon=settings.epsilon, budget_epsilon=settings.epsilon, planned_rounds=epochs, secret_noise=False)
        if settings.dp
        else DPConfig(enabled=False)
    )
    trainer = LocalTrainer(
        model, dataset, dp=dp, batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed, state_dir=state_dir,
        loss_cfg=LossConfig(mim=settings.mim, anatomical=settings.anatomical),
    )
    rounds = []
    for r in range(epochs):
        rounds.append(trainer.train_round("pretrain", 1, progress=False))
        if log:
            terms = " ".join(f"{t}={rounds[-1][f'loss_{t}']:.3f}" for t in (*CORE_TERMS, *ALICE_TERMS)
                             if f"loss_{t}" in rounds[-1])
            print(f"pretrain round {r + 1}/{epochs}: {terms} ({rounds[-1]['seconds']:.0f} s)", file=sys.stderr)
    return rounds


def loss_drops(rounds: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """First and last round mean of each pretraining loss term, and last/first."""
    out = {}
    for term in CORE_TERMS:
        first, last = rounds[0][f"loss_{term}"], rounds[-1][f"loss_{term}"]
        out[term] = {"first": first, "last": last, "last_over_first": last / first}
    return out


def held_out_losses(model: PIRNet, dataset: Dataset, seed: int = 0) -> dict[str, float]:
    """Pretraining loss terms on ``dataset`` with fixed augmentation seeds (model unchanged), and
    the cross-modal synthesis PSNR/SSIM of :func:`fedpir.models.evaluation.evaluate`."""
    trainer = LocalTrainer(model, dataset, dp=DPConfig(enabled=False), seed=seed)
    metrics = trainer.evaluate(dataset, "pretrain")
    out = {term: metrics[f"loss_{term}"] for term in CORE_TERMS}
    return out | {"psnr": metrics["psnr"], "ssim": metrics["ssim"]}


@torch.no_grad()
def modality_embeddings(model: PIRNet, dataset: Dataset, pooled: bool) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """X_h of every patient under every vocabulary modality ({m: [N, F]}; rows of patients lacking
    m are meaningless) and the presence matrix [N, M]. ``pooled``: globally pooled X_h via
    :func:`embed`, else the flattened full X_h map."""
    was_training = model.training
    model.eval()
    rows: dict[int, list[torch.Tensor]] = {m: [] for m in range(len(model.cfg.modalities))}
    present = []
    try:
        for batch in DataLoader(dataset, batch_size=8, collate_fn=collate_patients):
            present.append(batch["present"])
            for m in rows:
                if pooled:
                    rows[m].append(embed(model, batch, m))
                else:
                    rows[m].append(model.encode(batch["image"][:, m : m + 1], m).flatten(1))
    finally:
        model.train(was_training)
    return {m: torch.cat(r) for m, r in rows.items()}, torch.cat(present)


def invariance_gap(model: PIRNet, dataset: Dataset, pooled: bool = True) -> dict[str, float]:
    """Intra-patient cross-modality vs inter-patient distance of X_h (see the module doc).

    Over every modality pair (a, b), a != b, and the patients holding both: ``intra`` = mean
    ||e_a(i) - e_b(i)||, ``inter`` = mean ||e_a(i) - e_b(j)|| over i != j, ``ratio`` = intra/inter
    (pair means weighted by their number of distances), ``retrieval_top1`` = share of (i, a, b)
    whose nearest e_b is patient i's own.
    """
    emb, present = modality_embeddings(model, dataset, pooled)
    intra_sum = inter_sum = hits = 0.0
    intra_n = inter_n = queries = 0
    n_mod = present.shape[1]
    for a in range(n_mod):
        for b in range(n_mod):
            both = present[:, a] & present[:, b]
            k = int(both.sum())
            if a == b or k < 2:
                continue
            dist = torch.cdist(emb[a][both].double(), emb[b][both].double())
            diag = dist.diagonal()
            intra_sum += float(diag.sum())
            inter_sum += float(dist.sum() - diag.sum())
            intra_n, inter_n = intra_n + k, inter_n + k * (k - 1)
            hits += float((dist.argmin(1) == torch.arange(k)).sum())
            queries += k
    if not intra_n:
        raise ValueError("no two patients share two modalities: the invariance gap is undefined")
    intra, inter = intra_sum / intra_n, inter_sum / inter_n
    return {"intra": intra, "inter": inter, "ratio": intra / inter, "retrieval_top1": hits / queries, "pairs": float(intra_n)}


def labelled_subset(dataset: Dataset, count: int, seed: int) -> Subset:
    """``count`` lesion-bearing patients of ``dataset``, drawn with ``seed``."""
    lesion = [i for i in range(len(dataset)) if int(dataset[i]["label"]) == 1]  # type: ignore[arg-type]
    if len(lesion) < count:
        raise ValueError(f"only {len(lesion)} training patients have a lesion; asked for {count} labelled")
    picked = np.random.default_rng([seed, 7]).choice(lesion, size=count, replace=False)
    return Subset(dataset, sorted(int(i) for i in picked))


def finetune_dice(
    model: PIRNet, labelled: Dataset, test: Dataset, settings: Settings, seed: int, mode: str
) -> dict[str, Any]:
    """Fine-tune segmentation (non-private, data order from ``seed``; ``mode`` "frozen": the head
    only, "full": encoder too) for ``finetune_epochs``; Dice on ``test`` (its lesion patients)
    every ``eval_every`` epochs and at the end, and the top-level modules whose weights moved."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = LocalTrainer(
        model, labelled, dp=DPConfig(enabled=False), batch_size=settings.batch_size, lr=settings.finetune_lr, seed=seed
    )
    loader = DataLoader(test, batch_size=8, collate_fn=collate_patients)
    curve: dict[int, float] = {}
    seconds = 0.0
    while (done := max(curve, default=0)) < settings.finetune_epochs:
        epochs = min(settings.eval_every, settings.finetune_epochs - done)
        metrics = trainer.train_round("segmentation", epochs, progress=False,
                                      groups=trainable_groups("head" if mode == "frozen" else "all"))
        seconds += metrics["seconds"]
        curve[done + epochs] = evaluate_model(model, loader)["dice"]
    moved = sorted({k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])})
    return {"dice": curve[settings.finetune_epochs], "dice_by_epoch": curve,
            "train_loss_last_round": metrics["loss_segmentation"], "moved": moved, "seconds": seconds}


def compare(arms: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Over seeds (``arms``: one {"scratch": .., "pretrained": ..} of :func:`finetune_dice` results
    per seed), at each fine-tuning epoch checkpoint: mean Dice of each arm, the mean and sample
    standard deviation of the paired difference (pretrained - scratch), and the share of seeds won."""
    out = {}
    for epoch in arms[0]["scratch"]["dice_by_epoch"]:
        scratch = np.array([a["scratch"]["dice_by_epoch"][epoch] for a in arms])
        pretrained = np.array([a["pretrained"]["dice_by_epoch"][epoch] for a in arms])
        diff = pretrained - scratch
        out[str(epoch)] = {
            "scratch": float(scratch.mean()), "pretrained": float(pretrained.mean()),
            "difference": float(diff.mean()), "difference_std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
            "pretrained_wins": float((diff > 0).mean()),
        }
    return out


def run(settings: Settings, work_dir: Path) -> dict[str, Any]:
    """Generate the federation under ``work_dir`` and measure (a), (b), (c)."""
    start = time.perf_counter()
    fed = generate_federation(
        work_dir / "federation", n_sites=settings.sites, subjects_per_site=settings.subjects,
        shape=(settings.size,) * 3, seed=settings.seed,
    )
    vocab, train, test = split_federation(fed, settings.size, settings.held_out)
    init = make_model(vocab, settings.size, settings.channels, settings.seed)
    model = copy.deepcopy(init)

    gap_init = {"pooled": invariance_gap(init, test, True), "full": invariance_gap(init, test, False)}
    rounds = pretrain(model, train, settings.pretrain_epochs, settings, state_dir=work_dir / "ledger", log=True)
    gap_pre = {"pooled": invariance_gap(model, test, True), "full": invariance_gap(model, test, False)}
    held_out = {"init": held_out_losses(init, test, settings.seed), "pretrained": held_out_losses(model, test, settings.seed)}
    print(f"pretraining done after {time.perf_counter() - start:.0f} s", file=sys.stderr)

    per_seed = []
    for seed in settings.finetune_seeds:
        labelled = labelled_subset(train, settings.labelled, seed)
        runs: dict[str, Any] = {"seed": seed, "labelled_subjects": [labelled[i]["subject"] for i in range(len(labelled))]}
        for mode in settings.finetune_modes:
            runs[mode] = {arm: finetune_dice(copy.deepcopy(start), labelled, test, settings, seed, mode)
                          for arm, start in (("scratch", init), ("pretrained", model))}
            print(f"fine-tune seed {seed}, {mode} encoder: Dice scratch {runs[mode]['scratch']['dice']:.3f}, "
                  f"pretrained {runs[mode]['pretrained']['dice']:.3f}", file=sys.stderr)
        per_seed.append(runs)

    return {
        "settings": asdict(settings),
        "data": {
            "vocabulary": vocab, "train_patients": len(train), "test_patients": len(test),
            "test_lesion_patients": sum(int(test[i]["label"]) == 1 for i in range(len(test))),
        },
        "a_pretraining_losses": {
            "per_term": loss_drops(rounds),
            "all_terms_lower": all(v["last"] < v["first"] for v in loss_drops(rounds).values()),
            "held_out": held_out,
            "held_out_all_terms_lower": all(held_out["pretrained"][t] < held_out["init"][t] for t in CORE_TERMS),
            "rounds": [{k: v for k, v in r.items() if k.startswith("loss_") or k in ("epsilon", "seconds")} for r in rounds],
        },
        "b_invariance": {"init": gap_init, "pretrained": gap_pre},
        "c_finetune_dice": {
            "by_mode_and_epoch": {mode: compare([r[mode] for r in per_seed]) for mode in settings.finetune_modes},
            "per_seed": per_seed,
        },
        "epsilon": rounds[-1].get("epsilon"),
        "total_seconds": time.perf_counter() - start,
    }


def plot_finetune_dice(result: dict[str, Any], path: Path) -> Path:
    """Held-out Dice against fine-tuning epochs, one panel per mode: each arm's mean over the seeds
    (line) and the individual seeds (dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = result["c_finetune_dice"]
    modes = list(dice["by_mode_and_epoch"])
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6.5, 5 * len(modes)), 3.8), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        summary = dice["by_mode_and_epoch"][mode]
        epochs = [int(e) for e in summary]
        for arm, color in (("scratch", "tab:gray"), ("pretrained", "tab:blue")):
            ax.plot(epochs, [summary[str(e)][arm] for e in epochs], color=color, marker="o", label=f"{arm} (mean)")
            for run in dice["per_seed"]:
                curve = run[mode][arm]["dice_by_epoch"]
                ax.scatter([int(e) for e in curve], list(curve.values()), color=color, alpha=0.35, s=12)
        ax.set(title=FINETUNE_MODES[mode], xlabel="fine-tuning epoch", ylabel="held-out lesion Dice")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    s = result["settings"]
    fig.suptitle(f"{s['labelled']} labelled patients, seeds {s['finetune_seeds']}, fine-tune lr {s['finetune_lr']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def int_tuple(text: str) -> tuple[int, ...]:
    """"8,16,32" -> (8, 16, 32)."""
    return tuple(int(c) for c in text.split(","))


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, Path | None]:
    """Settings and output path from the command line."""
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="write the JSON summary here too, and the fine-tuning Dice plot beside it (.png)")
    p.add_argument("--size", type=int, default=d.size, help="volume edge (voxels)")
    p.add_argument("--sites", type=int, default=d.sites)
    p.add_argument("--subjects", type=int, default=d.subjects, help="subjects per site")
    p.add_argument("--held-out", type=int, default=d.held_out, help="test subjects per site")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--labelled", type=int, default=d.labelled, help="labelled patients for fine-tuning")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dp", action="store_true", help="patient-level DP-SGD during pretraining")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="pretraining epsilon with --dp")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="pretraining learning rate (Adam)")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="fine-tuning learning rate (Adam)")
    p.add_argument("--channels", type=int_tuple, default=d.channels)
    p.add_argument("--finetune-modes", type=lambda t: tuple(t.split(",")), default=d.finetune_modes,
                   help="frozen (segmentation head only) and/or full (encoder too), comma-separated")
    p.add_argument("--finetune-seeds", type=int_tuple, default=d.finetune_seeds,
                   help="comma-separated; each draws a labelled set and a data order shared by both arms")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out Dice every N fine-tuning epochs")
    p.add_argument("--mim", action="store_true", help="add Alice's masked image modelling term to pretraining")
    p.add_argument("--anatomical", action="store_true", help="add Alice's anatomical contrast term to pretraining")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see docs/results/training_speed.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fields = {k: v for k, v in vars(args).items() if k not in ("out", "threads")}
    return Settings(**fields), args.out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, out = parse_args(argv)
    except ValueError as err:  # a setting Settings refuses: one line, no traceback
        print(f"pretraining_quality.py: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fedpir-quality-") as tmp:
        result = run(settings, Path(tmp))
    script = "benchmarks/experiments/pretraining_quality.py"
    result["command"] = shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])
    result["torch_threads"] = torch.get_num_threads()
    text = json.dumps(result, indent=1)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        plot_finetune_dice(result, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
