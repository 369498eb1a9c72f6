"""What may leave a site in a reply's metrics: declared here, once; everything else is dropped.

:data:`METRICS` names every metric a site may send and what it is. *Public* metrics are facts of
the site's configuration or accounting (epsilon spent, the number of patients the server weights
with, which modalities the site holds) and leave exactly. *Patient-derived* metrics (losses, Dice,
PSNR, ...) leave only as the site's policy says (:class:`fedpir.privacy.policy.SitePolicy`,
``metrics``; the declared default where the policy names none):

- ``drop``: never leaves;
- ``round``: clipped to its declared range and rounded to its declared step (coarsened: this bounds
  what one reply reveals, it is no DP guarantee);
- ``noise``: clipped to its range, plus Gaussian noise of standard deviation
  ``metric-noise-multiplier`` x its sensitivity (the range divided by the patients it averages over,
  or the whole range for a metric that is not a per-patient mean), drawn from the OS's entropy, and
  clipped to the range again. Each
  noised value is one Gaussian mechanism; the site's accountant counts it (noise multiplier, sample
  rate 1, one step per value) and the ledger records it (objective ``release``) before anything
  leaves, so the epsilon `fedpir audit verify` recomputes includes it; past the budget, nothing
  patient-derived leaves;
- ``exact``: leaves as computed (research policy, or a hospital's explicit choice).

A value that is missing (NaN) under ``round`` or ``noise`` leaves as its range's low end, so the set
of keys a reply carries never depends on the data (a missing Dice would tell a lesion-free held-out
set). No patient-derived metric leaves when it summarizes fewer patients than the policy's
``min-release-patients``.

:class:`EvaluationAllowance` rate-limits evaluate requests: at most ``evaluations-per-round`` per
local training round, counted in the state folder so a restarted node keeps counting.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpir.privacy.at_rest import PLAINTEXT, StateCipher, read_private, write_private
from fedpir.privacy.budget import PrivacyBudget
from fedpir.privacy.dp import RoundPlan
from fedpir.privacy.policy import SitePolicy
from fedpir.wire.protocol import HAS_MODALITY_PREFIX, NUM_EXAMPLES_KEY

log = logging.getLogger("fedpir.client")

#: The ledger objective of a metric release, and of a release of alignment statistics
#: (:mod:`fedpir.client.alignment`): ledger entries that are no training round.
RELEASE_OBJECTIVE, ALIGNMENT_OBJECTIVE = "release", "alignment"


@dataclass(frozen=True)
class MetricSpec:
    """A metric a site may send: public or patient-derived; for the latter its range, rounding step,
    whether it is a mean of bounded per-patient values, and its mode when the policy names none."""

    patient: bool
    low: float = 0.0
    high: float = 1.0
    step: float = 0.05
    per_patient_mean: bool = True
    default: str = "round"

    def sensitivity(self, n_patients: int) -> float:
        """How much one patient can move the clipped value."""
        span = self.high - self.low
        return span / max(n_patients, 1) if self.per_patient_mean else span


_PUBLIC = MetricSpec(patient=False)
_TRAIN_LOSS = MetricSpec(patient=True, high=10.0, step=0.1, per_patient_mean=False, default="drop")
#: Every metric that may leave a site; names ending in "." or "_" are prefixes.
METRICS: dict[str, MetricSpec] = {
    NUM_EXAMPLES_KEY: _PUBLIC,
    HAS_MODALITY_PREFIX: _PUBLIC,
    "dp": _PUBLIC,
    "epsilon": _PUBLIC,
    "delta": _PUBLIC,
    "steps": _PUBLIC,
    # wall time of the round's local training: the server times every reply anyway (timing is outside
    # the threat model), and the cost benchmarks split a round with it
    "seconds": _PUBLIC,
    "loss_": _TRAIN_LOSS,
    "dice": MetricSpec(patient=True),
    "ssim": MetricSpec(patient=True, low=-1.0),
    "accuracy": MetricSpec(patient=True),
    "auroc": MetricSpec(patient=True, per_patient_mean=False),
    "psnr": MetricSpec(patient=True, high=60.0, step=1.0, per_patient_mean=False),
    "loss": MetricSpec(patient=True, high=10.0, step=0.1, per_patient_mean=False, default="drop"),
}


def spec_of(name: str) -> MetricSpec | None:
    """The declaration of a metric (exact name, else a declared prefix), None if undeclared."""
    if name in METRICS:
        return METRICS[name]
    return next((s for p, s in METRICS.items() if p[-1] in "._" and name.startswith(p)), None)


def mode_of(policy: SitePolicy, name: str, spec: MetricSpec) -> str:
    """How ``name`` leaves under ``policy``: the policy's mode for it, its ``*``, else the declared default."""
    if not spec.patient:
        return "exact"
    prefix = next((p for p in METRICS if p[-1] in "._" and name.startswith(p)), name)
    return policy.metrics.get(name, policy.metrics.get(prefix, policy.metrics.get("*", spec.default)))


def release(metrics: dict[str, float | int], policy: SitePolicy, *, n_patients: int,
            budget: PrivacyBudget | None, message: str) -> dict[str, float | int]:
    """The metrics that may leave, each as the policy says; undeclared ones are dropped (logged).
    ``n_patients``: how many patients the patient-derived values average over; ``budget``: the
    site's, which pays for ``noise`` mode (without one, noised metrics are dropped)."""
    out: dict[str, float | int] = {}
    noised: dict[str, tuple[float, MetricSpec]] = {}
    too_few = n_patients < policy.min_release_patients
    for name, value in metrics.items():
        spec = spec_of(name)
        if spec is None:
            log.debug("metric %s is not declared releasable; kept at the site", name)
            continue
        mode = mode_of(policy, name, spec)
        if mode == "exact":
            out[name] = value
            continue
        if mode == "drop" or too_few:
            continue
        if not math.isfinite(value):
            # A missing value (NaN: the Dice of a held-out set without a lesion, an AUROC of one class)
            # leaves as its range's low end, so the keys that leave never depend on the data.
            value = spec.low
        if mode == "round":
            clipped = min(max(float(value), spec.low), spec.high)
            out[name] = round(round(clipped / spec.step) * spec.step, 10)
        else:
            noised[name] = (float(value), spec)
    if noised:
        out.update(_noised(noised, policy, n_patients, budget, message))
    return out


def release_plan(policy: SitePolicy, n_metrics: int) -> RoundPlan:
    """The Gaussian mechanism of releasing ``n_metrics`` noised metrics under ``policy``, as accounted:
    its metric noise multiplier, sample rate 1, one step per metric."""
    return RoundPlan(sample_rate=1.0, steps=n_metrics, noise_multiplier=policy.metric_noise_multiplier, max_grad_norm=1.0)


def _noised(values: dict[str, tuple[float, MetricSpec]], policy: SitePolicy, n_patients: int,
            budget: PrivacyBudget | None, message: str) -> dict[str, float]:
    """Gaussian-noised values, paid for in the site's budget and ledger first; {} if it cannot pay."""
    sigma = policy.metric_noise_multiplier
    plan = release_plan(policy, len(values))
    if budget is None:
        log.warning("%d metric(s) to noise but the site trains without DP, so nothing accounts them: dropped",
                    len(values))
        return {}
    try:
        budget.spend(plan, objective=RELEASE_OBJECTIVE, message=message, metrics=sorted(values),
                     n_patients=n_patients)
    except RuntimeError as err:  # BudgetExceededError: the metrics stay at the site
        log.warning("noised metrics %s not released: %s", sorted(values), err)
        return {}
    rng = np.random.default_rng(secrets.randbits(128))
    out = {}
    for name, (value, spec) in values.items():
        noisy = min(max(value, spec.low), spec.high) + rng.normal(0.0, sigma * spec.sensitivity(n_patients))
        out[name] = float(min(max(noisy, spec.low), spec.high))  # post-processing: no privacy cost
    return out


def training_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ledger entries of local training rounds (metric and alignment releases are no rounds)."""
    return [e for e in entries if e.get("objective") not in (RELEASE_OBJECTIVE, ALIGNMENT_OBJECTIVE)]


class EvaluationAllowance:
    """At most ``per_round`` evaluations per local training round, counted in ``state_dir`` (a private
    file, encrypted with the site's state key like the rest of its state)."""

    FILE = "evaluations.json"

    def __init__(self, state_dir: Path, per_round: int, cipher: StateCipher = PLAINTEXT) -> None:
        self.path, self.per_round, self.cipher = Path(state_dir) / self.FILE, per_round, cipher

    def take(self, trained_rounds: int) -> bool:
        """Count one evaluation after ``trained_rounds`` training rounds; False when over the limit."""
        state = json.loads(read_private(self.path, self.cipher)) if self.path.is_file() else {}
        used = state.get("evaluations", 0) if state.get("trained_rounds") == trained_rounds else 0
        if used >= self.per_round:
            return False
        write_private(self.path, json.dumps({"trained_rounds": trained_rounds, "evaluations": used + 1}).encode(),
                      self.cipher)
        return True
