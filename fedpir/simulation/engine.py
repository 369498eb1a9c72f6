"""The one place that starts Flower's simulation engine for fedpir.

Decision: fedpir runs its simulations with ``flwr.simulation.run_simulation``, which Flower 1.42
deprecates in favour of ``flwr run``. ``flwr run`` builds a FAB from a project folder and takes
settings only as run-config strings, so it cannot run from an installed (non-editable) fedpir,
cannot give each baseline its own in-process app objects, and cannot add the client mods the
integration tests use to record every message. ``run_simulation`` runs the very same ServerApp and
ClientApp on the same Ray engine. When Flower removes it, this function is what changes; the
researcher's ``flwr run .`` path (README) already works without it.

One engine for many runs: Flower starts Ray for each simulation only if it is not running, but
shuts it down at the end of each (``RayBackend.terminate``). :func:`engine` starts Ray once and
keeps it across the simulations run inside it, so a ``fedpir simulate`` of many methods pays one
start (three methods of the quick preset: 54 s before, 48 s after, on 2 cores); Flower's actors are
still made and ended per run, each a new process that imports torch and fedpir again. Flower lacks
this, so it is written here. With ``RAY_ADDRESS`` set, the engine is that Ray cluster.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

DEPRECATION_TEXT = "The `run_simulation` function is deprecated"


class _DropRunSimulationDeprecation(logging.Filter):
    """Drops Flower's deprecation notice for ``run_simulation``: the decision is documented above,
    and the notice would otherwise print once per simulated method."""

    def filter(self, record: logging.LogRecord) -> bool:
        return DEPRECATION_TEXT not in record.getMessage()


def cores() -> int:
    """CPUs of this machine (of this process's affinity, where the OS says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def site_cpus(cpus_per_site: float, num_sites: int, available: int | None = None) -> float:
    """The CPUs each simulated site reserves on Flower's simulation engine, and its torch threads:
    ``cpus_per_site``, or for 0 as many sites in parallel as there are cores, the cores shared among them
    (``available // min(sites, available)``, at least 1)."""
    if cpus_per_site > 0:
        return cpus_per_site
    available = available or cores()
    return float(max(1, available // max(1, min(num_sites, available))))


def _ray_init_args() -> dict:
    """Ray's start: quiet, with the driver's import path for the workers (as Flower itself passes it); on
    this machine's cores without a dashboard, or, where ``RAY_ADDRESS`` names a running Ray cluster (several
    machines; docs/architecture.md, "Engines"), on that cluster."""
    pythonpath = os.pathsep.join(filter(None, [os.pathsep.join(sys.path), os.environ.get("PYTHONPATH")]))
    common = {"logging_level": "ERROR", "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}}
    if os.environ.get("RAY_ADDRESS"):
        return {"address": os.environ["RAY_ADDRESS"], **common}
    return {"num_cpus": cores(), "include_dashboard": False, **common}


def _check_cluster_reachable(address: str, timeout: float = 5.0) -> None:
    """A ``RAY_ADDRESS`` of the form HOST:PORT must accept a connection (Ray itself retries for minutes);
    ConnectionError, one line, when it does not."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"RAY_ADDRESS {address}: no Ray cluster answers there ({err.strerror or err}); start it "
                              "with `ray start --head`, or unset RAY_ADDRESS to simulate on this machine") from None


@contextmanager
def engine() -> Iterator[None]:
    """Start Ray once for every simulation run inside this block (see the module docstring); nested
    blocks share the outer one's."""
    import ray

    # Ray hides the GPUs from actors that reserve none (num_gpus=0) unless told otherwise; sites pick
    # their device themselves (run config ``device``), so keep the GPUs visible. This is also what
    # Ray's FutureWarning announces as its future default. (Read by the workers Ray starts: set first.)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if ray.is_initialized():
        yield
        return
    _check_cluster_reachable(os.environ.get("RAY_ADDRESS", ""))
    ray.init(**_ray_init_args())
    real_shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None  # Flower's end-of-run shutdown: the engine outlives each run
    try:
        yield
    finally:
        ray.shutdown = real_shutdown
        ray.shutdown()


def engine_for(methods: list[str]) -> AbstractContextManager[None]:
    """:func:`engine` when one of ``methods`` runs on Flower's simulation engine, else nothing to start."""
    from fedpir.simulation.methods import FEDERATED

    return engine() if any(m in FEDERATED for m in methods) else nullcontext()


def run_flower(server_app: ServerApp, client_app: ClientApp, num_supernodes: int, cpus_per_site: float = 0.0) -> None:
    """Run ``server_app`` with ``num_supernodes`` simulated SuperNodes of ``client_app`` on the Ray
    engine (the running one of :func:`engine`, else one started for this run); each site reserves
    :func:`site_cpus` of the engine's CPUs (of every machine of a cluster)."""
    import ray
    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropRunSimulationDeprecation())
    with engine():
        available = int(ray.cluster_resources().get("CPU", cores()))
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                       backend_config={"client_resources": {"num_cpus": site_cpus(cpus_per_site, num_supernodes, available),
                                                            "num_gpus": 0.0}})
