"""The cost table, generated from the cost benchmarks' records (docs/results/benchmarks.jsonl).

    python -m benchmarks.cost.cost_table [--results docs/results/benchmarks.jsonl]

Takes the newest record of each benchmark and prints Markdown, with what the records say about the missed
targets; ``python -m benchmarks.results_page`` puts both on docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.cost.common import RESULTS

PART_NAMES = {"site_setup": "site set-up (data, model, ledger)", "training": "training loops",
              "local_other": "rest of the site's work (evaluation, weights in/out)",
              "serialization": "serialization (pickle of messages)", "aggregation": "aggregation (screening, FedAvg)",
              "transport": "transport and engine (queues, polling, Ray, checkpoints)"}


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


#: Config keys whose values make separate rows of a benchmark (the newest record of each value is shown).
VARIANTS: dict[str, str] = {"communication": "finetune_trainable", "parallel": "preset", "secure_aggregation": "preset"}


def newest(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The last record of each benchmark (of each variant, see :data:`VARIANTS`), in first-seen order."""
    out: dict[str, dict[Any, dict[str, Any]]] = {}
    for record in records:
        name = record["benchmark"]
        out.setdefault(name, {})[record["config"].get(VARIANTS.get(name, ""))] = record
    return {name: list(variants.values()) for name, variants in out.items()}


def _overhead(r: dict[str, Any]) -> list[str]:
    f, c = r["figures"], r["config"]
    steady = f["steady_round"]
    lines = [f"**Framework overhead** ({c['sites']} sites, {c['subjects']} patients each, {c['size']}^3, "
             f"{c['rounds']} rounds, no DP): the fastest federated round after the first on Flower's simulation engine "
             f"over itself less messaging, aggregation and the engine's queues: **{f['ratio_round_from_parts']:.2f}x** "
             f"(target <= 1.10: {_yes(f['ratio_round_from_parts'] <= 1.10)}); over the fastest such round of the same "
             f"sites' work in a plain loop in one process, run before and after (two runs, so load changes between "
             f"them distort it): {f['ratio_round']:.2f}x; the whole run, with the engine's start-up "
             f"({f['first_round']['startup']:.1f} s), {f['ratio_run']:.1f}x. Where a round after the first goes:", "",
             "| part | seconds | share |", "|---|---|---|"]
    wall = f["federated_round_s"]
    lines += [f"| {PART_NAMES[k]} | {steady[k]:.2f} | {steady[k] / wall:.0%} |" for k in PART_NAMES if k in steady]
    lines.append(f"| plain loop, the same round | {f['plain_round_s']:.2f} | |")
    return lines


def _dp(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    lines = [f"**DP cost** (one step, {c['batch']} patients, {c['size']}^3, {c['views']} augmented views, "
             f"{c['objective']}, fastest of {c['steps']} steps): private / non-private step, per Opacus per-patient "
             "gradient mode and trained groups (target <= 1.5 for both):", "",
             "| trained groups | parameters | mode | time ratio | peak memory ratio | met |", "|---|---|---|---|---|---|"]
    for row in r["figures"]["rows"]:
        if row["mode"] == "none" or "time_ratio" not in row:
            continue
        ok = row["time_ratio"] <= 1.5 and row["memory_ratio"] <= 1.5
        lines.append(f"| {row['group']} | {row['trained_parameters']} | {row['mode']} | {row['time_ratio']:.2f} | "
                     f"{row['memory_ratio']:.2f} | {_yes(ok)} |")
    skipped = "; ".join(f"{mode}: {why}" for mode, why in r["figures"]["not_applicable"].items())
    return [*lines, "", f"Not run: {skipped}."]


def _communication(r: dict[str, Any]) -> list[str]:
    f, c = r["figures"], r["config"]
    lines = [f"**Communication** (bytes a site sends per round / {f['shared_fp32_bytes']:,} float32 bytes of the shared "
             f"weights, target <= 1.02 for float32; Dice after {c['rounds']} private rounds of the default recipe "
             f"fine-tuning `{c['finetune_trainable']}`, {c['sites']} sites, seeds {c['seeds']}):", "",
             "| transfer-dtype | bytes per reply | ratio | final Dice (mean) | Dice - float32 (per seed) |",
             "|---|---|---|---|---|"]
    for dtype, row in f["dtypes"].items():
        diff = ", ".join(f"{d:+.4f}" for d in row.get("dice_minus_float32", []))
        lines.append(f"| {dtype} | {row['reply_bytes']:,.0f} | {row['ratio_to_fp32']:.3f} | {row['dice_mean']:.3f} | "
                     f"{diff} |")
    return lines


def _scale(r: dict[str, Any]) -> list[str]:
    f, c = r["figures"], r["config"]
    lines = [f"**Scale** ({c['subjects']} patients per site, {c['size']}^3, 2 private rounds; plot "
             f"`{Path(f['plot']).name}`): the largest number of simulated sites that completed is "
             f"**{f['largest_completed']}** of those tried ({c['sites']}; target >= 64: "
             f"{_yes(f['largest_completed'] >= 64)}).", "",
             "| sites | completed | peak memory (GiB) | round 1 s (with start-up) | round 2 s | round 2 s per site |",
             "|---|---|---|---|---|---|"]
    for row in f["rows"]:
        if "error" in row:
            lines.append(f"| {row.get('sites', '?')} | no ({row['error'][:80]}) | | | | |")
            continue
        later = row["later_round_s"]
        per_site = f"{later / row['sites']:.2f}" if later else ""
        lines.append(f"| {row['sites']} | {_yes(row['completed'])} | {row['peak_gib']:.2f} | {row['first_round_s']:.1f} | "
                     f"{later or float('nan'):.1f} | {per_site} |")
    return lines


def _parallel(r: dict[str, Any]) -> list[str]:
    f, c = r["figures"], r["config"]
    rows = {row["mode"]: row for row in f["rows"]}
    lines = [f"**Parallel sites** (the {c['preset']} preset's round: {c['sites']} sites of {c['subjects']} patients, "
             f"{c['size']}^3, {c['trainable']} trained under DP; median of rounds 2-{c['rounds']}"
             f"{'; plot `' + Path(f['plot']).name + '`' if f['plot'] else ''}): sites side by side, one core each, "
             "over sites one after another on every core: "
             f"**{f['parallel_over_serial']:.2f}x** (target <= {f['target']}: {_yes(f['met'])}).", "",
             "| sites run | cores | CPUs (torch threads) per site | round s | s per site and round |", "|---|---|---|---|---|"]
    for mode in ("one core", "serial", "parallel"):
        row = rows.get(mode)
        if row is None or "error" in row:
            lines.append(f"| {mode} | | | failed: {(row or {}).get('error', 'not run')[:80]} | |")
            continue
        lines.append(f"| {mode} | {row['cores']} | {', '.join(map(str, row['threads']))} | {row['later_round_s']:.2f} | "
                     f"{row['later_round_s'] / row['sites']:.2f} |")
    return lines


def _data(r: dict[str, Any]) -> list[str]:
    f, c = r["figures"], r["config"]
    rates = f["patients_per_s"]
    return [f"**Data path** ({c['patients']} patients, {c['size']}^3, {c['modalities']} modalities, fine-tuning "
            f"without DP): patients per second of training from tensors in memory {rates['memory_tensors']:.2f}, "
            f"from the site's cached dataset {rates['memory_cache']:.2f} ({f['ratio_cache_to_memory']:.2f}x), read "
            f"from NIfTI at every step {rates['disk']:.2f} ({f['ratio_disk_to_memory']:.2f}x); loading and "
            f"preprocessing alone {f['load_patients_per_s']:.1f} patients/s; filling the cache took "
            f"{f['cache_fill_s']:.1f} s."]


def _secure(r: dict[str, Any]) -> list[str]:
    f, c = r["figures"], r["config"]
    if "skipped" in f:  # records from before fedpir had secure aggregation
        return [f"**Secure aggregation**: {f['skipped']}."]
    rows = "; ".join(f"{n} sites: {f[f'sites_{n}']['plain_round_s']:.2f} s plain, {f[f'sites_{n}']['secure_round_s']:.2f} s "
                     f"with SecAgg+ ({f[f'sites_{n}']['ratio_round']:.2f}x)" for n in c["sites"])
    work = (f"the {c['preset']} preset's round ({c['subjects']} patients per site cycled, {c['size']}^3, its private "
            "phase under DP)" if c.get("preset") else f"{c['subjects']} patients per site, {c['size']}^3, without DP")
    return [f"**Secure aggregation** (fastest round after the first, {work}): {rows} [{c['target']}]."]


def _cli(r: dict[str, Any]) -> list[str]:
    rows = "; ".join(f"`fedpir {' '.join(r['config']['commands'][name])}` {f['min_s']:.2f} s (median {f['median_s']:.2f}, "
                     f"target {f['target_s']:g} s, {'met' if f['met'] else 'MISSED'})" for name, f in r["figures"].items())
    return [f"**CLI latency** (a new process each, fastest of {r['config']['repeats']}): {rows}."]


SECTIONS = {"cli": _cli, "overhead": _overhead, "dp_cost": _dp, "communication": _communication, "scale": _scale,
            "parallel": _parallel, "data_path": _data, "secure_aggregation": _secure}


def table(records: Iterable[dict[str, Any]]) -> str:
    """Markdown of the newest record of each benchmark, with the machine they ran on."""
    latest = newest(records)
    if not latest:
        return "No cost benchmark records yet: run `python -m benchmarks`."
    shown = [r for variants in latest.values() for r in variants]
    m = shown[0]["machine"]
    runs = ", ".join(sorted({r["run"] or "single" for r in shown}))
    lines = [f"Measured by `python -m benchmarks` (runs {runs}) on "
             f"{m['cores']} cores, {m['torch_threads']} torch thread(s), device {m['device']}, load average "
             f"{m['load_average'][0]:.1f} at the first benchmark (on a shared machine absolute times are noisy; the "
             "ratios, each measured within one run, are what count).", ""]
    for name, section in SECTIONS.items():
        for record in latest.get(name, []):
            lines += [*section(record), ""]
    return "\n".join(lines).rstrip() + "\n"


def _span(values: Iterable[float], digits: int = 2) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}-{high:.{digits}f}"


def _messaging(record: dict[str, Any]) -> float:
    """Seconds of a steady federated round spent outside the sites: messages, aggregation, the engine's queues."""
    steady = record["figures"]["steady_round"]
    return steady["serialization"] + steady["aggregation"] + steady["transport"]


def findings(records: Sequence[dict[str, Any]]) -> list[str]:
    """Why the missed targets are missed, with figures from the newest records (and the spread over all of them)."""
    latest = {name: variants[-1] for name, variants in newest(records).items()}
    every = {name: [r for r in records if r["benchmark"] == name] for name in latest}
    lines: list[str] = []
    runs = [r for r in every.get("overhead", []) if "steady_round" in r["figures"]]
    if runs:
        messaging = [_messaging(r) for r in runs]
        first = runs[-1]["figures"]["first_round"]
        startups = [r["figures"]["first_round"]["startup"] for r in runs]
        lines.append(
            f"- **Overhead.** Inside a federated round, messaging, aggregation and the engine's queues take "
            f"{_span(messaging)} s whatever the work (the file's {len(runs)} runs), most of it the simulation engine "
            f"polling its in-memory link state for each message. A round needs about {max(messaging) / 0.10:.0f} s of "
            f"site work before that is under 10%; these tiny rounds have far less. The engine's start-up (Ray) costs "
            f"{first['startup']:.0f} s once per run on the newest run, {_span(startups, 0)} s "
            f"over the file's runs (load average {_span([r['machine']['load_average'][0] for r in runs], 1)}).")
    rows = {(row["group"], row["mode"]): row for row in latest.get("dp_cost", {"figures": {"rows": []}})["figures"]["rows"]
            if "time_ratio" in row}
    if ("all", "hooks") in rows and ("all", "functorch") in rows:
        hooks, functorch = rows[("all", "hooks")], rows[("all", "functorch")]
        copy = next((p["share"] for p in hooks.get("profile", []) if p["op"] == "aten::copy_"), 0.0)
        met = [f"{g} in {m} mode" for (g, m), row in rows.items() if row["time_ratio"] <= 1.5 and row["memory_ratio"] <= 1.5]
        spread = max(max(ratios) - min(ratios) for ratios in (
            [row["time_ratio"] for r in every["dp_cost"] for row in r["figures"]["rows"] if (row["group"], row["mode"]) == key
             and "time_ratio" in row] for key in rows))
        lines.append(
            f"- **DP, all parameters.** Opacus' hooks mode spends {copy:.0%} of the private step copying the unfold of "
            f"every Conv3d input per patient (`aten::copy_`) and needs {hooks['memory_ratio']:.1f}x the memory; the "
            f"functorch mode (the default) needs {functorch['memory_ratio']:.2f}x the memory and "
            f"{functorch['time_ratio']:.2f}x the time, spent in the per-patient convolution backward and Opacus' hooks. "
            "Ghost clipping cannot help the Conv3d layers (Opacus has ghost norms for Linear and Embedding only). What "
            "would close it: per-patient gradients in closed form for GroupNorm and Linear with functorch only for "
            "Conv3d, encoding a patient's modalities in one call, or training fewer parameters privately, as the default "
            f"recipe does. Within the target: {', '.join(met) or 'none'}. A one-step ratio moved by up to {spread:.1f} "
            "between the file's runs, so read these as rough.")
    done = [row for row in latest["scale"]["figures"]["rows"] if row.get("completed")] if "scale" in latest else []
    if done:
        f = latest["scale"]["figures"]
        lines.append(
            f"- **Scale.** {f['largest_completed']} sites completed in {max(row['peak_gib'] for row in done):.1f} GiB; "
            "memory is far from the limit. The engine's limit is time: a round grows linearly with the sites, "
            f"{_span([row['later_round_s'] / row['sites'] for row in done])} s per site here, as many sites running at "
            "once as the run config's `cpus-per-site` lets the cores hold (the default fills them: parallel sites, "
            "above; records before it had every site reserve all cores). More sites need more cores or machines.")
    variants = {r["config"]["preset"]: r for r in newest(records).get("parallel", [])}
    parallel = variants.get("default")
    if parallel and not parallel["figures"]["met"]:
        rows = {row["mode"]: row for row in parallel["figures"]["rows"] if row.get("completed")}
        if {"one core", "serial", "parallel"} <= set(rows):
            slower = rows["parallel"]["training_s"] / rows["one core"]["training_s"] - 1
            threads = rows["one core"]["training_s"] / rows["serial"]["training_s"]
            lines.append(
                f"- **Parallel sites.** Two sites side by side each train {slower:.0%} slower than one site alone on one "
                f"core, and one site on two threads trains only {threads:.2f}x faster than on one: on this machine's "
                f"{parallel['config']['cores']} cores the Conv3d work of the default round shares the cores' caches and "
                "memory bandwidth. The round also ends with the largest site alone: Flower's simulation engine queues a "
                "round's messages in node order, whatever order the server sends them in."
                + "".join(f" The {name} preset's lighter round: {r['figures']['parallel_over_serial']:.2f}x."
                          for name, r in variants.items() if name != "default")
                + " Sites side by side stay the default: faster in every case measured.")
    secure = latest.get("secure_aggregation")
    if secure and "skipped" not in secure["figures"]:
        f = secure["figures"]
        fixed = "; ".join(f"{n} sites: +{f[f'sites_{n}']['secure_round_s'] - f[f'sites_{n}']['plain_round_s']:.1f} s"
                          for n in secure["config"]["sites"])
        lines.append(
            "- **Secure aggregation.** SecAgg+ adds three message exchanges with every site per round (setup, key "
            f"sharing, unmasking) plus key agreement and pairwise masks: a fixed cost per round ({fixed}) that does not "
            "grow with training time, so it shrinks against real rounds.")
    if "float32" in latest.get("communication", {"figures": {"dtypes": {}}})["figures"]["dtypes"]:
        full = latest["communication"]["figures"]["dtypes"]["float32"]["ratio_to_fp32"]
        lines.append(
            f"- **Communication.** float32 replies are {full - 1:.1%} above the raw weights (a header per tensor and the "
            "metrics); float16 and int8 halve and quarter them. Whether int8 changes what the federation learns: the "
            "transfer-dtype section below.")
    return ["Where the targets are missed (read with the tables above; profiles in the records of `dp_cost`):", "", *lines] \
        if lines else []


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not args.results.is_file():
        print(f"cost_table: error: {args.results} is not a file; run `python -m benchmarks` first", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    print("\n".join([table(records), *findings(records)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
