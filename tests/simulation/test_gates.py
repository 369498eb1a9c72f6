"""The validity gates read the reference runs' final Dice and say plainly when a run cannot tell methods apart."""

from __future__ import annotations

import math

from fedpir.simulation.gates import LOCAL_GAP_MIN, POOLED_MIN, PUBLIC_ONLY_MAX, mean_final, validity_gates, verdict


def finals(**dice_by_method: tuple[float, ...]) -> dict[str, dict[str, dict[str, float]]]:
    return {m: {f"site-{i}": {"dice": d} for i, d in enumerate(values)} for m, values in dice_by_method.items()}


def test_a_private_learnable_task_beyond_one_site_passes_every_gate() -> None:
    gates = validity_gates(finals(**{"public-only": (0.05, 0.15), "pooled-nodp": (0.7, 0.8), "local-nodp": (0.4, 0.5)}))
    assert [g.holds for g in gates] == [True, True, True]
    assert [round(g.measured, 6) for g in gates] == [0.1, 0.75, 0.3]
    assert verdict(gates).startswith("All validity gates hold")


def test_a_public_warm_start_that_solves_the_task_fails_the_first_gate_and_the_verdict_says_so() -> None:
    # the figures of the previous default benchmark: every method, public-only included, near 0.64
    gates = validity_gates(finals(**{"public-only": (0.6, 0.66), "pooled-nodp": (0.64, 0.65), "local-nodp": (0.64, 0.64)}))
    assert [g.holds for g in gates] == [False, True, False]
    text = verdict(gates)
    assert text.startswith("This run cannot tell the methods apart")
    assert f"the 'private task' gate fails (public-only dice <= {PUBLIC_ONLY_MAX}, measured 0.630)" in text
    assert "'beyond one site' gate fails" in text and "learnable" not in text


def test_thresholds_are_inclusive_and_nan_sites_are_left_out() -> None:
    gates = validity_gates(finals(**{"public-only": (PUBLIC_ONLY_MAX, math.nan), "pooled-nodp": (POOLED_MIN,),
                                     "local-nodp": (POOLED_MIN - LOCAL_GAP_MIN,)}))
    assert [g.holds for g in gates] == [True, True, True]
    assert mean_final(finals(**{"x": (math.nan,)}), "x") is None


def test_missing_references_are_not_measured_and_never_pass() -> None:
    gates = validity_gates(finals(fedpir=(0.9, 0.9)))
    assert [g.holds for g in gates] == [None, None, None] and all(g.measured is None for g in gates)
    assert "unknown" in verdict(gates) and "public-only" in verdict(gates)
    # one failure outweighs gates that were not measured
    assert verdict(validity_gates(finals(**{"public-only": (0.9,)}))).startswith("This run cannot tell")
