"""The one place that starts Flower's simulation engine for fedpir.

Decision: fedpir runs its simulations with ``flwr.simulation.run_simulation``, which Flower 1.42
deprecates in favour of ``flwr run``. ``flwr run`` builds a FAB from a project folder and takes
settings only as run-config strings, so it cannot run from an installed (non-editable) fedpir,
cannot give each baseline its own in-process app objects, and cannot add the client mods the
integration tests use to record every message. ``run_simulation`` runs the very same ServerApp and
ClientApp on the same Ray engine. When Flower removes it, this function is what changes; the
researcher's ``flwr run .`` path (README) already works without it.
"""

from __future__ import annotations

import logging
import os

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

DEPRECATION_TEXT = "The `run_simulation` function is deprecated"


class _DropRunSimulationDeprecation(logging.Filter):
    """Drops Flower's deprecation notice for ``run_simulation``: the decision is documented above,
    and the notice would otherwise print once per simulated method."""

    def filter(self, record: logging.LogRecord) -> bool:
        return DEPRECATION_TEXT not in record.getMessage()


def run_flower(server_app: ServerApp, client_app: ClientApp, num_supernodes: int, cpus_per_site: float | None = None) -> None:
    """Run ``server_app`` with ``num_supernodes`` simulated SuperNodes of ``client_app`` (Ray backend).

    ``cpus_per_site``: Ray CPUs each simulated site reserves (default: all cores, so sites train
    one after another and each uses every core).
    """
    from flwr.simulation import run_simulation

    # Ray hides the GPUs from actors that reserve none (num_gpus=0) unless told otherwise; sites pick
    # their device themselves (run config ``device``), so keep the GPUs visible. This is also what
    # Ray's FutureWarning announces as its future default.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropRunSimulationDeprecation())
    cores = os.cpu_count() or 1
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": cpus_per_site or cores, "num_gpus": 0.0},
                        "init_args": {"num_cpus": cores, "logging_level": "ERROR"}},
    )
