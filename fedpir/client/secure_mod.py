"""The site's side of secure aggregation: Flower's ``secaggplus_mod``, behind the site's policy.

A train message that carries SecAgg+'s configs goes through Flower's ``secaggplus_mod`` (which
masks the update the train handler returns); every other message passes unchanged. The site checks
the run's settings against its privacy policy at every SecAgg+ stage, so that a site whose policy
forbids the request (e.g. ``distributed-noise``) refuses at the setup stage, before any key is made;
a refusal or a failed train handler becomes an error reply with a code and a generic reason.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedpir.client.guard import error_reply
from fedpir.privacy.policy import check_request, policy_of_node
from fedpir.run_config import RunSettings


class _Refused(Exception):
    """The train handler answered with an error reply (``reply``), which goes back as it is."""

    def __init__(self, reply: Message) -> None:
        self.reply = reply
        super().__init__(reply.error.reason)


def under_secure_aggregation(msg: Message) -> bool:
    """Whether ``msg`` is a step of Flower's SecAgg+ protocol."""
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def _raising(call_next: ClientAppCallable) -> ClientAppCallable:
    def call(msg: Message, context: Context) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            raise _Refused(reply)
        return reply

    return call


def secure_aggregation_mod(settings_of: Callable[[Context], RunSettings]) -> Mod:
    """The ClientApp mod; ``settings_of`` gives the run's settings of a context."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not under_secure_aggregation(msg):
            return call_next(msg, context)
        try:
            check_request(policy_of_node(dict(context.node_config)), settings_of(context))
            return secaggplus_mod(msg, context, _raising(call_next))
        except _Refused as refused:
            return Message(refused.reply.error, reply_to=msg)
        except Exception as err:  # noqa: BLE001 - every failure leaves as a code and a generic reason
            return error_reply(msg, err)

    return mod
