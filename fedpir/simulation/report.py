"""The researcher's report: one Markdown page with tables and matplotlib plots, read from the runs.

Every figure comes from the ``metrics.jsonl`` files that the runs wrote (and, for the slice grid,
the exported fedpir model with one site's local layers), nothing else.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedpir.client.site import site_data  # noqa: E402
from fedpir.privacy.at_rest import load_tensors  # noqa: E402
from fedpir.run_config import RunSettings  # noqa: E402
from fedpir.server.rounds import MetricsLog  # noqa: E402
from fedpir.simulation.forecast import SiteForecast  # noqa: E402
from fedpir.simulation.gates import Gate, validity_gates, verdict  # noqa: E402
from fedpir.training.model import build_model  # noqa: E402

Records = list[dict[str, Any]]


def load_runs(out_dir: Path, methods: list[str]) -> dict[str, Records]:
    """Each method's metrics records (methods without a run are left out)."""
    return {m: MetricsLog(Path(out_dir) / m / "metrics.jsonl").read() for m in methods
            if (Path(out_dir) / m / "metrics.jsonl").is_file()}


def per_round(records: Records, kind: str, key: str) -> dict[int, float]:
    """Mean over sites of ``metrics[key]`` for each round (NaNs ignored)."""
    values: dict[int, list[float]] = defaultdict(list)
    for rec in records:
        if rec.get("kind") == kind and key in rec.get("metrics", {}):
            value = float(rec["metrics"][key])
            if math.isfinite(value):
                values[rec["round"]].append(value)
    return {r: float(np.mean(v)) for r, v in sorted(values.items())}


def final_by_site(records: Records, kind: str = "evaluate") -> dict[str, dict[str, float]]:
    """The last round's metrics of each site."""
    last: dict[str, tuple[int, dict[str, float]]] = {}
    for rec in records:
        if rec.get("kind") == kind and rec["round"] >= last.get(rec["site"], (-1, {}))[0]:
            last[rec["site"]] = (rec["round"], rec["metrics"])
    return {site: metrics for site, (_, metrics) in sorted(last.items())}


def _shown(path: Path, out_dir: Path) -> str:
    """``path`` relative to the report's folder when inside it (a report names no machine paths)."""
    return str(path.relative_to(out_dir)) if path.is_relative_to(out_dir) else str(path)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def quality_table(runs: dict[str, Records], keys: tuple[str, ...]) -> str:
    """Markdown table: one row per (method, site) with the final held-out metrics and epsilon."""
    lines = ["| method | site | " + " | ".join(keys) + " | epsilon |", "|---" * (len(keys) + 3) + "|"]
    for method, records in runs.items():
        evaluated, trained = final_by_site(records), final_by_site(records, "train")
        for site, metrics in evaluated.items():
            eps = trained.get(site, trained.get("pooled", {})).get("epsilon")
            cells = [_fmt(metrics.get(k)) for k in keys]
            lines.append(f"| {method} | {site} | " + " | ".join(cells) + f" | {_fmt(eps)} |")
        means = [_fmt(float(np.nanmean([m.get(k, np.nan) for m in evaluated.values()]))) for k in keys]
        lines.append(f"| **{method}** | **mean** | " + " | ".join(means) + " | |")
    return "\n".join(lines)


def plot_curves(runs: dict[str, Records], path: Path) -> Path:
    """Training loss, held-out PSNR (synthesis) and Dice per round, one line per method."""
    panels = (("train", "loss_total", "training loss"), ("evaluate", "psnr", "held-out PSNR (dB)"),
              ("evaluate", "dice", "held-out lesion Dice"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (kind, key, title) in zip(axes, panels):
        for method, records in runs.items():
            curve = per_round(records, kind, key)
            if curve:
                ax.plot(list(curve), list(curve.values()), marker="o", label=method)
        ax.set(title=title, xlabel="round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole rounds, also in a one-round run
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_site(runs: dict[str, Records], key: str, kind: str, title: str, path: Path) -> Path:
    """Grouped bars: the final ``key`` of each site, one bar per method."""
    finals = {m: final_by_site(r, kind) for m, r in runs.items()}
    sites = sorted({s for f in finals.values() for s in f if s != "pooled"})
    width = 0.8 / max(len(finals), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(sites)), 4))
    for i, (method, final) in enumerate(finals.items()):
        values = [final.get(s, final.get("pooled", {})).get(key, np.nan) for s in sites]
        ax.bar(np.arange(len(sites)) + i * width, values, width, label=method)
    ax.set_xticks(np.arange(len(sites)) + width * (len(finals) - 1) / 2, sites)
    ax.set(title=title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_synthesis(run_dir: Path, site: str, path: Path) -> Path | None:
    """Slice grid for one held-out patient: each available input modality (rows) -> the model's
    synthesis of every modality -> ground truth (last row). None when the run exported no model."""
    settings = RunSettings.from_run_config(json.loads((run_dir / "run_config.json").read_text()))
    model = build_model(settings)
    model.load_state_dict(torch.load(run_dir / "global_model.pt"), strict=False)
    local = run_dir / "sites" / site / "local_state.pt"
    if local.is_file():
        model.load_state_dict(load_tensors(local), strict=False)
    model.eval()
    _, holdout, _ = site_data(settings, settings.federation_path / site, site)
    item = holdout[0]
    vocab, present = settings.vocabulary, item["present"].tolist()
    inputs = [i for i, p in enumerate(present) if p]
    mid = item["image"].shape[-1] // 2
    fig, axes = plt.subplots(len(inputs) + 1, len(vocab) + 1, figsize=(2.2 * (len(vocab) + 1), 2.2 * (len(inputs) + 1)))
    for row, m in enumerate(inputs):
        x = item["image"][m : m + 1].unsqueeze(0)
        synth = model.decode(model.encode(x, m))[0]
        axes[row, 0].imshow(x[0, 0, :, :, mid].T, cmap="gray", origin="lower")
        axes[row, 0].set_title(f"input {vocab[m]}", fontsize=9)
        for col, name in enumerate(vocab, start=1):
            axes[row, col].imshow(synth[col - 1, :, :, mid].T, cmap="gray", origin="lower")
            axes[row, col].set_title(f"{vocab[m]} -> {name}", fontsize=9)
    axes[-1, 0].set_title("ground truth", fontsize=9)
    for col, name in enumerate(vocab, start=1):
        if present[col - 1]:
            axes[-1, col].imshow(item["image"][col - 1, :, :, mid].T, cmap="gray", origin="lower")
            axes[-1, col].set_title(f"true {name}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{site}, held-out patient {item['subject']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cross_modal_table(cross_modal: dict[str, Any]) -> str:
    """Markdown table: Dice per method on input modalities each site trains on and on the others."""
    lines = ["| method | Dice, seen input modalities | Dice, unseen input modalities | unseen / seen |",
             "|---|---|---|---|"]
    for method, result in cross_modal.items():
        ratio = result["unseen"] / result["seen"] if result["seen"] else float("nan")
        lines.append(f"| {method} | {_fmt(result['seen'])} | {_fmt(result['unseen'])} | {_fmt(ratio)} |")
    return "\n".join(lines)


#: The methods whose learning the forecast speaks of, and the forecast (a SiteForecast field) of each.
FORECAST_OF: dict[str, str] = {"local": "alone", "fedpir": "fedpir", "fedpir-dn": "distributed"}


def forecast_gains(forecasts: list[SiteForecast], summary: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Per site: its forecast, and each forecast method's final held-out Dice minus public-only's at that site."""
    public = summary.get("public-only", {})
    rows = []
    for f in forecasts:
        gains = {m: summary[m][f.site]["dice"] - public[f.site]["dice"]
                 for m in FORECAST_OF if m in summary and f.site in summary[m] and f.site in public}
        rows.append({**asdict(f), "gain": {m: g for m, g in gains.items() if math.isfinite(g)}})
    return rows


def forecast_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: each site's rho and forecast noise/signal ratios beside the Dice its methods gained."""
    methods = list(FORECAST_OF)
    lines = ["| site | training patients | rho | R alone | R fedpir | R fedpir-dn | " +
             " | ".join(f"gain {m}" for m in methods) + " |", "|---" * (6 + len(methods)) + "|"]
    for r in rows:
        cells = [_fmt(r["gain"].get(m)) for m in methods]
        lines.append(f"| {r['site']} | {r['patients']} | {r['rho']:.2f} | {r['alone']:.2f} | {r['fedpir']:.2f} | "
                     f"{r['distributed']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_forecast(rows: list[dict[str, Any]], path: Path) -> Path:
    """Each site and method: the Dice gained over public-only against the forecast noise/signal ratio."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, field in FORECAST_OF.items():
        points = [(r[field], r["gain"][method]) for r in rows if method in r["gain"]]
        if points:
            ax.scatter(*zip(*points), label=method)
    ax.set(xscale="log", xlabel="forecast noise/signal R", ylabel="held-out Dice gained over public-only",
           title="DP forecast and what was learnt, per site")
    ax.axhline(0, color="gray", lw=0.8)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def gates_table(gates: list[Gate]) -> str:
    """Markdown table of the validity gates, then the verdict in one sentence."""
    lines = ["| gate | rule | measured | holds |", "|---|---|---|---|"]
    for g in gates:
        holds = "not measured" if g.holds is None else "yes" if g.holds else "**no**"
        lines.append(f"| {g.name} | {g.rule} | {_fmt(g.measured)} | {holds} |")
    return "\n".join([*lines, "", verdict(gates)])


def write_report(out_dir: Path, methods: list[str], settings: RunSettings, cross_modal: dict[str, Any] | None = None,
                 forecasts: list[SiteForecast] | None = None) -> Path:
    """Write ``out_dir/report.md`` and its PNGs (and ``summary.json``); returns the report's path.
    ``cross_modal``: the result of :func:`fedpir.simulation.cross_modal.cross_modal_summary`; ``forecasts``: of
    :func:`fedpir.simulation.forecast.site_forecasts`."""
    with warnings.catch_warnings():
        # matplotlib calls np.array(x, copy=False) on its own arrays, which NumPy 2 flags as
        # deprecated; it changes nothing in the figures. (Set here: Ray re-enables such warnings.)
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return _write_report(Path(out_dir), methods, settings, cross_modal, forecasts or [])


def _write_report(out_dir: Path, methods: list[str], settings: RunSettings, cross_modal: dict[str, Any] | None,
                  forecasts: list[SiteForecast]) -> Path:
    runs = load_runs(out_dir, methods)
    task_key = "dice" if settings.finetune_task == "segmentation" else "accuracy"
    summary = {m: final_by_site(r) for m, r in runs.items()}
    gates = validity_gates(summary) if task_key == "dice" else []
    figures = [
        ("Loss and held-out metrics per round", plot_curves(runs, out_dir / "curves.png")),
        (f"Final held-out {task_key} per site",
         plot_per_site(runs, task_key, "evaluate", f"held-out {task_key}", out_dir / f"{task_key}_per_site.png")),
        ("Epsilon spent per site", plot_per_site(runs, "epsilon", "train", "epsilon spent", out_dir / "epsilon_per_site.png")),
    ]
    if "fedpir" in runs and (out_dir / "fedpir" / "global_model.pt").is_file():
        site = max(final_by_site(runs["fedpir"]), key=lambda s: sum(
            v for k, v in final_by_site(runs["fedpir"], "train")[s].items() if k.startswith("has-modality.")))
        grid = plot_synthesis(out_dir / "fedpir", site, out_dir / "synthesis.png")
        figures.append(("Cross-modal synthesis by the fedpir model (input -> every modality -> truth)", grid))
    lines = [
        "# fedpir simulation report", "",
        f"Federation: `{_shown(settings.federation_path, out_dir)}`; {settings.num_sites} sites, seed {settings.seed}, "
        f"{settings.volume_size}^3 voxels; {settings.pretrain_rounds} pretraining + {settings.finetune_rounds} "
        f"fine-tuning rounds ({settings.finetune_task}); DP {'on' if settings.dp else 'off'}, "
        f"budget epsilon {settings.epsilon_budget}.", "",
        "## Validity gates", "",
        gates_table(gates) if gates else "The validity gates are defined on segmentation Dice; this run fine-tunes "
                                         "for classification.", "",
        "## Final held-out metrics (last round)", "",
        quality_table(runs, (task_key, *(("auroc",) if task_key == "accuracy" else ()), "psnr", "ssim")), "",
    ]
    if cross_modal:
        lines += ["## Cross-modal generalization (one input modality at a time)", "",
                  "Each site's final model on further patients of that site rendered in every modality "
                  "(`<federation>/eval`), given one modality as its only input. \"Seen\": modalities the site "
                  "trains on; \"unseen\": the others.", "", cross_modal_table(cross_modal), ""]
    gained = forecast_gains(forecasts, summary) if forecasts and task_key == "dice" else []
    if gained:
        lines += ["## DP forecast and what was learnt", "",
                  "rho: the coherence of a site's clipped per-patient gradients at the warm start (1: all alike); R: "
                  "the forecast noise/signal ratio of the run's private steps for the site alone, in fedpir (each "
                  "site adds its noise) and in fedpir-dn (the noise is added once), the last two with the pooled "
                  "rho; gain: final held-out Dice minus public-only's at the site. R well below 1 forecasts "
                  "learning; well above, noise.", "", forecast_table(gained), ""]
        figures.append(("Forecast noise/signal and Dice gained", plot_forecast(gained, out_dir / "forecast.png")))
    for title, path in figures:
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    (out_dir / "summary.json").write_text(json.dumps(
        {"final": summary, "gates": [asdict(g) for g in gates], "cross_modal": cross_modal or {}, "forecast": gained,
         "settings": settings.to_run_config()},
        indent=1, default=float))
    return report


def write_sweep_report(out_dir: Path, knob: str, rows: list[dict[str, Any]]) -> Path:
    """``out_dir/sweep.md``, ``sweep.png`` and ``sweep.json`` of a sweep (:mod:`fedpir.simulation.sweep`): mean
    held-out Dice of each method and the mean forecast noise/signal ratios against the swept value."""
    methods = list(dict.fromkeys(m for r in rows for m in r["dice"]))
    forecasts = {"local (alone)": "alone", "fedpir": "fedpir", "fedpir-dn": "distributed"}
    lines = [f"# fedpir sweep over {knob}", "",
             "Mean held-out Dice over sites (final round) and the mean forecast noise/signal ratio R of the private "
             f"steps (report.md of each run: its per-site table); one run per value, in `{knob}-<value>/`.", "",
             f"| {knob} | " + " | ".join(methods) + " | " + " | ".join(f"R {f}" for f in forecasts) + " |",
             "|---" * (1 + len(methods) + len(forecasts)) + "|"]
    for r in rows:
        lines.append(f"| {r['value']} | " + " | ".join(_fmt(r["dice"].get(m)) for m in methods) + " | "
                     + " | ".join(_fmt(r["forecast"][field]) for field in forecasts.values()) + " |")
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for m in methods:
        left.plot(x, [r["dice"].get(m, np.nan) for r in rows], marker="o", label=m)
    for label, field in forecasts.items():
        right.plot(x, [r["forecast"][field] for r in rows], marker="o", label=label)
    for ax, title in ((left, "held-out lesion Dice"), (right, "forecast noise/signal R")):
        ax.set(title=title, xlabel=knob, xticks=x, xticklabels=[r["value"] for r in rows])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    right.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png", dpi=100)
    plt.close(fig)
    lines += ["", "![sweep](sweep.png)", ""]
    (out_dir / "sweep.json").write_text(json.dumps({"knob": knob, "rows": rows}, indent=1, default=float))
    report = out_dir / "sweep.md"
    report.write_text("\n".join(lines))
    return report
