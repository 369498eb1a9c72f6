"""The deployment kits in deploy/: the YAML parses, and every SuperLink and SuperNode command in the
compose file, the Kubernetes manifests and the systemd unit is the command the loopback integration
test runs (fedpir.deployment.commands), with the kit's own paths."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # a dependency of flwr (flower-supernode reads YAML)

from fedpir.deployment import commands

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONTAINER_NODE = dict(approved_apps="/approved/approved_apps.txt", host="127.0.0.1", port=9094)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_compose_commands_are_the_tested_ones() -> None:
    (compose,) = _docs("compose.yaml")
    services = compose["services"]
    assert services["superlink"]["command"] == commands.superlink_command(
        "/kit", host="0.0.0.0", port=8000, database="/state/superlink.db")
    hospitals = {n.removeprefix("supernode-"): s for n, s in services.items() if n.startswith("supernode-")}
    assert set(hospitals) == {"st-anna", "city-general"}
    for name, service in hospitals.items():
        assert service["command"] == commands.supernode_command("superlink:8000", "/kit", "/data", "/state", name,
                                                                **CONTAINER_NODE)
        mounts = {v.split(":")[1]: v for v in service["volumes"]}
        assert mounts["/kit"] == f"../federation/hospitals/{name}:/kit:ro"
        assert mounts["/data"].endswith(":ro") and not mounts["/state"].endswith(":ro")
        assert service["depends_on"] == ["superlink"]
    assert services["superlink"]["volumes"][0] == "../federation/superlink:/kit:ro"


def test_kubernetes_manifests_are_the_tested_commands() -> None:
    link = [d for d in _docs("k8s/superlink.yaml") if d["kind"] == "Deployment"]
    (container,) = link[0]["spec"]["template"]["spec"]["containers"]
    assert container["command"] + container["args"] == commands.superlink_command(
        "/kit", host="0.0.0.0", port=8000, database="/state/superlink.db")
    node_docs = _docs("k8s/hospital-supernode.yaml")
    (deployment,) = [d for d in node_docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] + container["args"] == commands.supernode_command(
        "superlink.example.org:8000", "/kit", "/data", "/state", "st-anna", **CONTAINER_NODE)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/kit"]["readOnly"] and mounts["/data"]["readOnly"] and not mounts["/state"].get("readOnly")
    kinds = {d["kind"] for d in node_docs} | {d["kind"] for d in _docs("k8s/superlink.yaml")}
    assert {"Namespace", "Deployment", "Service", "PersistentVolumeClaim", "ConfigMap"} <= kinds
    for doc in node_docs + _docs("k8s/superlink.yaml"):
        assert doc["apiVersion"] and doc["metadata"]["name"]
        if doc["kind"] == "Deployment":
            assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_systemd_unit_is_the_tested_command() -> None:
    unit = (DEPLOY / "systemd" / "fedpir-supernode.service").read_text()
    env = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / "supernode.env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], exec_start)
    argv = shlex.split(expanded)
    assert Path(argv[0]).name == "flower-supernode"
    assert ["flower-supernode", *argv[1:]] == commands.supernode_command(
        env["FEDPIR_SUPERLINK"], "/etc/fedpir/kit", "/srv/fedpir/data", "/var/lib/fedpir/state", env["FEDPIR_SITE"],
        approved_apps="/etc/fedpir/approved_apps.txt", host="127.0.0.1", port=9094)
    path = re.search(r"^Environment=PATH=(\S+)$", unit, re.M).group(1).split(":")
    assert path[0] == "/opt/fedpir/guard-bin", "the approval guard must come first on PATH"


def test_dockerfile_puts_the_approval_guard_first() -> None:
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "write_guard('/opt/fedpir/guard-bin'" in docker
    assert re.search(r"^ENV PATH=/opt/fedpir/guard-bin:\$PATH$", docker, re.M)
    assert re.search(r"^USER fedpir$", docker, re.M)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or shutil.which("flower-supernode") is None,
                    reason="systemd-analyze or flower-supernode not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "fedpir-supernode.service").read_text()
    unit = unit.replace("/opt/fedpir/venv/bin/flower-supernode", shutil.which("flower-supernode"))  # installed here
    unit = unit.replace("EnvironmentFile=/etc/", "EnvironmentFile=-/etc/")  # the file of a real install is optional here
    (tmp_path / "fedpir-supernode.service").write_text(unit)
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "fedpir-supernode.service")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "fedpir-supernode.service" not in res.stderr, res.stderr
