"""The federation's results on docs/results.md: the private-task benchmark, the earlier default simulation, the
privacy-utility curve, the public warm start, the private recipes and the transfer dtype. Each function returns one
section's Markdown lines."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.experiments.results_table import SAME_START, largest_tie_gap, per_run, tables
from benchmarks.results_files import Results, code, finite, signed, table
from fedpir.simulation.sweep import SWEEP_SITE_SIZE

SIMULATION = "default_simulation"
PLOTS = ("curves.png", "dice_per_site.png", "epsilon_per_site.png", "synthesis.png")
PRIVATE_TASK = "private_task"
#: The private task with every site on one scanner (heterogeneity 0): fedpir against FedAvg.
H0 = f"{PRIVATE_TASK}/h-0"


class PrivateTask:
    """The private-task runs of every seed: summaries, final Dice per method, means and per-seed differences."""

    PAIRS = (("fedpir", "local"), ("fedpir-dn", "local"), ("fedpir", "fedavg"), ("fedpir-dn", "pooled-nodp"))

    def __init__(self, r: Results) -> None:
        self.seeds = sorted(p.name for p in (r.folder / PRIVATE_TASK).glob("seed-*"))
        self.summaries = {seed: r.json(f"{PRIVATE_TASK}/{seed}/summary.json") for seed in self.seeds}
        self.runs = {seed: per_run(summary) for seed, summary in self.summaries.items()}
        self.methods = list(self.runs[self.seeds[0]])
        self.mean = {m: float(np.mean([self.runs[s][m]["dice"] for s in self.seeds])) for m in self.methods}
        self.diff = {(a, b): [self.runs[s][a]["dice"] - self.runs[s][b]["dice"] for s in self.seeds] for a, b in self.PAIRS}
        self.gates_hold = sum(all(g["holds"] for g in self.summaries[s]["gates"]) for s in self.seeds)
        self.settings = self.summaries[self.seeds[0]]["settings"]


def private_task(r: Results) -> list[str]:
    """The default benchmark since lesion class B: its gates, every method under DP and the DP forecast, per seed."""
    task = PrivateTask(r)
    seeds, summaries, runs, methods = task.seeds, task.summaries, task.runs, task.methods
    first = summaries[seeds[0]]
    gate_rows = [[g["name"], g["rule"], *(f"{summaries[s]['gates'][i]['measured']:.3f} "
                                          f"({'holds' if summaries[s]['gates'][i]['holds'] else 'fails'})" for s in seeds)]
                 for i, g in enumerate(first["gates"])]
    dice_rows = [[m, *(f"{runs[s][m]['dice']:.3f}" for s in seeds),
                  f"{np.mean([runs[s][m]['dice'] for s in seeds]):.3f}"] for m in methods]
    mean, diff, all_hold = task.mean, task.diff, task.gates_hold
    forecast_rows = [[s, *(f"{np.mean([f[k] for f in summaries[s]['forecast']]):.2f}" for k in ("rho", "alone", "fedpir",
                                                                                           "distributed")),
                      *(f"{np.mean([f['gain'][m] for f in summaries[s]['forecast'] if m in f['gain']]):+.3f}"
                        for m in ("local", "fedpir", "fedpir-dn"))] for s in seeds]
    settings = task.settings
    targets = [["fedpir >= local-only + 0.10 (under DP)", *(f"{v:+.3f}" for v in diff[("fedpir", "local")]),
                verdict_of(diff[("fedpir", "local")], 0.10)],
               ["fedpir-dn >= local-only + 0.10 (under DP)", *(f"{v:+.3f}" for v in diff[("fedpir-dn", "local")]),
                verdict_of(diff[("fedpir-dn", "local")], 0.10)],
               ["fedpir >= FedAvg + 0.03 at h = 1 (the default)", *(f"{v:+.3f}" for v in diff[("fedpir", "fedavg")]),
                verdict_of(diff[("fedpir", "fedavg")], 0.03) + ", but not by the method (below)"]]
    at_h0 = {p.name: per_run(r.json(f"{H0}/{p.name}/summary.json")) for p in sorted((r.folder / H0).glob("seed-*"))}
    h0_diff = {s: at_h0[s]["fedpir"]["dice"] - at_h0[s]["fedavg"]["dice"] for s in at_h0}
    within = sum(abs(d) <= 0.02 for d in h0_diff.values())
    targets.append(["fedpir within 0.02 of FedAvg at h = 0", *(f"{h0_diff[s]:+.3f}" if s in h0_diff else "not run"
                                                               for s in seeds),
                    f"met on {within} of {len(h0_diff)} seeds" if h0_diff else "not run"])
    return [
        f"## The private-task benchmark (the default since lesion class B; DP at epsilon {settings['epsilon-budget']:g} "
        "per site)", "",
        f"The sites' lesions are class B, which no public scan holds (short T1, very short T2: bright on T1w, dark on "
        f"T2w and FLAIR), so the public warm start, trained on class A, does not solve their task. "
        f"{settings['num-sites']} sites of {settings['subjects-per-site']} patients. Every method under DP runs the "
        f"private phase ({r.link('../architecture.md', 'docs/architecture.md')}, \"The private phase\"): "
        f"{settings['finetune-rounds']} rounds, each one step of plain SGD (lr {settings['lr']:g}, clipping at "
        f"{settings['max-grad-norm']:g}) over all of a site's training patients, on the shared lesion probe "
        f"(`{settings['finetune-trainable']}`, 108 parameters). The "
        "no-DP references train every group with Adam for 8 rounds. Commands "
        f"({r.link(f'{PRIVATE_TASK}/COMMANDS.md', 'COMMANDS.md')} says where and how long they ran):", "",
        *code(r.commands(PRIVATE_TASK, "fedpir simulate")), "",
        "Validity gates:", "",
        *table(["gate", "rule", *seeds], gate_rows), "",
        "Held-out lesion Dice at the last round, mean over sites:", "",
        *table(["method", *seeds, "mean"], dice_rows), "",
        "Targets of the benchmark (differences of held-out Dice on the same federation and seed; at h = 0, "
        f"every site on one scanner, from {r.link(f'{H0}/COMMANDS.md', 'these runs')}: "
        f"{', '.join(r.link(f'{H0}/{s}/report.md', s) for s in at_h0)}):", "",
        *code(r.commands(H0, "fedpir simulate")), "",
        *table(["target", *seeds, "verdict"], targets), "",
        "DP forecast, mean over sites (rho: the coherence of a site's clipped per-patient gradients at the warm "
        "start; R: forecast noise/signal of the private steps, for a site alone, in fedpir and in fedpir-dn; gain: "
        "held-out Dice over public-only; each report has the per-site table and plot):", "",
        *table(["seed", "rho", "R alone", "R fedpir", "R fedpir-dn", "gain local", "gain fedpir", "gain fedpir-dn"],
               forecast_rows), "",
        "Reports: " + ", ".join(r.link(f"{PRIVATE_TASK}/{s}/report.md", s) for s in seeds) + ".", "",
        f"What this says: the gates hold on {all_hold} of {len(seeds)} seeds (public-only {mean['public-only']:.3f}, "
        f"pooled without DP {mean['pooled-nodp']:.3f}, one site alone without DP {mean['local-nodp']:.3f}). Under DP at "
        f"epsilon {settings['epsilon-budget']:g}, a site alone reaches {mean['local']:.3f} (its forecast R is above 1 at "
        f"most sites: the small ones lose Dice alone), fedpir {mean['fedpir']:.3f}, whose sites each add their noise "
        f"(R {np.mean([f['fedpir'] for s in seeds for f in summaries[s]['forecast']]):.2f}), fedpir-dn "
        f"{mean['fedpir-dn']:.3f}, whose noise is added once under secure aggregation, and the pooled patients under "
        f"the same DP {mean['centralized']:.3f}: federating pays about "
        f"{np.mean(diff[('fedpir', 'local')]):.2f} Dice over local-only and leaves "
        f"{-np.mean(diff[('fedpir-dn', 'pooled-nodp')]):.2f} to pooled training without DP. FedAvg ends "
        f"{np.mean(diff[('fedpir', 'fedavg')]):.3f} below fedpir on average, but in this phase the two train the same "
        "shared probe with the same aggregation: the other weights FedAvg exchanges stay at the warm start (seed 2's "
        "global models of the two differ outside the probe by float rounding only, while their probes differ by about "
        "their own size), so their gap is the DP noise of two runs, not personalization, and the target fedpir >= "
        "FedAvg + 0.03, met on the numbers, says nothing about the method. "
        + (f"With every site on one scanner (h = 0) the pair differs by {signed(list(h0_diff.values()))} "
           f"({', '.join(at_h0)}): either sign, as two runs of one algorithm should, so neither target on FedAvg can "
           "tell personalization apart until the private phase trains site-local layers. "
           if h0_diff else "")
        + "The last round's Dice of a DP method swings by about 0.1 from round to round (`curves.png`). "
        "Before the private phase (commit f3bc1d9: 8 rounds of `norms,adapters,prior,task_out` with Adam), no method "
        "learnt the task under DP: fedpir 0.107, local-only 0.106, pooled 0.114.",
    ]


def readme_measured(r: Results) -> list[str]:
    """The README's paragraph of what the private-task benchmark measured (its researchers' section)."""
    task = PrivateTask(r)
    mean, diff, n = task.mean, task.diff, len(task.seeds)
    anchor = "docs/results.md#the-private-task-benchmark-the-default-since-lesion-class-b-dp-at-epsilon-8-per-site"
    return [
        f"Measured over {n} seeds ([docs/results.md]({anchor})): the validity gates hold on {task.gates_hold} of {n} "
        f"(public-only Dice {mean['public-only']:.3f}; pooled without DP {mean['pooled-nodp']:.3f} against one hospital "
        f"alone {mean['local-nodp']:.3f}). Under DP at epsilon {task.settings['epsilon-budget']:g}, **fedpir reaches "
        f"{mean['fedpir']:.3f}** against {mean['local']:.3f} for a hospital alone (fedpir minus local-only "
        f"{signed(diff[('fedpir', 'local')])} per seed; target +0.10), fedpir-dn {mean['fedpir-dn']:.3f} and all "
        f"patients pooled under the same DP {mean['centralized']:.3f}, "
        f"{mean['pooled-nodp'] - mean['centralized']:.2f} below pooled training without DP. FedAvg reaches "
        f"{mean['fedavg']:.3f} (fedpir minus FedAvg {signed(diff[('fedpir', 'fedavg')])} per seed), but in this phase "
        "it trains the same shared probe as fedpir, so the gap is two runs' DP noise, not personalization "
        "([docs/results.md](docs/results.md) has the runs at heterogeneity 0 and the sweep over the number of "
        "hospitals).",
    ]


def readme_headline(r: Results) -> list[str]:
    """The README's first line of "Results in five lines"."""
    task = PrivateTask(r)
    mean, seeds = task.mean, ", ".join(s.removeprefix("seed-") for s in task.seeds)
    return [
        f"- `fedpir simulate --seed S`, S = {seeds} (the private task, 8 hospitals): the public warm start",
        f"  alone reaches held-out Dice {mean['public-only']:.3f}, all hospitals pooled without DP "
        f"{mean['pooled-nodp']:.3f}, one alone {mean['local-nodp']:.3f};",
        f"  under DP at epsilon {task.settings['epsilon-budget']:g} fedpir reaches {mean['fedpir']:.3f}, fedpir-dn "
        f"{mean['fedpir-dn']:.3f} and a hospital alone {mean['local']:.3f}.",
    ]


SITES_SWEEP = f"{PRIVATE_TASK}/sweep-sites"


def sites_sweep(r: Results) -> list[str]:
    """Held-out Dice and the forecast noise/signal ratio against the number of sites K (one sweep's JSON)."""
    sweep = r.json(f"{SITES_SWEEP}/sweep.json")
    rows = sweep["rows"]
    methods = [m for m in ("public-only", "local", "fedpir", "fedpir-dn") if any(m in row["dice"] for row in rows)]
    fields = {"R alone": "alone", "R fedpir": "fedpir", "R fedpir-dn": "distributed"}
    body = [[row["value"], *(_fmt(row["dice"].get(m)) for m in methods),
             *(_fmt(row["forecast"][f], "{:.2f}") for f in fields.values())] for row in rows]
    ks = [int(row["value"]) for row in rows]
    rises = {m: _rises([row["dice"].get(m, np.nan) for row in rows]) for m in ("fedpir", "fedpir-dn")}
    falls = {f: _rises([-row["forecast"][f] for row in rows]) for f in ("fedpir", "distributed")}
    first, last = rows[0]["dice"], rows[-1]["dice"]
    dn_first = next((row["dice"]["fedpir-dn"] for row in rows if "fedpir-dn" in row["dice"]), None)
    return [
        "### Dice against the number of sites K", "",
        *code(r.commands(SITES_SWEEP, "fedpir simulate")), "",
        f"Sites of {SWEEP_SITE_SIZE} patients each, K = {', '.join(map(str, ks))}; every other setting as "
        f"above ({r.link(f'{SITES_SWEEP}/COMMANDS.md', 'COMMANDS.md')} says where and how long it ran; "
        f"plot {r.link(f'{SITES_SWEEP}/sweep.png', 'sweep.png')}). Held-out Dice (mean over sites, last round) and "
        "the forecast noise/signal ratio R of the private steps (mean over sites; fedpir-dn needs 2 sites):", "",
        *table(["K", *methods, *fields], body), "",
        f"What this says: the forecast R falls at {falls['fedpir'][0]} of {falls['fedpir'][1]} doublings of K for "
        f"fedpir (as 1/sqrt(K)) and {falls['distributed'][0]} of {falls['distributed'][1]} for fedpir-dn (as 1/K), "
        f"but the observed Dice does not follow it on this one seed: fedpir's rises at {rises['fedpir'][0]} of "
        f"{rises['fedpir'][1]} doublings ({_fmt(first.get('fedpir'))} at K = {ks[0]}, {_fmt(last.get('fedpir'))} at "
        f"K = {ks[-1]}), fedpir-dn's at {rises['fedpir-dn'][0]} of {rises['fedpir-dn'][1]} "
        f"({_fmt(dn_first)} at K = {ks[1]}, {_fmt(last.get('fedpir-dn'))} at K = {ks[-1]}), and a site alone, whose "
        f"forecast does not change with K, goes from {_fmt(first.get('local'))} to {_fmt(last.get('local'))}. At "
        f"K = {ks[0]} fedpir and local-only are the same algorithm on the same site, and they differ by "
        f"{abs(first['fedpir'] - first['local']):.2f}: the spread between two runs' DP noise and the last round's "
        "swing is larger than what the forecast changes across K, so showing Dice rise with K needs several seeds "
        "per value (not run), or less noisy final weights.",
    ]


def _fmt(value: float | None, spec: str = "{:.3f}") -> str:
    """A figure, or n/a when it is missing or NaN."""
    return "n/a" if value is None or not np.isfinite(value) else spec.format(value)


def _rises(values: list[float]) -> tuple[int, int]:
    """(how many consecutive steps of ``values`` go up, how many steps have both ends finite)."""
    pairs = [(a, b) for a, b in zip(values, values[1:]) if np.isfinite(a) and np.isfinite(b)]
    return sum(b > a for a, b in pairs), len(pairs)


def verdict_of(values: list[float], target: float) -> str:
    """Whether a target difference is met on every seed."""
    met = sum(v >= target for v in values)
    return "met on every seed" if met == len(values) else f"met on {met} of {len(values)} seeds"


def default_simulation(r: Results) -> list[str]:
    seeds = sorted(p.name for p in (r.folder / SIMULATION).glob("seed-*"))
    summaries = [r.json(f"{SIMULATION}/{s}/summary.json") for s in seeds]
    no_dp = [r.json(f"{SIMULATION}/no-dp/{s}.json") for s in seeds if (r.folder / SIMULATION / "no-dp" / f"{s}.json").is_file()]
    settings = summaries[0]["settings"]
    runs = [per_run(s) for s in summaries]
    mean = {m: float(np.mean(finite(run[m]["dice"] for run in runs))) for m in runs[0]}
    seen, unseen = (float(np.mean([run["fedpir"][k] for run in runs])) for k in ("seen", "unseen"))
    per_seed = ", ".join(f"{run['fedpir']['dice']:.3f}" for run in runs)
    noinv_unseen = float(np.mean([run["fedpir-noinv"]["unseen"] for run in runs]))
    dp_cost = float(np.mean([per_run(s)["fedpir"]["dice"] for s in no_dp])) - mean["fedpir"]
    held_out = [int(site["num-examples"]) for site in summaries[0]["final"]["fedpir"].values()]
    plots = [f"- {seed}: " + ", ".join(r.link(f"{SIMULATION}/{seed}/{name}") for name in ("report.md", *PLOTS))
             for seed in seeds]
    return [
        f"## The earlier default simulation: lesion class A (DP at epsilon {settings['epsilon-budget']:g} per site)", "",
        "The sites' lesions were the class the public warm start learns (today `--site-lesion A --sites 4 --subjects "
        "6,9,12,21 --finetune-rounds 4`).", "",
        f"Commands ({r.link(f'{SIMULATION}/COMMANDS.md', 'COMMANDS.md')} says where and how long they ran; the no-DP "
        "runs are the privacy-utility sweep's):", "",
        *code(r.commands(SIMULATION, "fedpir simulate")), "",
        "Each seed's report and plots:", "", *plots, "",
        *tables(summaries, no_dp), "",
        "Targets set for this simulation (they stay targets where the measurement misses them): fedpir held-out Dice "
        ">= 0.5; >= local-only + 0.05; >= FedAvg of all weights + 0.03; within 0.05 of fedpir without DP; on input "
        "modalities a site never trains on, >= 80% of its seen-modality Dice and >= fedpir-noinv + 0.05; the whole "
        "default run <= 10 minutes on 2 cores (times in COMMANDS.md).", "",
        f"What this says: that federation learns under DP (held-out Dice {mean['fedpir']:.2f} at epsilon "
        f"{settings['epsilon-budget']:g}, against {mean['scratch']:.2f} from a random start) and DP costs "
        f"{dp_cost:.3f}. The seeds sample the public warm start too (`--seed S` builds it from the public corpus of "
        f"seed S), so the spread is the warm start's: fedpir gets {per_seed} "
        f"on {', '.join(seeds)}. Every method that starts from the same warm start ({', '.join(SAME_START)}) ends "
        f"within {largest_tie_gap(summaries, no_dp):.3f} of fedpir on each seed, with and without DP: the default "
        f"fine-tuning ({settings['finetune-rounds']} rounds of {settings['local-epochs']} local epoch, groups "
        f"`{settings['finetune-trainable']}`: a few thousand parameters) moves the model little, private or not, and "
        "its training loss is flat (`curves.png`). So fedpir does not beat local-only or FedAvg here: of the groups it "
        "trains, only the prior P is shared under fedpir's key policy. On input modalities a site never trains on, "
        f"fedpir keeps {unseen / seen:.0%} of its seen-modality Dice, but its invariance term does no better than the "
        f"warm start pretrained without it (fedpir-noinv {noinv_unseen:.3f} on unseen modalities against "
        f"{unseen:.3f}). A site's held-out patients are a quarter of its own ({min(held_out)} to {max(held_out)} "
        "here), so per-site Dice is noisy.",
    ]


GATES = "validity_gates"


def validity_gates(r: Results) -> list[str]:
    seeds = sorted(p.name for p in (r.folder / GATES).glob("seed-*"))
    gates = {seed: r.json(f"{GATES}/{seed}/summary.json")["gates"] for seed in seeds}
    first = next(iter(gates.values()))
    mean = [float(np.mean([gates[s][i]["measured"] for s in seeds])) for i in range(len(first))]
    rows = [[g["name"], g["rule"], *(f"{gates[s][i]['measured']:.3f} ({'holds' if gates[s][i]['holds'] else 'fails'})"
                                     for s in seeds)] for i, g in enumerate(first)]
    return [
        "## Validity gates of the earlier default simulation (lesion class A)", "",
        f"Commands ({r.link(f'{GATES}/COMMANDS.md', 'COMMANDS.md')}):", "",
        *code(r.commands(GATES, "fedpir simulate")), "",
        *table(["gate", "rule", *seeds], rows), "",
        "Reports: " + ", ".join(r.link(f"{GATES}/{s}/report.md", s) for s in seeds) + ".", "",
        f"What this says: on that simulation the public warm start alone (mean Dice {mean[0]:.3f} over the "
        f"seeds) reaches about what all sites' data pooled without DP reaches ({mean[1]:.3f}), and one site alone, "
        f"without DP, is within {abs(mean[2]):.3f} of the pool. So every comparison of "
        "methods on it (the section above) measures noise, not methods, which is why the default benchmark now has a "
        "private task (the first section).",
    ]


def privacy_utility(r: Results) -> list[str]:
    name = "privacy_utility/privacy_utility.json"
    dice = r.json(name)["dice"]
    budgets = list(dice)
    methods = list(dice[budgets[0]])
    means = [dice[b][m]["mean"] for b in budgets for m in methods]
    return [
        "## Privacy-utility curve", "", *code([r.command(name)]), "",
        f"fedpir and local-only at each budget on each seed's default federation, from that seed's public warm start "
        f"(the epsilon-8 runs are the default simulations above; {r.link('privacy_utility/COMMANDS.md', 'COMMANDS.md')}). "
        f"Held-out Dice, mean over {len(dice[budgets[0]][methods[0]]['seeds'])} seeds ± the standard deviation (numpy's) "
        f"that {r.link('privacy_utility/privacy_utility.png')} draws:", "",
        *table(["epsilon per site", *(b.removeprefix("eps-") if b.startswith("eps-") else "no DP" for b in budgets)],
               ([m, *(f"{dice[b][m]['mean']:.3f} ± {dice[b][m]['sd']:.3f}" for b in budgets)] for m in methods)), "",
        f"Flat: every mean lies within {max(means) - min(means):.3f} of the others. On this schedule the warm start sets "
        "the Dice and the budget does not matter (the spread is the public warm starts').",
    ]


#: The warm-start sweeps, oldest first; the last is the current recipe (fedpir/training/warm_start.py, RECIPE).
WARM_STARTS = ("previous_recipe", "no_modality_dropout", "modality_dropout")


def _recipe(data: dict[str, Any]) -> str:
    recipe = data["warm_start_recipe"]
    dropout = recipe.get("modality_dropout")
    return (f"{recipe['pretrain_epochs']} pretraining + {recipe['segment_epochs']} segmentation epochs"
            + (f", modality dropout {dropout:g}" if dropout else ""))


def _by_run(data: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(run["config"], run["seed"]): run for run in data["runs"]}


def _minus(data: dict[str, Any], config: str, other: str, key: str) -> list[float]:
    """``config`` minus ``other`` on ``key``, per seed (same federation and public corpus)."""
    runs = _by_run(data)
    seeds = sorted(s for c, s in runs if c == config)
    return [runs[config, s][key] - runs[other, s][key] for s in seeds if (other, s) in runs]


def warm_start(r: Results) -> list[str]:
    files = {name: r.json(f"warm_start_recipe/{name}.json") for name in WARM_STARTS}
    seeds = sorted({run["seed"] for data in files.values() for run in data["runs"]})
    rows, single = [], []
    for name, data in files.items():
        runs, summary = _by_run(data), data["summary"]["v2-default"]
        label = f"{_recipe(data)} ({r.link(f'warm_start_recipe/{name}.json')})"
        label = f"**current**: {label}" if name == WARM_STARTS[-1] else label
        rows.append([label, *(f"{runs['v2-default', s]['dice']:.3f}" if ("v2-default", s) in runs else "" for s in seeds),
                     f"{summary['dice_mean']:.3f} ± {summary['dice_sd']:.3f}"])
        single.append([_recipe(data), f"{summary['seen_mean']:.3f}", f"{summary['unseen_mean']:.3f}",
                       f"{summary['unseen_mean'] / summary['seen_mean']:.2f}",
                       signed(_minus(data, "v2-default", "v2-default-noinv", "unseen"))])
    previous, current = files[WARM_STARTS[0]], files[WARM_STARTS[-1]]
    noinv = current["summary"]["v2-default-noinv"]
    flair = {key: signed(_minus(previous, "v3-flair-masks", "v3-flair-masks-noinv", key)) for key in ("eval_dice", "unseen")}
    commands = [r.command(f"warm_start_recipe/{name}.json") for name in WARM_STARTS]
    return [
        "## The public warm start", "",
        "The private federation's Dice comes from the public warm start, so it must not hang on one lucky public corpus. "
        "`--public-seed-per-run` builds seed S's warm starts from a public corpus of seed S and runs the default private "
        "fine-tuning on the default federation of seed S (the sites' own code, in-process averaging). The commands, as "
        "each JSON records them (no_modality_dropout.json was written as current_recipe.json; how and when each ran: "
        f"{r.link('warm_start_recipe/COMMANDS.md', 'COMMANDS.md')}):", "",
        *code(commands), "",
        "Held-out Dice of fedpir per seed:", "",
        *table(["public warm start", *(f"seed {s}" for s in seeds), "mean"], rows), "",
        "**Modality dropout** (`fedpir pretrain-public --modality-dropout`, on by default): in the segmentation epochs "
        "each modality of a patient's view is left out with that probability (one is always kept), so the head also "
        "learns from one modality alone, which is what a site with fewer modalities, or a modality a site never trained "
        "on, gives it. The sites' models given one input modality at a time, on their evaluation sets (mean over the "
        "seeds):", "",
        *table(["public warm start", "Dice, seen modality", "Dice, unseen modality", "unseen / seen",
                "fedpir minus fedpir-noinv, unseen, per seed"], single), "",
        f"The spread over public corpora stays large (sd {current['summary']['v2-default']['dice_sd']:.3f}): a warm "
        f"start pretrained on {current['warm_start_recipe']['subjects']} public patients is still a noisy draw, and more "
        "public patients are the next thing to try. The invariance term does not beat the warm start pretrained without "
        f"it (fedpir-noinv {noinv['dice_mean']:.3f} ± {noinv['dice_sd']:.3f} held-out, {noinv['unseen_mean']:.3f} on "
        "unseen modalities).", "",
        "**Public masks on FLAIR only** (`fedpir pretrain-public --segment-modalities flair`: the segmentation epochs see "
        f"one modality, as public lesion datasets often come; configurations `v3-flair-masks*` of "
        f"{r.link(f'warm_start_recipe/{WARM_STARTS[0]}.json')}, {_recipe(previous)}): if the invariance term carried the "
        "segmentation to the other modalities, fedpir would beat fedpir-noinv here. fedpir minus fedpir-noinv per seed on "
        f"the evaluation set (own modalities): {flair['eval_dice']}; on unseen single modalities: {flair['unseen']}. "
        "The ablation keeps the cross-modal reconstruction loss (every modality rebuilt from one modality's X_h), which "
        "already aligns the modalities' features.",
    ]


def describe(entry: dict[str, Any], defaults: dict[str, Any]) -> str:
    """A configuration of benchmarks/experiments/dp_recipe.py in words, from its overrides and the run defaults."""
    def get(key: str) -> Any:
        return entry.get(key.replace("-", "_"), defaults.get(key))

    start = {True: "warm start", "noinv": "warm start without invariance", False: "random init"}[entry["warm"]]
    parts = [start]
    if get("pretrain-rounds"):
        parts.append(f"{get('pretrain-rounds')} private pretraining rounds")
    parts.append(f"{get('finetune-rounds')}x{get('local-epochs')} epochs of `{get('finetune-trainable')}` at lr {get('lr'):g}")
    if (get("augment-views") or 0) > 1:
        parts.append(f"{get('augment-views')} augmented views")
    if entry.get("key_policy"):
        parts.append(f"key policy {entry['key_policy']}")
    parts.append(f"DP epsilon {get('epsilon-budget'):g}" if get("dp") else "**no DP**")
    return ", ".join(parts)


def federation_in_fine_tuning(r: Results) -> list[str]:
    name = "dp_recipe_v2/dp_recipe.json"
    data = r.json(name)
    recipes = [c for c in data["summary"] if not c.endswith(("-local", "-fedavg", "-noinv"))]
    rows = []
    for c in recipes:
        s = data["summary"][c]
        rows.append([describe(s, data["defaults"]), f"{s['dice_mean']:.3f} / {s['eval_dice_mean']:.3f}",
                     *(signed(_minus(data, c, f"{c}-{o}", "eval_dice")) for o in ("local", "fedavg", "noinv")),
                     signed(_minus(data, c, f"{c}-noinv", "unseen"))])
    inv = _minus(data, recipes[0], f"{recipes[0]}-noinv", "eval_dice")
    return [
        "## Does federation matter in fine-tuning?", "",
        *code([r.command(name)]), "",
        f"Each recipe with fedpir's key policy, local-only, FedAvg of the same groups and fedpir-noinv, in-process "
        f"averaging, {data['summary'][recipes[0]]['seeds']} seeds, on the default federation (warm start of "
        f"{data['warm_start_recipe']['pretrain_epochs']} + {data['warm_start_recipe']['segment_epochs']} epochs, public "
        f"seed 0; {r.link(name)}, {r.link('dp_recipe_v2/COMMANDS.md', 'COMMANDS.md')}). Dice on the held-out patients and "
        "on each site's evaluation set (more patients, the site's own modalities; the less noisy of the two), and fedpir "
        "minus each baseline per seed:", "",
        *table(["recipe", "fedpir held-out / eval-set Dice", "minus local (eval set)", "minus FedAvg (eval set)",
                "minus noinv (eval set)", "minus noinv (unseen modality)"], rows), "",
        "Why fedpir equals local-only under the default recipe: of the groups it trains, only the prior P is shared under "
        "fedpir's key policy (norms, adapters and task heads stay at the site), and the prior barely moves the "
        "segmentation. Federation can only matter when shared weights train; trained without DP, every parameter moves "
        "and the per-seed differences change sign. fedpir minus fedpir-noinv on each site's own modalities under the "
        f"default recipe: {min(inv):+.3f} to {max(inv):+.3f} over the seeds; on unseen modalities, the last column.",
    ]


def private_recipes(r: Results) -> list[str]:
    name = "dp_recipe.json"
    data = r.json(name)
    summary = data["summary"]
    rows = [[describe(s, data["defaults"]), f"{s['dice_mean']:.3f} ± {s['dice_sd']:.3f}"] for s in summary.values()]
    base = summary["warm-none"]["dice_mean"]
    private = [s["dice_mean"] for c, s in summary.items() if s["warm"] and c != "warm-none" and s.get("dp", True)]
    public = [s["dice_mean"] for s in summary.values() if s["warm"] and s.get("dp") is False]
    return [
        "## Which private recipe learns (previous generator)", "",
        *code([r.command(name)]), "",
        f"Measured on a previous version of the default federation ({data['defaults']['num-sites']} sites of "
        f"{data['defaults']['subjects-per-site']} patients, the previous lesion contrast), fedpir's key policy, in-process "
        f"FedAvg of the exchanged keys; {data['machine']}. Final held-out Dice, mean ± sd over "
        f"{summary['warm-none']['seeds']} seeds (`warm-none` is the warm start with a learning rate too small to move it: "
        f"no private learning; {r.link(name)}):", "",
        *table(["configuration", "Dice"], rows), "",
        "The public warm start is what makes the private federation segment at all. Private fine-tuning adds at most "
        f"{max(private) - base:+.3f} Dice over the warm start alone; the same fine-tuning without DP adds up to "
        f"{max(public) - base:+.3f}.",
    ]


def transfer_dtype(r: Results) -> list[str]:
    name = "transfer_dtype/transfer_dtype.json"
    data = r.json(name)
    runs = {(run["seed"], run["transfer_dtype"]): run for run in data["runs"]}
    low = [d for d in data["dtypes"] if d != "float32"][0]
    rows, same = [], True
    for w in data["weights"]:
        full, small = runs[w["seed"], "float32"], runs[w["seed"], low]
        same &= all(round(full[k], 4) == round(small[k], 4) for k in ("held_out_dice", "seen", "unseen"))
        rows.append([w["seed"], *(f"{full[k]:.4f} / {small[k]:.4f}" for k in ("held_out_dice", "seen", "unseen")),
                     f"{w['fusion_moved_l2']:.3f}", f"{w['int8_minus_float32_l2']:.4f} "
                     f"({w['int8_minus_float32_l2'] / w['fusion_moved_l2']:.1%})", f"{w['max_abs_int8_minus_float32']:.1e}"])
    return [
        "## Transfer dtype: does int8 change what the federation learns?", "",
        *code([r.command(name)]), "",
        f"For DT = {' and '.join(data['dtypes'])} on each seed's default federation ({r.link(name)}, "
        f"{r.link('transfer_dtype/COMMANDS.md', 'COMMANDS.md')}). This recipe also trains the shared fusion block under DP "
        "(the default recipe's only shared trained group, the prior, barely moves), and `--reproducible-noise` gives both "
        "dtypes the same DP noise, so the encoding is the only difference. Per seed, float32 / int8:", "",
        *table(["seed", "held-out Dice", "Dice, seen modality", "Dice, unseen modality", "fusion block moved (L2)",
                f"{low} - float32 (L2, share of the move)", "largest weight difference"], rows), "",
        f"{low} left every Dice {'unchanged at four decimals' if same else 'changed (see the table)'}; its final weights "
        "differ from float32's by a small share of the distance training moved them.",
    ]
