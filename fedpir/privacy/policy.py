"""A site's privacy policy: what the hospital allows the federation's server to ask of it.

The policy is the hospital's, not the server's: a SuperNode names its file in the node config
(``--node-config "... privacy-policy=/etc/fedpir/policy.toml"``); the run config never sets it. A
hospital's node that names none gets :data:`DEFAULT_POLICY` (DP required, epsilon at most 8, shared
keys only, secret noise, patient-derived metrics rounded or dropped, one evaluation per training
round, no alignment statistics); the simulation engine's nodes (synthetic sites) get :data:`RESEARCH_POLICY`.

The file is TOML (``.toml``) or JSON, with the hyphenated keys of :class:`SitePolicy`; an annotated
example is ``deploy/privacy_policy.example.toml``.

Every request (the run settings a round uses) is checked with :func:`check_request` and, once the
site's ledger and data are known, :func:`check_plan`; a request outside the policy raises
:class:`PolicyViolation` naming the rule, and the site replies with that rule only. The policy's
SHA-256 (:attr:`SitePolicy.sha256`) and the site's budget (:func:`site_budget`) are recorded in
every ledger entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedpir.models.groups import KEY_POLICIES
from fedpir.privacy.budget import PrivacyBudget, PrivacyLedger
from fedpir.privacy.secure_aggregation import noise_share
from fedpir.run_config import RunSettings

#: The node-config key that names the policy file.
POLICY_NODE_KEY = "privacy-policy"
#: How a patient-derived metric may leave (see :mod:`fedpir.privacy.release`).
METRIC_MODES: tuple[str, ...] = ("drop", "round", "noise", "exact")


class PolicyViolation(Exception):
    """A server request outside the site's policy: ``rule`` is the public name of the broken rule,
    ``detail`` (values, for the site's log only) says how."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule, self.detail = rule, detail
        super().__init__(f"refused by the site's privacy policy, rule {rule}: {detail}")


def _typed(key: str, value: Any, kind: type) -> Any:
    """``value`` of a policy file's ``key`` if it has the type of the field's default (ValueError naming both)."""
    numbers = isinstance(value, int | float) and not isinstance(value, bool)
    wanted = {bool: ("true or false", isinstance(value, bool)),
              float: ("a number", numbers),
              int: ("a whole number", isinstance(value, int) and not isinstance(value, bool)),
              tuple: ('a list of names, for example ["fedpir"]',
                      isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)),
              dict: ('a table of metric names to modes, for example {dice = "round"}',
                     isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values()))}
    description, ok = wanted[kind]
    if not ok:
        raise ValueError(f"privacy policy: {key} must be {description}, got {value!r}")
    return float(value) if kind is float else value


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts from the server. Fields map to hyphenated keys of the policy file.

    Attributes:
        dp_required: every training round runs DP-SGD (a request with ``dp = false`` is refused).
        max_epsilon: the site's lifetime budget; None (research policy only) takes the first run's.
            Once recorded in the ledger it can only be lowered.
        max_delta: the largest delta the site's guarantee may have.
        min_noise_multiplier: the smallest DP-SGD noise multiplier a round may use.
        max_rounds: the most training rounds of the site's life (a run may ask for at most this
            many), and the rounds over which it plans its DP noise whatever the server's round
            count, so that neither a huge round count nor a huge fixed noise can make rounds (and
            the evaluations they unlock) nearly free. None (research policy only): the run's rounds.
        max_rounds_per_day: the most training rounds in any 24 hours (counted from the ledger's
            signed timestamps), so that a site's life, and the evaluations each round unlocks (at most
            this many x ``evaluations_per_round`` a day), cannot be spent in one burst. A round past it
            is refused (the run goes on without the site) and can be trained once the window has moved.
            None: no daily limit (research policy).
        key_policies: the key policies (which weights leave) the site accepts; ``fedpir`` is
            shared-only.
        secret_noise_required: the noise must be drawn from the OS's entropy, never from the seed.
        evaluations_per_round: evaluate requests answered per local training round.
        metric_noise_multiplier: Gaussian noise (in units of a metric's sensitivity) of the
            metrics released in ``noise`` mode.
        min_release_patients: the fewest patients a patient-derived metric may summarize: a site
            whose held-out set (fixed for its life) is smaller releases none of them, whatever it
            computes (a mean over one or two patients is nearly one patient's value).
        distributed_noise_sites: under secure aggregation and ``distributed-noise``, the number of
            sites this site splits its DP noise with: it adds noise of std ``sigma / sqrt(this)``,
            whatever the server asks, and takes part only in runs whose server needs at least this
            many contributing sites (``min-sites``); its guarantee against the server then rests on
            SecAgg+ and on that many honest sites (:mod:`fedpir.privacy.secure_aggregation`). 0: the
            site never adds less than the whole noise. None (research policy only): the server's
            ``min-sites``.
        min_own_noise_multiplier: under distributed noise, the smallest noise multiplier of the
            noise this site adds itself (its protection if SecAgg+ or the other sites fail it).
        metrics: per patient-derived metric, how it may leave (:data:`METRIC_MODES`): by name
            (``dice``), by declared prefix (``loss_``: every training loss term) or ``*`` (all);
            metrics not named take the declared default of :data:`fedpir.privacy.release.METRICS`.
        alignment_statistics: the site answers the alignment stage's request for the sufficient
            statistics of its anchors (sums over its training patients' image and report
            embeddings, :mod:`fedpir.alignment.records`). They are not differentially private, so
            the default refuses them.
    """

    dp_required: bool = True
    max_epsilon: float | None = 8.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    max_rounds: int | None = 32
    max_rounds_per_day: int | None = 32
    key_policies: tuple[str, ...] = ("fedpir",)
    secret_noise_required: bool = True
    evaluations_per_round: int = 1
    metric_noise_multiplier: float = 20.0
    min_release_patients: int = 3
    distributed_noise_sites: int | None = 0
    min_own_noise_multiplier: float = 0.3
    metrics: Mapping[str, str] = field(default_factory=dict)
    alignment_statistics: bool = False

    def __post_init__(self) -> None:
        if self.max_epsilon is not None and not 0 < self.max_epsilon < math.inf:
            raise ValueError(f"privacy policy: max-epsilon must be a positive number, got {self.max_epsilon}")
        if not 0 < self.max_delta < 1:
            raise ValueError(f"privacy policy: max-delta must be in (0, 1), got {self.max_delta}")
        if self.min_noise_multiplier < 0 or self.metric_noise_multiplier <= 0:
            raise ValueError("privacy policy: min-noise-multiplier must be >= 0 and metric-noise-multiplier > 0")
        if self.distributed_noise_sites is not None and self.distributed_noise_sites < 0:
            raise ValueError(f"privacy policy: distributed-noise-sites must be >= 0, got {self.distributed_noise_sites}")
        if self.min_own_noise_multiplier < 0:
            raise ValueError(f"privacy policy: min-own-noise-multiplier must be >= 0, got {self.min_own_noise_multiplier}")
        for name, rounds in (("max-rounds", self.max_rounds), ("max-rounds-per-day", self.max_rounds_per_day)):
            if rounds is not None and rounds < 1:
                raise ValueError(f"privacy policy: {name} must be >= 1, got {rounds}")
        if self.evaluations_per_round < 0 or self.min_release_patients < 0:
            raise ValueError("privacy policy: evaluations-per-round and min-release-patients must be >= 0, got "
                             f"{self.evaluations_per_round} and {self.min_release_patients}")
        unknown = [k for k in self.key_policies if k not in KEY_POLICIES]
        if unknown:
            raise ValueError(f"privacy policy: unknown key policies {unknown}; valid: {', '.join(KEY_POLICIES)}")
        bad = {k: v for k, v in self.metrics.items() if v not in METRIC_MODES}
        if bad:
            raise ValueError(f"privacy policy: metric modes {bad} unknown; valid: {', '.join(METRIC_MODES)}")
        object.__setattr__(self, "key_policies", tuple(self.key_policies))
        object.__setattr__(self, "metrics", dict(self.metrics))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SitePolicy:
        """A policy from a file's keys (hyphenated); an unknown key, or a value of the wrong type, is an
        error naming it. A file cannot leave ``max-epsilon`` open (None is the research policy's, in code)."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"privacy policy: unknown key {key!r}; known: "
                                 f"{', '.join(sorted(k.replace('_', '-') for k in known))}")
            kwargs[name] = _typed(key, value, type(getattr(cls, name, None)) if name != "metrics" else dict)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """The policy as its file's keys."""
        return {k.replace("_", "-"): (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @property
    def sha256(self) -> str:
        """SHA-256 of the policy's canonical JSON: which policy a ledger entry was made under."""
        return hashlib.sha256(json.dumps(self.to_mapping(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


#: The policy of a node that names none.
DEFAULT_POLICY = SitePolicy()
#: For simulated sites whose (synthetic) data the researcher owns: anything the run asks, metrics exact.
#: Never for a hospital: only nodes of the simulation engine get it (see policy_of_node).
RESEARCH_POLICY = SitePolicy(dp_required=False, max_epsilon=None, max_delta=0.5, min_noise_multiplier=0.0, max_rounds=None,
                             max_rounds_per_day=None,
                             key_policies=KEY_POLICIES, secret_noise_required=False, evaluations_per_round=1_000_000,
                             min_release_patients=0,
                             distributed_noise_sites=None, min_own_noise_multiplier=0.0,
                             metrics={"*": "exact"}, alignment_statistics=True)


def load_policy(path: Path | str) -> SitePolicy:
    """The policy in a TOML (``.toml``) or JSON file; ValueError/OSError with the reason if unusable."""
    path = Path(path).expanduser()
    text = path.read_text()
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable privacy policy ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a privacy policy is a table of keys")
    try:
        return SitePolicy.from_mapping(values)
    except TypeError as err:
        raise ValueError(f"{path}: {err}") from err


def policy_of_node(node_config: Mapping[str, Any]) -> SitePolicy:
    """The policy a node config names (``privacy-policy``); else :data:`DEFAULT_POLICY` for a
    hospital's node (``data-dir``) and :data:`RESEARCH_POLICY` for a node of Flower's simulation
    engine (``partition-id`` without ``data-dir``: the researcher's synthetic sites)."""
    named = node_config.get(POLICY_NODE_KEY)
    if named:
        return load_policy(str(named))
    return RESEARCH_POLICY if "partition-id" in node_config and "data-dir" not in node_config else DEFAULT_POLICY


def recorded_budget(ledger: PrivacyLedger) -> float | None:
    """The smallest site budget the ledger's entries recorded (None before the first entry)."""
    budgets = [float(e["site_budget"]) for e in ledger.entries if e.get("site_budget") is not None]
    return min(budgets) if budgets else None


def site_budget(policy: SitePolicy, ledger: PrivacyLedger, requested: float) -> float:
    """The site's lifetime epsilon budget: the policy's maximum, never above what the ledger recorded
    (a budget only lowers); with neither (research policy, new site), the run's request."""
    bounds = [b for b in (policy.max_epsilon, recorded_budget(ledger)) if b is not None]
    return min(bounds) if bounds else requested


def bind_budget(policy: SitePolicy, ledger: PrivacyLedger, budget: PrivacyBudget | None, requested: float) -> None:
    """Bind a site's budget to its policy and ledger (:func:`site_budget`; it only lowers) and stamp
    every new ledger entry with the policy's hash and that budget."""
    if budget is not None:
        budget.epsilon_budget = site_budget(policy, ledger, requested)
    ledger.stamp = {"policy_sha256": policy.sha256, "site_budget": budget.epsilon_budget if budget else None}


def noise_sites(policy: SitePolicy, settings: RunSettings) -> int:
    """How many sites this site splits its noise with under distributed noise: its policy's number,
    the server's ``min-sites`` only where the policy leaves it open (research); 0: it never does."""
    return settings.min_sites if policy.distributed_noise_sites is None else policy.distributed_noise_sites


def site_settings(policy: SitePolicy, settings: RunSettings) -> RunSettings:
    """The run settings as this site runs them: its planned DP noise spreads the budget over its
    policy's ``max-rounds``, and under distributed noise its noise share comes from its policy
    (:func:`noise_sites`), not from the server's round count and ``min-sites``."""
    if policy.max_rounds is not None:
        settings = replace(settings, dp_rounds=policy.max_rounds)
    return replace(settings, min_sites=noise_sites(policy, settings)) if settings.distributed_noise else settings


def check_request(policy: SitePolicy, settings: RunSettings) -> None:
    """Raise :class:`PolicyViolation` if the run settings ask for what the policy forbids (the
    settings alone; :func:`check_plan` checks what depends on the site's ledger and data)."""
    if policy.dp_required and not settings.dp:
        raise PolicyViolation("dp-required", "the server asked for a round without DP")
    if settings.key_policy not in policy.key_policies:
        raise PolicyViolation("key-policy", f"key policy {settings.key_policy!r} not in {list(policy.key_policies)}")
    if settings.dp and policy.secret_noise_required and not settings.secret_noise:
        raise PolicyViolation("secret-noise", "the server asked for noise replayable from the run's seed")
    if settings.dp and settings.delta > policy.max_delta:
        raise PolicyViolation("max-delta", f"delta {settings.delta:g} > {policy.max_delta:g}")
    rounds = settings.pretrain_rounds + settings.finetune_rounds
    if policy.max_rounds is not None and rounds > policy.max_rounds:
        raise PolicyViolation("max-rounds", f"the run asks for {rounds} rounds > {policy.max_rounds}")
    if settings.distributed_noise:
        sites = noise_sites(policy, settings)
        if not sites:
            raise PolicyViolation("distributed-noise", "the server asked the site to add only its share of the DP noise")
        if settings.min_sites < sites:
            raise PolicyViolation("distributed-noise", f"the run needs only {settings.min_sites} contributing sites; this "
                                                       f"site splits its noise only with at least {sites}")
    if settings.dp and policy.max_epsilon is not None and settings.epsilon_budget > policy.max_epsilon:
        raise PolicyViolation("max-epsilon", f"epsilon budget {settings.epsilon_budget:g} > {policy.max_epsilon:g}")


#: The window of ``max-rounds-per-day``, in seconds.
DAY_SECONDS = 86_400.0


def check_round_limits(policy: SitePolicy, trained: list[dict[str, Any]], now: float | None = None) -> None:
    """Raise :class:`PolicyViolation` once the site has trained (``trained``: its ledger's training
    entries) the rounds its policy allows in its life, or in the 24 hours before ``now`` (default: the clock)."""
    if policy.max_rounds is not None and len(trained) >= policy.max_rounds:
        raise PolicyViolation("max-rounds", f"the site has trained the {policy.max_rounds} rounds its policy allows")
    if policy.max_rounds_per_day is not None:
        now = time.time() if now is None else now
        recent = sum(1 for e in trained if now - float(e.get("timestamp", 0.0)) < DAY_SECONDS)
        if recent >= policy.max_rounds_per_day:
            raise PolicyViolation("max-rounds-per-day", f"the site has trained {recent} rounds in the last 24 hours, "
                                                        f"its policy's limit {policy.max_rounds_per_day}")


def check_plan(policy: SitePolicy, settings: RunSettings, *, budget: float, delta: float | None,
               noise_multiplier: float | None) -> None:
    """Raise :class:`PolicyViolation` if a DP round's resolved figures break the policy: the run's
    epsilon above the site's (ledger-bound) budget, the site's delta, the planned noise multiplier."""
    if settings.epsilon_budget > budget:
        raise PolicyViolation("max-epsilon", f"epsilon budget {settings.epsilon_budget:g} > the site's budget "
                                             f"{budget:g} (recorded in its ledger; a budget only lowers)")
    if delta is not None and delta > policy.max_delta:
        raise PolicyViolation("max-delta", f"the site's delta {delta:g} > {policy.max_delta:g}")
    if noise_multiplier is not None and noise_multiplier < policy.min_noise_multiplier:
        raise PolicyViolation("min-noise-multiplier",
                              f"noise multiplier {noise_multiplier:.4g} < {policy.min_noise_multiplier:g}")
    own = None if noise_multiplier is None else noise_multiplier * noise_share(settings.distributed_noise, settings.min_sites)
    if own is not None and settings.distributed_noise and own < policy.min_own_noise_multiplier:
        raise PolicyViolation("min-own-noise-multiplier",
                              f"this site's own noise multiplier {own:.4g} < {policy.min_own_noise_multiplier:g}")
