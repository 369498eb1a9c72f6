"""The training step of a round under secure aggregation: Flower's SecAgg+ workflow, sum only.

fedpir's round loop (:mod:`fedpir.server.rounds`) stays as it is; only its train step changes. The
fedpir strategy still picks the sites and builds their config (``configure_train``); Flower's legacy
``SecAggPlusWorkflow`` then runs its four stages over those sites and hands :class:`SumReceiver`
(a legacy Flower strategy) the unmasked weighted mean of their updates, never an individual one.
The receiver adds it to the global weights it sent. fedpir's per-update screening
(:mod:`fedpir.strategies.validation`) cannot see individual updates here; each contribution is
bounded by the site's DP clipping and by SecAgg+'s value clipping instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpir.privacy.secure_aggregation import key_order, secagg_workflow
from fedpir.wire.protocol import NUM_EXAMPLES_KEY

log = logging.getLogger("fedpir.server")


@dataclass
class SecureRound:
    """What the server learnt from a secure train step: the new global arrays (None: the protocol
    halted or too few sites took part), the weighted mean of the released metrics, each taking
    site's released metrics (by node id) and the failures' reasons."""

    arrays: ArrayRecord | None = None
    metrics: MetricRecord = field(default_factory=MetricRecord)
    site_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


class SumReceiver(LegacyStrategy):
    """The legacy strategy SecAgg+ reports to: it configures the sites the fedpir strategy chose
    and receives the unmasked weighted mean of their updates (in every result: the same arrays)."""

    def __init__(self, messages: list[Message], global_arrays: ArrayRecord, grid: Grid, min_sites: int) -> None:
        self.messages, self.grid, self.min_sites = messages, grid, min_sites
        self.keys = key_order(global_arrays.keys())
        self.global_arrays = {k: global_arrays[k].numpy() for k in self.keys}
        self.result = SecureRound()
        #: Every array list aggregate_fit was handed (the test checks it only ever holds the mean).
        self.received: list[list[np.ndarray]] = []

    def global_parameters(self) -> Parameters:
        """The global shared weights in :func:`key_order`."""
        return ndarrays_to_parameters([self.global_arrays[k] for k in self.keys])

    def initialize_parameters(self, client_manager) -> Parameters | None:  # noqa: D102 - not used by the workflow
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager) -> list[tuple]:
        """The fedpir strategy's sites and config, as legacy FitIns."""
        run_id = self.grid.run.run_id
        return [(GridClientProxy(m.metadata.dst_node_id, self.grid, run_id), FitIns(parameters, dict(m.content["config"])))
                for m in self.messages]

    def aggregate_fit(self, server_round: int, results: list[tuple], failures: list) -> tuple[Parameters | None, dict]:
        """Add the weighted mean update to the global weights (cast back to their dtypes)."""
        self.result.failures = [str(f) for f in failures]
        fit_results: list[FitRes] = [res for _, res in results]
        for proxy, res in results:
            self.result.site_metrics[proxy.node_id] = {k: float(v) for k, v in res.metrics.items()}
            self.received.append(parameters_to_ndarrays(res.parameters))
        if len(fit_results) < self.min_sites:
            log.warning("round %d: %d sites completed secure aggregation, fewer than min-sites=%d",
                        server_round, len(fit_results), self.min_sites)
            return None, {}
        mean_update = parameters_to_ndarrays(fit_results[0].parameters)
        arrays = ArrayRecord()
        for key, update in zip(self.keys, mean_update, strict=True):
            reference = self.global_arrays[key]
            value = reference.astype(np.float64) + update
            if np.issubdtype(reference.dtype, np.integer):
                value = np.rint(value)
            arrays[key] = Array(np.ascontiguousarray(value.astype(reference.dtype)))
        self.result.arrays = arrays
        self.result.metrics = _weighted_mean([res.metrics for res in fit_results], [res.num_examples for res in fit_results])
        return self.global_parameters(), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager) -> list:  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:  # noqa: D102
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:  # noqa: D102
        return None


def _weighted_mean(metrics: list[dict], weights: list[int]) -> MetricRecord:
    """Each metric's mean over the sites weighted by ``num-examples`` (the sum for num-examples)."""
    total = sum(weights)
    keys = set.intersection(*(set(m) for m in metrics)) if metrics else set()
    out = {k: sum(float(m[k]) * w for m, w in zip(metrics, weights)) / total for k in sorted(keys) if total}
    out[NUM_EXAMPLES_KEY] = float(total)
    return MetricRecord(out)


def secure_train(grid: Grid, strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, *,
                 clipping_range: float, max_weight: float, min_sites: int, timeout: float) -> tuple[SecureRound, SumReceiver]:
    """Run one secure training step over the sites ``strategy`` picks; returns what the server learnt
    and the receiver (which recorded every array list it was handed)."""
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    receiver = SumReceiver(messages, arrays, grid, min_sites)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=receiver)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        {k: Array(np.ascontiguousarray(receiver.global_arrays[k])) for k in receiver.keys})
    secagg_workflow(clipping_range=clipping_range, max_weight=max_weight, timeout=timeout)(grid, context)
    return receiver.result, receiver
