"""Validity gates: what the reference runs must show for a comparison of methods to mean anything.

A benchmark can only tell federated methods apart when the task is private (the public warm start
alone does not solve it), learnable (the sites' pooled data, without DP, does solve it) and beyond
one site's reach (a site alone, without DP, stays well below the pool). Each gate reads the mean
held-out Dice over sites of one reference run (:data:`fedpir.simulation.methods.REFERENCES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The gates' thresholds on mean held-out Dice (the one place they are declared).
PUBLIC_ONLY_MAX = 0.2
POOLED_MIN = 0.6
LOCAL_GAP_MIN = 0.15

Finals = dict[str, dict[str, dict[str, float]]]  # method -> site -> final held-out metrics


@dataclass(frozen=True)
class Gate:
    """One gate: its rule in words, the measured figure, and whether it holds (None: not measured)."""

    name: str
    rule: str
    measured: float | None
    holds: bool | None


def mean_final(finals: Finals, method: str, key: str = "dice") -> float | None:
    """Mean over sites of a method's final ``key`` (None when the method did not run or has no finite value)."""
    values = [m[key] for m in finals.get(method, {}).values() if key in m and math.isfinite(m[key])]
    return sum(values) / len(values) if values else None


def validity_gates(finals: Finals, key: str = "dice") -> list[Gate]:
    """The three gates of a run, from the final held-out metrics of its reference methods."""
    public, pooled, local = (mean_final(finals, m, key) for m in ("public-only", "pooled-nodp", "local-nodp"))
    gap = None if pooled is None or local is None else pooled - local
    return [
        Gate("private task", f"public-only {key} <= {PUBLIC_ONLY_MAX}", public,
             None if public is None else public <= PUBLIC_ONLY_MAX),
        Gate("learnable task", f"pooled-nodp {key} >= {POOLED_MIN}", pooled,
             None if pooled is None else pooled >= POOLED_MIN),
        Gate("beyond one site", f"pooled-nodp - local-nodp {key} >= {LOCAL_GAP_MIN}", gap,
             None if gap is None else gap >= LOCAL_GAP_MIN),
    ]


def verdict(gates: list[Gate]) -> str:
    """One plain sentence: whether this run can tell the methods apart, and why not."""
    failed = [g for g in gates if g.holds is False]
    missing = [g for g in gates if g.holds is None]
    if failed:
        return ("This run cannot tell the methods apart: " + "; ".join(
            f"the {g.name!r} gate fails ({g.rule}, measured {g.measured:.3f})" for g in failed) + ".")
    if missing:
        return ("The gates were not all measured (run the methods public-only, local-nodp and pooled-nodp): "
                "whether this run can tell the methods apart is unknown.")
    return "All validity gates hold: differences between methods can be read as differences of the methods."
