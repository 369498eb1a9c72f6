"""Secure aggregation with Flower's SecAgg+: what both sides agree on.

With run config ``secure-aggregation = true`` the training step of every round runs Flower's
SecAgg+ protocol (``flwr.server.workflow.SecAggPlusWorkflow`` at the server,
``flwr.client.mod.secaggplus_mod`` at the sites; fedpir implements no cryptography): each site
masks its weighted update so that the server can only unmask the sum, and the server learns only
the weighted mean of the sites' updates (and each site's ``num-examples`` and released metrics).

What travels is the update of the shared keys (``sent - received``, float32), as a list of arrays
in :func:`key_order`; the server adds the unmasked weighted mean to the global weights it sent.
SecAgg+ works on integers: a site multiplies its update by ``num-examples / secagg-max-weight``,
clips each value to ``+-secagg-clipping-range`` and quantizes it stochastically to
:data:`QUANTIZATION_RANGE` levels. :func:`quantization_tolerance` bounds the resulting error of the
mean; an update value above ``secagg-clipping-range * secagg-max-weight / num-examples`` is clipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: SecAgg+ quantization levels of one site's value (Flower's default, 2**22) and the mask modulus
#: (2**32): the sum of up to 2**10 sites cannot wrap around.
QUANTIZATION_RANGE = 1 << 22
MODULUS_RANGE = 1 << 32
#: Which DP guarantee a private round's ledger entry states (field ``guarantee``).
LOCAL_DP, DISTRIBUTED_DP = "local-dp", "distributed-dp-under-secagg"


def key_order(keys: Iterable[str]) -> list[str]:
    """The order of the shared keys in SecAgg+'s unnamed array lists (the same at both ends)."""
    return sorted(keys)


def quantization_tolerance(num_examples: Sequence[float], clipping_range: float, max_weight: float) -> float:
    """Bound on the absolute error, per value, of SecAgg+'s weighted mean of unclipped updates
    from sites with ``num_examples``: each site's stochastic rounding errs by less than one level
    (``2 * clipping_range / QUANTIZATION_RANGE``), and the sum is divided by the quantized total weight."""
    level = 2 * clipping_range / QUANTIZATION_RANGE
    total_weight = sum(round(n / max_weight * QUANTIZATION_RANGE) for n in num_examples) / QUANTIZATION_RANGE
    return len(num_examples) * level / total_weight


def noise_share(distributed: bool, sites: int) -> float:
    """The fraction of the round's DP noise std that one site adds: 1 (each site's noise is the
    whole; local DP), or ``1/sqrt(sites)`` under distributed noise, so that the sum of ``sites``
    honest sites' updates carries the full noise."""
    return sites ** -0.5 if distributed else 1.0


def guarantee_of(share: float) -> str:
    """The guarantee a private round with ``noise_share`` gives (its ledger entry's ``guarantee``):
    :data:`LOCAL_DP` (the site's own noise protects its update against everyone, the server
    included) or :data:`DISTRIBUTED_DP` (the recorded epsilon holds for the sum of the sites'
    updates: against the server only while SecAgg+ holds and enough sites add their share honestly,
    against other sites and whoever gets the model always)."""
    return LOCAL_DP if share == 1.0 else DISTRIBUTED_DP


def secagg_workflow(*, clipping_range: float, max_weight: float, timeout: float):
    """Flower's SecAgg+ workflow with fedpir's quantization; every site shares its key with all the
    others and any two-thirds of them can recover a dropped site's mask."""
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=2 / 3, max_weight=max_weight,
                              clipping_range=clipping_range, quantization_range=QUANTIZATION_RANGE,
                              modulus_range=MODULUS_RANGE, timeout=timeout)
