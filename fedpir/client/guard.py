"""The site's side of every server request: admitted under the site's privacy policy, or refused.

The ClientApp checks the run settings against the policy (:func:`fedpir.privacy.policy.check_request`)
before it builds the site; :func:`admit_training`, :func:`admit_evaluation` and :func:`admit_alignment`
then check, before the request touches the model, the ledger on disk against the one the site wrote
(a missing or altered ledger stops the site), bind the site's budget to the ledger (it only lowers),
and check the round's planned noise, the evaluation rate limit or the policy's switch for alignment
statistics. :func:`answered` turns every exception of a handler into an error reply with a code and
a generic reason from :data:`fedpir.wire.protocol.SITE_ERRORS`; the exception's text (values, paths,
labels) goes to the site's log only, and nothing else leaves.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message

from fedpir.client.site import Site, SiteDataError
from fedpir.privacy.budget import BudgetExceededError, LedgerError, PrivacyLedger
from fedpir.privacy.policy import PolicyViolation, SitePolicy, bind_budget, check_plan, check_round_limits
from fedpir.privacy.release import EvaluationAllowance, training_entries
from fedpir.run_config import RunSettings
from fedpir.training.trainer import LocalTrainer
from fedpir.wire.protocol import (
    BUDGET_EXHAUSTED,
    DATA_UNAVAILABLE,
    LEDGER_UNTRUSTED,
    POLICY_REFUSED,
    RATE_LIMITED,
    SITE_ERROR,
    SITE_ERRORS,
)

log = logging.getLogger("fedpir.client")


class RateLimited(Exception):
    """An evaluate request beyond the policy's evaluations per training round."""


_CODES: dict[type[Exception], int] = {PolicyViolation: POLICY_REFUSED, RateLimited: RATE_LIMITED,
                                     BudgetExceededError: BUDGET_EXHAUSTED, LedgerError: LEDGER_UNTRUSTED,
                                     SiteDataError: DATA_UNAVAILABLE}


def error_reply(msg: Message, err: BaseException) -> Message:
    """The error reply of a request that failed with ``err``: a code and its generic reason
    (plus the rule's name for a policy refusal); the details go to the site's log."""
    code = next((c for kind, c in _CODES.items() if isinstance(err, kind)), SITE_ERROR)
    reason = SITE_ERRORS[code] + (f" (rule {err.rule})" if isinstance(err, PolicyViolation) else "")
    kind = msg.metadata.message_type
    if code == SITE_ERROR:
        log.exception("%s request failed; the server is told only error %d", kind, code, exc_info=err)
    else:
        log.warning("%s request not served (error %d): %s", kind, code, err)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def answered(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A ClientApp handler whose exceptions become :func:`error_reply` replies."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # noqa: BLE001 - every failure leaves as a code and a generic reason
            return error_reply(msg, err)

    return wrapped


def _bind(site: Site, policy: SitePolicy) -> None:
    """Check the ledger on disk is the one the site wrote; bind the site's budget and stamp entries."""
    ledger = site.trainer.ledger
    # LedgerError if missing with trained state, or altered; read with the site's key path and state key (an
    # encrypted signing key cannot be read without it)
    on_disk = PrivacyLedger.in_dir(site.state_dir, key_path=ledger.key_path, cipher=site.cipher)
    if on_disk.last_hash != ledger.last_hash:
        raise LedgerError(f"{site.state_dir}: the privacy ledger on disk ({len(on_disk.entries)} entries) is not the "
                          f"one this site wrote ({len(ledger.entries)} entries): removed, replaced or cut; restore it "
                          "before training (fedpir audit verify)")
    bind_budget(policy, ledger, site.trainer.budget, site.settings.epsilon_budget)


def admit_training(policy: SitePolicy, site: Site, epochs: int) -> None:
    """Raise unless the site may train a round of ``epochs`` epochs (the request itself passed
    :func:`~fedpir.privacy.policy.check_request` before the site was built)."""
    _bind(site, policy)
    check_round(policy, site.trainer, site.settings, epochs)


def check_round(policy: SitePolicy, trainer: LocalTrainer, settings: RunSettings, epochs: int) -> None:
    """Raise :class:`PolicyViolation` unless ``trainer`` may train one more round of ``epochs`` epochs:
    the site's rounds in its life and in the last 24 hours, then the round's resolved DP figures (also
    `fedpir train` on a node's state folder)."""
    check_round_limits(policy, training_entries(trainer.ledger.entries))
    if trainer.budget is not None:
        check_plan(policy, settings, budget=trainer.budget.epsilon_budget, delta=trainer.delta,
                   noise_multiplier=trainer.plan(epochs).noise_multiplier)


def admit_evaluation(policy: SitePolicy, site: Site) -> None:
    """Raise unless the site may answer an evaluate request now (ledger, rate limit)."""
    _bind(site, policy)
    rounds = len(training_entries(site.trainer.ledger.entries))
    if not EvaluationAllowance(site.state_dir, policy.evaluations_per_round, site.cipher).take(rounds):
        raise RateLimited(f"more than {policy.evaluations_per_round} evaluation(s) since the last training round")


def admit_alignment(policy: SitePolicy, site: Site) -> None:
    """Raise unless the site may send the sufficient statistics of its anchors (ledger, policy switch)."""
    _bind(site, policy)
    if not policy.alignment_statistics:
        raise PolicyViolation("alignment-statistics", "the policy does not let alignment statistics (not DP) leave")
