"""An auditor's check of a ledger against the site's declared privacy policy (``fedpir audit verify --policy``).

The ledger rules (:mod:`fedpir.audit.ledger`) check that each entry's accounting is right for what it
records. These check that what it records is what the site's policy allows, recomputing each
mechanism's parameters from the policy rather than trusting the entry: a site whose code was
changed to release metrics with less noise, to report on fewer patients, or to train past its round
limits, writes entries that verify as a ledger but fail here. Each entry is checked against the
policy whose SHA-256 it records (a site that changed its policy is audited with every policy it had).

Rules (a failure names one):

- ``policy-hash``: the entry records the SHA-256 of one of the given policies;
- ``dp-required``: no training round without DP where the policy requires DP;
- ``max-rounds`` / ``max-rounds-per-day``: the training rounds up to this one, in the site's life and in
  the 24 hours before it (by the entries' signed timestamps), are within the policy's limits;
- ``min-noise-multiplier``, ``max-delta``, ``max-epsilon``, ``secret-noise``: a private entry's noise,
  delta, budget and noise source are within the policy;
- ``distributed-noise`` / ``min-own-noise-multiplier``: a round under distributed noise added the share
  the policy sets (``1/sqrt(distributed-noise-sites)``, never where the policy says 0) and at least
  the policy's own noise;
- ``release-mechanism``: a metric release is the policy's Gaussian mechanism: noise multiplier
  ``metric-noise-multiplier``, sample rate 1, one step per released metric;
- ``release-mode``: every metric it released is in ``noise`` mode under the policy;
- ``min-release-patients``: it summarized at least the policy's ``min-release-patients`` patients;
- ``alignment-statistics``: alignment statistics left only where the policy allows them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fedpir.privacy.policy import PolicyViolation, SitePolicy, check_round_limits
from fedpir.privacy.release import ALIGNMENT_OBJECTIVE, RELEASE_OBJECTIVE, mode_of, release_plan, spec_of
from fedpir.privacy.secure_aggregation import DISTRIBUTED_DP, noise_share

#: (rule, detail) of one broken policy rule.
Problem = tuple[str, str]


def _private_problems(entry: dict[str, Any], policy: SitePolicy) -> list[Problem]:
    """Noise, delta, budget and noise source of a private entry against the policy."""
    out: list[Problem] = []
    sigma, delta, budget = float(entry["noise_multiplier"]), float(entry["delta"]), float(entry["epsilon_budget"])
    if delta > policy.max_delta:
        out.append(("max-delta", f"delta {delta:g} > the policy's {policy.max_delta:g}"))
    if policy.max_epsilon is not None and budget > policy.max_epsilon:
        out.append(("max-epsilon", f"epsilon budget {budget:g} > the policy's {policy.max_epsilon:g}"))
    if entry.get("objective") == RELEASE_OBJECTIVE:
        return out
    if sigma < policy.min_noise_multiplier:
        out.append(("min-noise-multiplier", f"noise multiplier {sigma:.4g} < the policy's {policy.min_noise_multiplier:g}"))
    if policy.secret_noise_required and not entry.get("secret_noise", False):
        out.append(("secret-noise", "the round's noise was not drawn from the OS's entropy"))
    if entry.get("guarantee") == DISTRIBUTED_DP:
        share, sites = float(entry.get("noise_share", 1.0)), policy.distributed_noise_sites
        if sites == 0:
            out.append(("distributed-noise", "the site added only a share of the noise; its policy never allows it"))
        elif sites is not None and not math.isclose(share, noise_share(True, sites), rel_tol=1e-9):
            out.append(("distributed-noise", f"noise share {share:.4g}, the policy's is {noise_share(True, sites):.4g} "
                                             f"(1/sqrt({sites}))"))
        if sigma * share < policy.min_own_noise_multiplier:
            out.append(("min-own-noise-multiplier", f"own noise multiplier {sigma * share:.4g} < the policy's "
                                                    f"{policy.min_own_noise_multiplier:g}"))
    return out


def _release_problems(entry: dict[str, Any], policy: SitePolicy) -> list[Problem]:
    """A metric release recomputed from the policy: its mechanism, modes and patients."""
    out: list[Problem] = []
    metrics = [str(m) for m in entry.get("metrics", [])]
    plan = release_plan(policy, len(metrics))
    expected = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    recorded = (float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"]))
    if not metrics or recorded != expected:
        out.append(("release-mechanism", f"(noise multiplier, sample rate, steps) {recorded}, the policy's mechanism "
                                         f"for {len(metrics)} metric(s) is {expected}"))
    not_noised = [m for m in metrics if (spec := spec_of(m)) is None or mode_of(policy, m, spec) != "noise"]
    if not_noised:
        out.append(("release-mode", f"released {not_noised}, which the policy does not let leave noised"))
    patients = int(entry.get("n_patients", 0))
    if patients < policy.min_release_patients:
        out.append(("min-release-patients", f"summarized {patients} patients < the policy's {policy.min_release_patients}"))
    return out


def policy_problems(entries: Sequence[tuple[int, dict[str, Any]]],
                    policies: Sequence[SitePolicy]) -> list[tuple[int, str, str]]:
    """(line, rule, detail) of every policy rule broken by the ledger's ``entries`` ((line, entry), in
    order), each entry against the policy of ``policies`` whose SHA-256 it records."""
    by_hash = {p.sha256: p for p in policies}
    out: list[tuple[int, str, str]] = []
    trained: list[dict[str, Any]] = []  # the training rounds before this entry
    for number, entry in entries:
        policy = by_hash.get(str(entry.get("policy_sha256")))
        objective = entry.get("objective")
        training = objective not in (RELEASE_OBJECTIVE, ALIGNMENT_OBJECTIVE)
        before = list(trained)
        if training:
            trained.append(entry)
        if policy is None:
            out.append((number, "policy-hash", f"made under policy {entry.get('policy_sha256')}, none of the "
                                               f"{len(policies)} given"))
            continue
        try:
            problems = _entry_problems(entry, policy, objective, training, before)
        except (KeyError, TypeError, ValueError):  # a malformed entry: the ledger's format rule reports it
            continue
        out += [(number, rule, detail) for rule, detail in problems]
    return out


def _entry_problems(entry: dict[str, Any], policy: SitePolicy, objective: Any, training: bool,
                    before: list[dict[str, Any]]) -> list[Problem]:
    """The policy rules one entry breaks (``before``: the training rounds before it)."""
    problems: list[Problem] = []
    if training:
        if policy.dp_required and not entry.get("dp"):
            problems.append(("dp-required", "a training round without DP"))
        try:  # the site's own admission check, at the entry's signed time
            check_round_limits(policy, before, now=float(entry.get("timestamp", 0.0)))
        except PolicyViolation as err:
            problems.append((err.rule, err.detail))
    elif objective == ALIGNMENT_OBJECTIVE and not policy.alignment_statistics:
        problems.append(("alignment-statistics", "alignment statistics left; the policy does not allow them"))
    if entry.get("dp"):
        problems += _private_problems(entry, policy)
        if objective == RELEASE_OBJECTIVE:
            problems += _release_problems(entry, policy)
    return problems
