"""`fedpir simulate` on a Ray cluster of two nodes (Ray's own cluster utilities, on loopback): with
``RAY_ADDRESS`` naming the cluster, the simulation joins it instead of starting Ray, and the simulated
sites run on both nodes (one CPU each, one site each). About a minute on a 2-core CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_simulate_runs_on_a_two_node_ray_cluster(tmp_path: Path) -> None:
    import ray
    from ray._private.state import state as gcs  # the cluster's own tables (no dashboard here)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2 and ray.cluster_resources()["CPU"] == 2
        out = tmp_path / "out"
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "FLWR_TELEMETRY_ENABLED": "0"}
        res = subprocess.run([sys.executable, "-m", "fedpir", "simulate", "--preset", "quick", "--methods", "fedpir",
                              "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert (out / "report.md").is_file()
        entrypoints = [job.get("Entrypoint", "") for job in gcs.job_table()]
        assert any("fedpir simulate" in e for e in entrypoints), entrypoints  # it joined this cluster
        sites = {a["Address"]["NodeID"] for a in gcs.actor_table(None).values() if a["ActorClassName"] == "ClientAppActor"}
        assert len(sites) == 2, sites  # the simulated sites ran on both nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
