"""Sweeps of `fedpir simulate --sweep KNOB=V1,V2,...`: one simulation per value, then one table and plot of
held-out Dice and of the DP forecast against the value (names and parsing here; the runs are the command's).

    sites    the number of sites K (every site of --subjects patients, 10 unless given): how Dice grows with
             the federation, beside the forecast noise/signal ratio, which falls as 1/sqrt(K) under fedpir's
             own noise and as 1/K under distributed noise
    epsilon  each site's budget; "nodp" runs without differential privacy
    h        the heterogeneity of the sites' scanners, in [0, 1] (0: one shared scanner): where personalization
             (fedpir's site-local layers) should pay over plain FedAvg, and where it should not
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: Sweepable knob -> the run setting it sets.
SWEEPS: dict[str, str] = {"sites": "num_sites", "epsilon": "epsilon_budget", "h": "heterogeneity"}
#: The patients of every site in a sweep over sites, unless --subjects says otherwise.
SWEEP_SITE_SIZE = "10"
#: The value of an epsilon sweep that turns DP off.
NO_DP = "nodp"


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """``KNOB=V1,V2,...`` -> (knob, values), checked (ValueError naming the flag)."""
    knob, _, raw = spec.partition("=")
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if knob not in SWEEPS or not values:
        raise ValueError(f"--sweep {spec!r}: use KNOB=V1,V2,... with KNOB one of {', '.join(SWEEPS)}")
    for v in values:
        if knob == "epsilon" and v == NO_DP:
            continue
        try:
            number = int(v) if knob == "sites" else float(v)
        except ValueError:
            raise ValueError(f"--sweep {spec!r}: {v!r} is not a {'whole number' if knob == 'sites' else 'number'}"
                             + (f" (or {NO_DP})" if knob == "epsilon" else "")) from None
        if knob != "h" and number <= 0:  # h's range is the run settings' to check
            raise ValueError(f"--sweep {spec!r}: values must be > 0")
    return knob, values


def value_changes(knob: str, value: str) -> dict[str, Any]:
    """The run-setting changes of one value of a sweep."""
    if knob == "epsilon":
        return {"dp": False} if value == NO_DP else {"epsilon_budget": float(value)}
    if knob == "h":
        return {"heterogeneity": float(value)}
    return {"num_sites": int(value)}


def sweep_rows(out: Path, knob: str, values: list[str]) -> list[dict[str, Any]]:
    """One row per value: the mean final held-out Dice of each method and the mean forecast ratios (from the
    value's ``summary.json``)."""
    rows = []
    for value in values:
        summary = json.loads((out / f"{knob}-{value}" / "summary.json").read_text())
        dice = {m: _mean([s.get("dice", math.nan) for s in sites.values()]) for m, sites in summary["final"].items()}
        forecast = {field: _mean([f[field] for f in summary.get("forecast", [])])
                    for field in ("alone", "fedpir", "distributed")}
        rows.append({"value": value, "dice": dice, "forecast": forecast})
    return rows


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
