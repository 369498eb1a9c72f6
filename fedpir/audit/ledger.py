"""An auditor's independent check of a site's privacy ledger (``fedpir audit verify``).

Needs only the ledger file and the site's public key. For every entry (numbered by its 1-based line
in the file) it checks the rules:

- ``format``: the line is a JSON object; a private entry has every policy field (:data:`REQUIRED`);
- ``chain``: the entry links to the SHA-256 of the entry before it (the first to the genesis value);
- ``signature``: the site's Ed25519 signature over the entry verifies;
- ``history``: the accountant history is the previous private entry's history plus this round's
  ``steps`` at its ``noise_multiplier`` and ``sample_rate`` (nothing dropped, nothing rewritten);
- ``accountant``: the recorded accountant is one Opacus knows;
- ``epsilon``: Opacus, with the recorded accountant (RDP or PRV) and delta, gives the recorded epsilon
  from the recorded history;
- ``budget``: epsilon (recorded and recomputed) does not exceed the recorded budget;
- ``budget-growth``: the budget never grows from one private entry to the next;
- ``delta``: all private entries use one delta;
- ``guarantee``: the stated guarantee fits the noise share (``local-dp``: the site added the whole
  noise; ``distributed-dp-under-secagg``: it added ``noise_share`` of it under secure aggregation,
  and the recomputed epsilon, from the recorded full ``noise_multiplier``, is that of the sum of
  the sites' updates; see :mod:`fedpir.privacy.secure_aggregation`).

The accounting is recomputed here from the entries alone, not with the site's own code path
(:class:`fedpir.privacy.budget.PrivacyBudget`). Given the site's policy (or every policy it has had),
each entry is also checked against it, mechanisms recomputed from the policy
(:mod:`fedpir.audit.conformance`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from opacus.accountants import create_accountant

from fedpir.audit.conformance import policy_problems
from fedpir.privacy.policy import SitePolicy
from fedpir.privacy.secure_aggregation import DISTRIBUTED_DP, LOCAL_DP, guarantee_of
from fedpir.privacy.signing import GENESIS, check_entry, entry_hash

#: Fields every private entry must carry (what an auditor's policy is about).
REQUIRED: tuple[str, ...] = ("dp", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "accountant",
                             "epsilon", "delta", "epsilon_budget", "history")
#: Relative tolerance between the recorded and the recomputed epsilon.
EPSILON_RTOL = 1e-6


@dataclass
class Failure:
    """One broken rule at one entry (its 1-based line number)."""

    entry: int
    rule: str
    detail: str

    def line(self, ledger: Path | str) -> str:
        """The failure as one line of output."""
        return f"{ledger}: entry {self.entry}: {self.rule}: {self.detail}"


@dataclass
class AuditResult:
    """What :func:`verify_ledger` found."""

    ledger: str
    entries: int = 0
    private_rounds: int = 0
    non_private_rounds: int = 0
    epsilon: float | None = None
    epsilon_budget: float | None = None
    delta: float | None = None
    last_hash: str = GENESIS
    failures: list[Failure] = field(default_factory=list)
    #: SHA-256 of the policies the entries were checked against (none: the ledger rules only).
    policies: list[str] = field(default_factory=list)
    #: (line, epsilon recomputed, epsilon budget) of each private entry, for reports.
    rounds: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every rule holds at every entry."""
        return not self.failures

    @property
    def guarantee(self) -> float | None:
        """The epsilon that holds for everything the site released: infinite once any round ran
        without DP (its update carries no guarantee), else the private rounds' epsilon."""
        return math.inf if self.non_private_rounds else self.epsilon

    def summary(self) -> str:
        """One line: verdict, entries, epsilon spent of the budget, the hash to keep for the next audit."""
        verdict = "OK" if self.ok else f"FAILED ({len(self.failures)} failure{'s' * (len(self.failures) != 1)})"
        spent = (f"epsilon {self.epsilon:.6g} of budget {self.epsilon_budget:.6g} at delta {self.delta:g}"
                 if self.epsilon is not None and self.epsilon_budget is not None and self.delta is not None
                 else "no private rounds")
        warn = (f"; {self.non_private_rounds} non-private round(s): epsilon inf, no DP guarantee for the site's "
                "releases" if self.non_private_rounds else "")
        against = (f"; checked against policy {', '.join(h[:12] for h in self.policies)}" if self.policies
                   else "; no policy given (--policy): the ledger's own accounting only")
        return (f"{self.ledger}: {verdict}: {self.entries} entries, {self.private_rounds} private; {spent}{warn}"
                f"{against}; last hash {self.last_hash}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the result."""
        return {"ledger": self.ledger, "ok": self.ok, "entries": self.entries, "private_rounds": self.private_rounds,
                "non_private_rounds": self.non_private_rounds, "epsilon": self.epsilon,
                "epsilon_guarantee": "inf" if self.non_private_rounds else self.epsilon,
                "epsilon_budget": self.epsilon_budget, "delta": self.delta, "last_hash": self.last_hash,
                "policies": self.policies, "failures": [vars(f) for f in self.failures]}


def _composed(history: list[tuple[float, float, int]], sigma: float, rate: float, steps: int) -> list[tuple[float, float, int]]:
    """``history`` after ``steps`` more steps at (sigma, rate); consecutive equal mechanisms merge, as in Opacus."""
    out = list(history)
    if out and out[-1][:2] == (sigma, rate):
        out[-1] = (sigma, rate, out[-1][2] + steps)
    else:
        out.append((sigma, rate, steps))
    return out


def recompute_epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` with a fresh Opacus accountant (``"rdp"`` or ``"prv"``)."""
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta)) if acc.history else 0.0


def _check_guarantee(number: int, entry: dict[str, Any], result: AuditResult) -> None:
    """The entry's stated guarantee fits its noise share (entries written before secure aggregation
    state none: local DP). The epsilon is recomputed from ``noise_multiplier`` either way: under
    distributed noise that is the noise of the sum, the guarantee the entry states."""
    share = entry.get("noise_share", 1.0)
    guarantee = entry.get("guarantee", LOCAL_DP)
    if not (isinstance(share, int | float) and 0 < share <= 1) or guarantee != guarantee_of(float(share)):
        result.failures.append(Failure(number, "guarantee", f"guarantee {guarantee!r} does not fit noise share {share!r} "
                                                            f"(local-dp: 1; {DISTRIBUTED_DP}: below 1)"))


def _check_private(number: int, entry: dict[str, Any], state: dict[str, Any], result: AuditResult) -> None:
    """The accounting rules of one private entry; ``state`` carries the previous private entry's values."""
    fail = result.failures.append
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        fail(Failure(number, "format", f"private entry lacks {', '.join(missing)}"))
        return
    try:
        sigma, rate, steps = float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"])
        history = [(float(s), float(q), int(n)) for s, q, n in entry["history"]]
        recorded, delta, budget = float(entry["epsilon"]), float(entry["delta"]), float(entry["epsilon_budget"])
    except (TypeError, ValueError) as err:
        fail(Failure(number, "format", f"malformed private entry ({err})"))
        return
    _check_guarantee(number, entry, result)
    expected = _composed(state["history"], sigma, rate, steps)
    if steps < 1:
        fail(Failure(number, "history", f"a private round must count at least one step, got {steps}"))
    elif history != expected:
        fail(Failure(number, "history", f"accountant history {history} is not the previous one plus {steps} steps at "
                                        f"noise multiplier {sigma:g}, sample rate {rate:g} (expected {expected})"))
    state["history"] = history
    if state["delta"] is not None and delta != state["delta"]:
        fail(Failure(number, "delta", f"delta {delta:g} differs from the site's delta {state['delta']:g}"))
    state["delta"] = state["delta"] if state["delta"] is not None else delta
    if state["budget"] is not None and budget > state["budget"]:
        fail(Failure(number, "budget-growth", f"epsilon budget grew from {state['budget']:.6g} to {budget:.6g}"))
    state["budget"] = budget
    try:
        epsilon = recompute_epsilon(str(entry["accountant"]), history, delta)
    except ValueError as err:
        fail(Failure(number, "accountant", f"cannot recompute epsilon with accountant {entry['accountant']!r} ({err})"))
        epsilon = recorded
    else:
        if not math.isclose(epsilon, recorded, rel_tol=EPSILON_RTOL, abs_tol=1e-9):
            fail(Failure(number, "epsilon", f"recorded epsilon {recorded:.9g} but Opacus ({entry['accountant']}) gives "
                                            f"{epsilon:.9g} for the recorded history"))
    if max(epsilon, recorded) > budget * (1 + 1e-12):
        fail(Failure(number, "budget", f"epsilon {max(epsilon, recorded):.6g} exceeds the budget {budget:.6g}"))
    result.private_rounds += 1
    result.epsilon, result.epsilon_budget, result.delta = epsilon, budget, delta
    result.rounds.append((number, epsilon, budget))


def verify_ledger(path: Path | str, public_key: Ed25519PublicKey,
                  policies: Sequence[SitePolicy] = ()) -> AuditResult:
    """Check every rule at every entry of the ledger at ``path`` (and, given the site's ``policies``,
    every policy rule of :mod:`fedpir.audit.conformance`); OSError if it cannot be read."""
    path = Path(path)
    text = path.read_text()
    result = AuditResult(ledger=str(path), policies=[p.sha256 for p in policies])
    read: list[tuple[int, dict[str, Any]]] = []
    state: dict[str, Any] = {"history": [], "delta": None, "budget": None}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        result.entries += 1
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            entry, reason = None, f"unreadable JSON ({err})"
        else:
            reason = "" if isinstance(entry, dict) else "not a JSON object"
        if not isinstance(entry, dict):
            result.failures.append(Failure(number, "format", reason))
            result.last_hash = hashlib.sha256(line.encode()).hexdigest()
            continue
        for rule, detail in check_entry(entry, result.last_hash, public_key):
            result.failures.append(Failure(number, rule, detail))
        result.last_hash = entry_hash(entry)
        read.append((number, entry))
        if entry.get("dp"):
            _check_private(number, entry, state, result)
        else:
            result.non_private_rounds += 1
    if policies:
        result.failures += [Failure(*problem) for problem in policy_problems(read, policies)]
        result.failures.sort(key=lambda f: f.entry)
    return result
