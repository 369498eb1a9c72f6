"""A site's privacy budget and its persistent ledger of the epsilon spent.

The ledger is a JSON-lines file in the site's state folder, one entry per local round (pretraining
and fine-tuning alike). A private entry holds the round (stage, steps, sample rate, noise
multiplier, clipping bound, which guarantee it gives: ``guarantee`` and ``noise_share``, see
:mod:`fedpir.privacy.secure_aggregation`), the epsilon after the round and the accountant's full history
``[(noise_multiplier, sample_rate, steps), ...]``, so that a restarted client rebuilds the Opacus
accountant from the last entry and epsilon keeps accumulating. A non-private round is recorded as
``"dp": false`` without an epsilon: the site then has no DP guarantee for what it released, and
:attr:`PrivacyLedger.non_private_rounds` says so. Entries are hash-chained and signed with the site's
Ed25519 key (:mod:`fedpir.privacy.signing`); a ledger that does not verify stops training, and
``fedpir audit verify`` lets an auditor check it, epsilon included, with the site's public key.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opacus.accountants import IAccountant, create_accountant

from fedpir.privacy.at_rest import PLAINTEXT, StateCipher, StateKeyError, private_dir
from fedpir.privacy.dp import RoundPlan
from fedpir.privacy.secure_aggregation import guarantee_of
from fedpir.privacy.signing import (
    GENESIS,
    HEAD_NAME,
    SIGNING_KEY_NAME,
    check_entry,
    check_head,
    create_signing_key,
    entry_hash,
    load_signing_key,
    public_key_path,
    seal,
    sign_head,
)

LEDGER_NAME = "privacy_ledger.jsonl"

History = list[tuple[float, float, int]]


class BudgetExceededError(RuntimeError):
    """A round was refused because it would take the site past its epsilon budget."""

    def __init__(self, *, spent: float, would_reach: float, budget: float, delta: float) -> None:
        self.spent, self.would_reach, self.budget, self.delta = spent, would_reach, budget, delta
        super().__init__(
            f"privacy budget exceeded: epsilon spent so far {spent:.4g}, this round would reach "
            f"{would_reach:.4g} > budget {budget:.4g} (delta={delta:g}); round refused, "
            "model, optimizer and ledger unchanged"
        )


class LedgerError(ValueError):
    """The ledger file cannot be trusted (unparseable line, broken chain or signature, inconsistent
    delta, missing while the site has trained state): training stops until the site's admin acts."""


#: Files in a state folder that exist only after the site has trained: with one of them and no
#: ledger, the record of what was spent is gone (deleted, or moved away) and training must stop.
TRAINED_STATE_MARKERS: tuple[str, ...] = ("local_state.pt",)


class PrivacyLedger:
    """Append-only, hash-chained and signed record of a site's local rounds, in memory or in ``path``.

    Each entry links to the one before it and is signed with the site's Ed25519 key (see
    :mod:`fedpir.privacy.signing`): ``key_path``, by default ``ledger_signing.key`` next to the ledger,
    created (0600, folder 0700, encrypted under ``cipher``) with the first entry. The ledger file
    itself is 0600 and plaintext (see :mod:`fedpir.privacy.at_rest`). Loading an existing ledger verifies every link
    and signature and raises :class:`LedgerError` naming the line and the rule at the first failure.
    Every write also seals the ledger's head (entry count and last hash, signed: :data:`HEAD_NAME`
    beside it, written with the key), and every load checks that the ledger still reaches that head:
    a ledger cut back or restored alone from an older backup, or deleted while its key stays, is
    refused in every process that loads it, not only in the one that wrote it. Only restoring the whole
    state folder (key and head too) can go back, and starting afresh means a new key, a new identity
    that the auditor sees (``fedpir site reset``). An in-memory ledger signs with a throwaway key.
    """

    def __init__(self, path: Path | None = None, *, key_path: Path | None = None,
                 cipher: StateCipher = PLAINTEXT) -> None:
        self.path = Path(path) if path is not None else None
        self.cipher = cipher
        self.key_path = Path(key_path) if key_path is not None else (
            self.path.parent / SIGNING_KEY_NAME if self.path is not None else None)
        self._key: Ed25519PrivateKey | None = Ed25519PrivateKey.generate() if self.path is None else None
        self.entries: list[dict[str, Any]] = []
        self.last_hash = GENESIS
        #: Fields stamped on every new entry (the site's policy hash and budget: fedpir.privacy.policy).
        self.stamp: dict[str, Any] = {}
        if self.path is None:
            return
        if not self.path.exists():
            self._check_head()
            return
        lines: list[tuple[int, dict[str, Any]]] = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise LedgerError(f"{self.path}:{number}: unreadable ledger entry ({err})") from err
        if not lines:
            return
        assert self.key_path is not None
        if not any(isinstance(e, dict) and "signature" in e for _, e in lines):
            raise LedgerError(f"{self.path}: the ledger's entries are not signed (written before ledgers were signed), "
                              "so what the site spent cannot be verified; archive the state folder and start the "
                              "site afresh, with the admin's and the auditor's agreement, before training")
        if not self.key_path.is_file():
            raise LedgerError(f"{self.path}: the ledger has entries but its signing key {self.key_path} is missing; "
                              "restore the key (or pass its path) before training")
        self._key = self._load_key()
        public = self._key.public_key()
        for number, entry in lines:
            problems = check_entry(entry, self.last_hash, public) if isinstance(entry, dict) else [
                ("format", "not a JSON object")]
            if problems:
                rule, detail = problems[0]
                raise LedgerError(f"{self.path}: entry {number} breaks the {rule} rule: {detail}; "
                                  "the ledger cannot be trusted, training stops (audit it with `fedpir audit verify`)")
            self.entries.append(entry)
            self.last_hash = entry_hash(entry)
        self._check_head()

    @property
    def head_path(self) -> Path | None:
        """Where the ledger's sealed head lives (None in memory)."""
        return self.path.with_name(HEAD_NAME) if self.path is not None else None

    def _check_head(self) -> None:
        """Raise LedgerError unless the loaded entries reach the sealed head (none is needed before the key exists)."""
        assert self.path is not None and self.key_path is not None and self.head_path is not None
        if not self.key_path.is_file():
            return
        reset = (f"restore the state folder's {LEDGER_NAME} and {HEAD_NAME} together, or retire this identity "
                 f"with `fedpir site reset --state-dir {self.path.parent} --reason TEXT`")
        if not self.head_path.is_file():
            raise LedgerError(f"{self.path}: the site's signing key exists but the ledger's sealed head {HEAD_NAME} "
                              f"is missing, so the ledger may have been cut or replaced; {reset}")
        try:
            sealed = json.loads(self.head_path.read_text())
            count, head = check_head(sealed, (self._key or self._load_key()).public_key())
        except (ValueError, json.JSONDecodeError) as err:
            raise LedgerError(f"{self.head_path}: {err}; {reset}") from None
        reached = len(self.entries) >= count and (
            count == 0 and head == GENESIS or count > 0 and entry_hash(self.entries[count - 1]) == head)
        if not reached:
            raise LedgerError(f"{self.path}: the ledger ({len(self.entries)} entries) does not reach its sealed head "
                              f"({count} entries): it was cut back or restored from an older copy, and the privacy "
                              f"spent since would be forgotten; {reset}")

    def _seal_head(self) -> None:
        """Write the sealed head of the entries so far (0600, atomically, fsynced)."""
        assert self.head_path is not None
        data = json.dumps(sign_head(len(self.entries), self.last_hash, self._signing_key())).encode()
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.head_path)

    @classmethod
    def in_dir(cls, state_dir: Path | None, *, key_path: Path | None = None,
               cipher: StateCipher = PLAINTEXT) -> PrivacyLedger:
        """The ledger of a site state folder (created on first write), or an in-memory one.

        Raises LedgerError if the folder has trained state (:data:`TRAINED_STATE_MARKERS`) but no
        ledger entries: the site's record of what it spent is gone.
        """
        if state_dir is None:
            return cls(None)
        ledger = cls(Path(state_dir) / LEDGER_NAME, key_path=key_path, cipher=cipher)
        trained = [name for name in TRAINED_STATE_MARKERS if (Path(state_dir) / name).exists()]
        if trained and not ledger.entries:
            raise LedgerError(f"{state_dir}: the site has trained state ({', '.join(trained)}) but no privacy ledger "
                              f"({LEDGER_NAME} missing or empty); restore the ledger, or archive the state folder and "
                              "start the site afresh, before training")
        return ledger

    def _load_key(self) -> Ed25519PrivateKey:
        assert self.key_path is not None
        try:
            return load_signing_key(self.key_path, self.cipher)
        except StateKeyError:
            raise
        except ValueError as err:
            raise LedgerError(str(err)) from err

    def _signing_key(self) -> Ed25519PrivateKey:
        """The key entries are signed with (created, with the state folder made 0700, on first use)."""
        if self._key is None:
            assert self.key_path is not None and self.path is not None
            private_dir(self.path.parent)
            if self.key_path.is_file():
                self._key = self._load_key()
            else:  # a new identity: its head is sealed at once, so that a key never stands without one
                self._key = create_signing_key(self.key_path, self.cipher)
                self._seal_head()
        return self._key

    @property
    def public_key_path(self) -> Path | None:
        """The exported public key an auditor verifies the ledger with (None in memory)."""
        return public_key_path(self.key_path) if self.key_path is not None else None

    def append(self, entry: dict[str, Any]) -> None:
        """Add one round, chained and signed; written and fsynced before returning."""
        entry = seal({"timestamp": time.time(), **self.stamp, **entry}, self.last_hash, self._signing_key())
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.fchmod(fd, 0o600)  # also a ledger written before state files were private
            with os.fdopen(fd, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        self.entries.append(entry)
        self.last_hash = entry_hash(entry)
        if self.path is not None:
            self._seal_head()

    def extends(self, other: PrivacyLedger) -> bool:
        """Whether this ledger holds all of ``other``'s entries and more (``other`` is an older copy)."""
        n = len(other.entries)
        return len(self.entries) > n and (n == 0 or entry_hash(self.entries[n - 1]) == other.last_hash)

    @property
    def private_entries(self) -> list[dict[str, Any]]:
        """Entries of DP rounds."""
        return [e for e in self.entries if e.get("dp")]

    @property
    def non_private_rounds(self) -> int:
        """How many rounds ran without DP (each voids the site's guarantee)."""
        return sum(1 for e in self.entries if not e.get("dp"))

    @property
    def history(self) -> History:
        """Accountant history after the last private round (empty if none)."""
        private = self.private_entries
        return [tuple(h) for h in private[-1]["history"]] if private else []  # type: ignore[misc]

    @property
    def delta(self) -> float | None:
        """The delta the site's private rounds were accounted with, if any."""
        deltas = {e["delta"] for e in self.private_entries}
        if len(deltas) > 1:
            raise LedgerError(f"{self.path}: ledger mixes several deltas {sorted(deltas)}")
        return deltas.pop() if deltas else None


def _compose(history: History, plan: RoundPlan) -> History:
    """History after ``plan.steps`` more steps, merged like Opacus' accountants merge steps."""
    history = list(history)
    if history and history[-1][:2] == (plan.noise_multiplier, plan.sample_rate):
        sigma, rate, steps = history.pop()
        history.append((sigma, rate, steps + plan.steps))
    else:
        history.append((plan.noise_multiplier, plan.sample_rate, plan.steps))
    return history


def epsilon_of(accountant: IAccountant, delta: float) -> float:
    """Epsilon of an accountant's history (0 before any step)."""
    return float(accountant.get_epsilon(delta=delta)) if accountant.history else 0.0


class PrivacyBudget:
    """A site's (epsilon budget, delta) and the Opacus accountant that spends it.

    The accountant is rebuilt from the ledger; a private training run attaches it to its
    ``DPOptimizer`` (see :class:`fedpir.privacy.dp.PrivateModel`) so every noisy step is counted.
    """

    def __init__(
        self, epsilon_budget: float, delta: float, *, accountant: str = "rdp", ledger: PrivacyLedger | None = None
    ) -> None:
        if epsilon_budget <= 0 or not 0 < delta < 1:
            raise ValueError(f"need epsilon_budget > 0 and 0 < delta < 1, got {epsilon_budget}, {delta}")
        self.ledger = ledger if ledger is not None else PrivacyLedger()
        if self.ledger.delta is not None and self.ledger.delta != delta:
            raise LedgerError(
                f"the site's ledger was accounted with delta={self.ledger.delta:g}, not {delta:g}; "
                "a site keeps one delta"
            )
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self.accountant = create_accountant(accountant)
        self.accountant.history = self.ledger.history

    def spent(self) -> float:
        """Epsilon spent so far."""
        return epsilon_of(self.accountant, self.delta)

    def would_reach(self, plan: RoundPlan) -> float:
        """Epsilon after a round of ``plan`` (computed on a copy; nothing is spent)."""
        trial = copy.deepcopy(self.accountant)
        trial.history = _compose(trial.history, plan)
        return epsilon_of(trial, self.delta)

    def check(self, plan: RoundPlan) -> float:
        """Return the epsilon the round would reach, or raise BudgetExceededError."""
        reach = self.would_reach(plan)
        if reach > self.epsilon_budget:
            raise BudgetExceededError(
                spent=self.spent(), would_reach=reach, budget=self.epsilon_budget, delta=self.delta
            )
        return reach

    def spend(self, plan: RoundPlan, *, objective: str, **extra: Any) -> dict[str, Any]:
        """Account a mechanism that is no training step (a noised metric: ``plan`` at sample rate 1):
        refused past the budget (BudgetExceededError), else counted and recorded before it runs."""
        self.check(plan)
        self.accountant.history = _compose(self.accountant.history, plan)
        return self.record(objective=objective, plan=plan, steps=plan.steps, **extra)

    def record(self, *, objective: str, plan: RoundPlan, steps: int, **extra: Any) -> dict[str, Any]:
        """Write the ledger entry of a private round whose ``steps`` the accountant has counted."""
        entry = {
            "dp": True,
            "objective": objective,
            "steps": steps,
            "sample_rate": plan.sample_rate,
            "noise_multiplier": plan.noise_multiplier,
            "guarantee": guarantee_of(plan.noise_share),
            "noise_share": plan.noise_share,
            "max_grad_norm": plan.max_grad_norm,
            "epsilon": self.spent(),
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "accountant": self.accountant.mechanism(),
            "history": [list(h) for h in self.accountant.history],
            **extra,
        }
        self.ledger.append(entry)
        return entry
