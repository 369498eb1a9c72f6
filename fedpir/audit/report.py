"""The auditor's page (``fedpir audit report``): epsilon per round per site and the budget left.

One Markdown file ``audit_report.md`` and one figure ``epsilon.png`` in the output folder. With a
site's public key the ledger is verified first (:func:`fedpir.audit.ledger.verify_ledger`) and the
page plots the epsilon recomputed with Opacus; without one it plots the epsilon the site recorded
and says that the ledger was not verified. With an attack result file (``fedpir audit attack``) the
page adds the membership-inference table: epsilon next to the attack's AUROC.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from fedpir.audit.attack_study import load_results
from fedpir.audit.ledger import AuditResult, verify_ledger
from fedpir.privacy.signing import load_public_key

REPORT_NAME, FIGURE_NAME, ATTACK_FIGURE_NAME = "audit_report.md", "epsilon.png", "attack_auroc.png"


@dataclass
class SiteRounds:
    """One site's private rounds for the page."""

    site: str
    ledger: Path
    verdict: str
    rounds: list[tuple[int, float, float]]  # (entry line, epsilon, budget)
    non_private_rounds: int
    delta: float | None


def _recorded(path: Path) -> SiteRounds:
    """The epsilon the site recorded, unverified (unreadable lines are skipped)."""
    rounds, non_private, delta = [], 0, None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("dp") and "epsilon" in entry:
            rounds.append((number, float(entry["epsilon"]), float(entry.get("epsilon_budget", float("nan")))))
            delta = entry.get("delta", delta)
        elif not entry.get("dp"):
            non_private += 1
    return SiteRounds(path.parent.name, path, "not verified (no public key)", rounds, non_private, delta)


def _verified(path: Path, result: AuditResult) -> SiteRounds:
    verdict = "verified OK" if result.ok else f"FAILED verification ({len(result.failures)} failures)"
    return SiteRounds(path.parent.name, path, verdict, result.rounds, result.non_private_rounds, result.delta)


def write_report(ledgers: list[Path], out: Path, public_keys: list[Path] | None = None,
                 attack: Path | None = None) -> tuple[Path, bool]:
    """Write the page for ``ledgers`` (keys, if given, in the same order) and, if given, the
    ``attack`` result file's table and figure; returns (page, all verified ok)."""
    keys = list(public_keys or [])
    if keys and len(keys) != len(ledgers):
        raise ValueError(f"give one --public-key per ledger ({len(ledgers)} ledgers, {len(keys)} keys)")
    if not ledgers and attack is None:
        raise ValueError("nothing to report: give ledgers, --attack FILE, or both")
    document = load_results(attack) if attack is not None else None
    sites, ok = [], True
    for i, path in enumerate(ledgers):
        if not path.is_file():
            raise OSError(f"ledger {path} is not a file")
        if keys:
            result = verify_ledger(path, load_public_key(keys[i]))
            ok &= result.ok
            sites.append(_verified(path, result))
        else:
            sites.append(_recorded(path))
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Privacy audit", ""]
    if sites:
        lines += _ledger_section(sites, bool(keys), out)
    if document is not None:
        lines += _attack_section(document, out)
    page = out / REPORT_NAME
    page.write_text("\n".join(lines))
    return page, ok


def _ledger_section(sites: list[SiteRounds], verified: bool, out: Path) -> list[str]:
    """Markdown lines of the ledgers' table (and their figure, drawn into ``out``)."""
    names = [s.site for s in sites]
    for s in sites:
        if names.count(s.site) > 1:
            s.site = str(s.ledger)
    _plot(sites, out / FIGURE_NAME)
    lines = [f"![epsilon per round]({FIGURE_NAME})", "",
             "| site | ledger | verdict | private rounds | non-private rounds | epsilon spent | budget | budget left | delta |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in sites:
        eps, budget = (s.rounds[-1][1], s.rounds[-1][2]) if s.rounds else (0.0, float("nan"))
        known = math.isfinite(budget)
        spent, left = ((f"inf (private rounds: {eps:.4g})", "none") if s.non_private_rounds
                       else (f"{eps:.4g}", f"{budget - eps:.4g}" if known else "-"))
        delta = f"{s.delta:g}" if s.delta is not None else "-"
        lines.append(f"| {s.site} | `{s.ledger}` | {s.verdict} | {len(s.rounds)} | {s.non_private_rounds} | "
                     f"{spent} | {f'{budget:.4g}' if known else '-'} | {left} | {delta} |")
    return [*lines, "", "A non-private round releases an update without any DP guarantee, so a site with one has "
            "epsilon inf (the plot shows its private rounds only). Epsilon is "
            + ("recomputed with Opacus from each entry's accountant history." if verified else
               "as recorded by the site: verify the ledgers (`--public-key`) to recompute it."), ""]


def _attack_section(document: dict, out: Path) -> list[str]:
    """Markdown lines of a membership-inference result: epsilon next to the attack's AUROC (and
    the AUROC of every seed's model per epsilon, drawn into ``out``)."""
    _plot_attack(document, out / ATTACK_FIGURE_NAME)
    lines = ["## Membership inference", "", f"![attack AUROC per epsilon]({ATTACK_FIGURE_NAME})", "",
             f"Attack: {document.get('attack', '?')} (score {document.get('score', '?')}), members = the site's "
             "training patients, non-members = held-out patients of the same site. AUROC 0.5 is a coin toss, "
             "1.0 tells every member apart; it is an empirical lower bound on what leaks, not a guarantee.", "",
             "| epsilon | AUROC mean | sd | min | max | seeds | member loss | non-member loss |",
             "|---|---|---|---|---|---|---|---|"]
    for row in document["summary"]:
        lines.append(f"| {_epsilon_label(row)} | {row['auroc_mean']:.3f} | {row['auroc_sd']:.3f} | "
                     f"{row['auroc_min']:.3f} | {row['auroc_max']:.3f} | {row['seeds']} | "
                     f"{row['member_loss_mean']:.4g} | {row['nonmember_loss_mean']:.4g} |")
    return [*lines, ""]


def _epsilon_label(row: dict) -> str:
    return "inf (no DP)" if row.get("epsilon") is None else f"{row['epsilon']:.3g}"


def _pyplot() -> ModuleType:
    """matplotlib.pyplot on the headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy", category=DeprecationWarning)
    import matplotlib.pyplot as plt

    return plt


def _plot_attack(document: dict, path: Path) -> None:
    """Each seed's AUROC (dots) and their mean (bar) per target epsilon; 0.5 dashed."""
    plt = _pyplot()
    summary = document["summary"]
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for x, row in enumerate(summary):
        aurocs = [r["auroc"] for r in document.get("runs", []) if r.get("target_epsilon") == row.get("target_epsilon")]
        ax.bar(x, row["auroc_mean"], color="#9ecae1", width=0.6)
        ax.scatter([x] * len(aurocs), aurocs, color="#08519c", zorder=3, s=14)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(summary)), [_epsilon_label(row) for row in summary])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("epsilon spent")
    ax.set_ylabel("membership attack AUROC")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot(sites: list[SiteRounds], path: Path) -> None:
    """Epsilon after each private round, one line per site, its budget dashed."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for s in sites:
        xs = list(range(1, len(s.rounds) + 1))
        (line,) = ax.plot(xs, [r[1] for r in s.rounds], marker="o", label=s.site)
        if s.rounds and math.isfinite(s.rounds[-1][2]):  # an entry without a recorded budget draws none
            ax.axhline(s.rounds[-1][2], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole rounds, also with one round
    ax.set_ylim(bottom=0)
    ax.set_xlabel("private round")
    ax.set_ylabel("epsilon spent (dashed: budget)")
    ax.grid(alpha=0.3)
    if sites:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
