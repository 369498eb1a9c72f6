"""Studies on docs/results.md: pretraining quality (Alice's terms), zero-shot and stitching, the membership
attack, and the earlier speed and bytes figures. Each function returns one section's Markdown lines."""

from __future__ import annotations

from typing import Any

from benchmarks.results_files import Results, code, table

ALICE = ("alice/core.json", "alice/core_mim_anatomical.json")
PRETRAINING = ("pretraining_quality.json", "pretraining_quality_variants/frozen_and_full_lr0.001.json",
               "pretraining_quality_variants/frozen_and_full_lr0.01.json",
               "pretraining_quality_variants/dp_pretraining_frozen_lr0.01.json")


def _pretraining_rows(r: Results, names: tuple[str, ...]) -> list[list[Any]]:
    """One row per file and fine-tuning mode: scratch against pretrained Dice at the last evaluated epoch."""
    rows = []
    for name in names:
        data = r.json(name)
        s, inv = data["settings"], data["b_invariance"]
        terms = "PIR losses" + (" + MIM + anatomical" if s.get("mim") and s.get("anatomical") else "")
        pretraining = f"{s['pretrain_epochs']} epochs, {terms}, " + (f"DP epsilon {data['epsilon']:.1f}" if s["dp"] else "no DP")
        for mode, by_epoch in data["c_finetune_dice"]["by_mode_and_epoch"].items():
            epoch = max(by_epoch, key=int)
            d = by_epoch[epoch]
            draws = len(s["finetune_seeds"])
            rows.append([r.link(name, name.rsplit("/", 1)[-1].removesuffix(".json")), pretraining,
                         f"{epoch} epochs at lr {s['finetune_lr']:g}, {s['labelled']} labelled, {mode} encoder",
                         f"{d['scratch']:.3f}", f"{d['pretrained']:.3f}",
                         f"{d['difference']:+.3f} ± {d['difference_std']:.3f}",
                         f"{round(d['pretrained_wins'] * draws)} of {draws}",
                         f"{inv['init']['pooled']['ratio']:.2f} → {inv['pretrained']['pooled']['ratio']:.2f}",
                         f"{data['total_seconds']:.0f}"])
    return rows


PRETRAINING_HEADER = ["file", "pretraining (no labels)", "fine-tuning", "Dice, scratch", "Dice, pretrained",
                      "pretrained - scratch (± sd over draws)", "draws pretrained ahead",
                      "X_h distance ratio, init → pretrained", "seconds"]


def alice(r: Results) -> list[str]:
    return [
        "## Alice's terms (previous lesion values)", "",
        *code(r.command(name) for name in ALICE), "",
        "Alice's terms are the two extra self-supervised objectives of the Alice paper (Jiang et al., ICCV 2023): "
        "masked image modelling (rebuild masked-out patches of a scan) and an anatomical contrast (crops at the same "
        "body coordinates should embed alike). Non-private pretraining without and with them, then fine-tuning from "
        "scratch and from the pretrained encoder on a few labelled patients, over several label draws. The distance "
        "ratio is a patient's X_h distance to itself (other modalities) over its distance to other patients (lower: more "
        "invariant); plots: " + ", ".join(r.link(name.replace(".json", ".png")) for name in ALICE) + ".", "",
        *table(PRETRAINING_HEADER, _pretraining_rows(r, ALICE)), "",
        "At this small scale the Alice terms do not help (compare the two rows); both runs are short.",
    ]


def pretraining(r: Results) -> list[str]:
    return [
        "### Does pretraining help?", "",
        *code(r.command(name) for name in PRETRAINING), "",
        "Plots: " + ", ".join(r.link(name.replace(".json", ".png")) for name in PRETRAINING) + ".", "",
        *table(PRETRAINING_HEADER, _pretraining_rows(r, PRETRAINING)), "",
        "At lr 1e-3 the pretrained encoder is ahead; at lr 1e-2 scratch catches up.",
    ]


#: How each image encoder of benchmarks/experiments/zero_shot.py reads in a table.
FEATURES = {"pretrained": "X_h {}", "random": "random-init X_h {}", "warm-start": "warm-start X_h {}",
            "intensity": "intensity {}"}
MAPS = ("procrustes", "ridge", "lstsq", "naive", "probe")


def _features(encoder: str, pooling: str) -> str:
    return "warm-start `lesion`" if pooling == "lesion" else FEATURES[encoder].format(pooling)


def _zero_shot_table(data: dict[str, Any]) -> list[str]:
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in data["summary"]:
        groups.setdefault((row["task"], row["encoder"], row["pooling"], row["text"]), {})[row["method"]] = row
    rows = []
    for (task, encoder, pooling, text), by_map in groups.items():
        ratio = by_map["procrustes"]["accuracy_over_probe"]
        rows.append([task, _features(encoder, pooling), data["text_encoders"][text].split(" (")[0],
                     *(f"{by_map[m]['accuracy']['mean']:.3f} / {by_map[m]['auroc']['mean']:.3f}" for m in MAPS),
                     f"{ratio['mean']:.2f} ({', '.join(f'{v:.2f}' for v in ratio['per_seed'])})"])
    return table(["task", "image features", "text encoder", "zero-shot Procrustes", "zero-shot ridge",
                  "zero-shot least squares", "naive", "linear probe", "Procrustes / probe (per seed)"], rows)


STITCHING = {"global": "global encoder (reference)", "naive": "local encoder, naive",
             "stitched-procrustes": "local encoder through T, Procrustes", "stitched-ridge": "local encoder through T, ridge"}


def alignment(r: Results) -> list[str]:
    stitching = r.json("stitching.json")
    mismatch = stitching["summary"]["mismatch"]
    rows = [[task, STITCHING[reading], *(f"{m[k]['mean']:.3f}" for k in ("accuracy", "balanced_accuracy", "auroc")),
             f"{mismatch.get(reading, 0.0):.2f}"]
            for task in stitching["settings"]["tasks"] for reading, m in stitching["summary"][task].items()]
    return [
        "## Zero-shot classification and stitching", "",
        "What the methods are and how to read these tables: [alignment.md](alignment.md). Held-out accuracy / AUROC, "
        "mean over the seeds; `naive` pairs image and text coordinates without a map, the linear probe is a supervised "
        "reference on the same image features.", "",
        "### With the benchmark's own self-supervised encoder", "",
        *code([r.command("zero_shot.json")]), "",
        f"{r.link('zero_shot.json')}, plot {r.link('zero_shot.png')}:", "",
        *_zero_shot_table(r.json("zero_shot.json")), "",
        "### With the public warm start as the image encoder", "",
        *code([r.command("zero_shot_warm_start.json")]), "",
        f"{r.link('zero_shot_warm_start.json')}, plot {r.link('zero_shot_warm_start.png')}:", "",
        *_zero_shot_table(r.json("zero_shot_warm_start.json")), "",
        "### Stitching a site's drifted encoder back into the global X_h space", "",
        *code([r.command("stitching.json")]), "",
        f"A head trained on the global embeddings reads each site's held-out patients ({r.link('stitching.json')}); the "
        "mismatch is the held-out distance to the global X_h, relative to the spread of the global X_h:", "",
        *table(["task", "reading", "accuracy", "balanced accuracy", "AUROC", "mismatch to global X_h"], rows),
    ]


ATTACKS = ("attack.json", "attack_large_epsilon.json", "attack_segmentation.json")


def membership_attack(r: Results) -> list[str]:
    folder = "membership_attack"
    rows = []
    for name in ATTACKS:
        data = r.json(f"{folder}/{name}")
        for s in data["summary"]:
            rows.append([r.link(f"{folder}/{name}"), data["config"]["task"],
                         "inf (no DP)" if s["epsilon"] is None else f"{s['epsilon']:.2f}",
                         *(f"{s[k]:.3f}" for k in ("auroc_mean", "auroc_sd", "auroc_min", "auroc_max")),
                         f"{s['member_loss_mean']:.2g}", f"{s['nonmember_loss_mean']:.2g}"])
    config = r.json(f"{folder}/{ATTACKS[0]}")["config"]
    return [
        "## Membership-inference attack", "",
        *code(r.commands(folder, "fedpir audit")), "",
        f"`fedpir audit attack` trains one site's model on half of its patients (the members) once without DP and once "
        f"per epsilon with the site's own DP-SGD, then guesses \"member\" when the model's loss on a patient is low "
        f"(default: {config['patients']} synthetic patients at {config['size']}^3, {config['epochs']} epochs of lesion "
        f"{config['task']}, every parameter trained, {config['seeds']} seeds). AUROC 0.5 is a coin toss, 1.0 tells every "
        "member from every non-member. The AUROC is an empirical lower bound on what leaks (a low one proves nothing); "
        "the guarantee is the ledger's epsilon. In this configuration the private models also learn little, so the "
        "table shows that DP removes the memorization, not that a private model that does learn leaks little. Details, "
        f"per seed: {r.link(f'{folder}/COMMANDS.md', 'COMMANDS.md')}; the auditor's page "
        f"{r.link(f'{folder}/report/audit_report.md')} and plot {r.link(f'{folder}/report/attack_auroc.png')}.", "",
        *table(["file", "task", "epsilon spent", "AUROC mean", "sd", "min", "max", "member loss", "non-member loss"], rows),
    ]


def earlier_costs(r: Results) -> list[str]:
    speed, sizes = r.json("training_speed.json"), r.json("bytes_per_round.json")
    steps = [[row["threads"], row["stage"], "yes" if row["dp"] else "no", f"{row['median_seconds_per_step']:.2f}"]
             for row in speed["rows"]]
    policies = [[name, p["tensors"], f"{p['parameters']:,}", f"{p['payload_bytes']:,}"] for name, p in sizes["policies"].items()]
    return [
        "### Training speed and bytes per round", "",
        *code([r.command("training_speed.json"),
               f"python benchmarks/cost/bytes_per_round.py --size {sizes['size']} --modalities {sizes['modalities']}"]), "",
        f"Seconds per step at {speed['size']}^3, {speed['batch_size']} patients per step, torch {speed['torch']}, "
        f"{speed['cpu_count']} cores ({r.link('training_speed.json')}):", "",
        *table(["torch threads", "stage", "DP", "median seconds per step"], steps), "",
        f"Bytes a site sends per round under each key policy at {sizes['size']}^3 ({r.link('bytes_per_round.json')}; the "
        "JSON records no command, the one above gives its settings):", "",
        *table(["key policy", "tensors", "parameters", "payload bytes"], policies),
    ]
