"""The deployment kits in deploy/, checked without a container runtime: every SuperLink and SuperNode
command in the compose file, the Kubernetes manifests and the systemd unit is the command the loopback
integration test runs (fedpir.deployment.commands), with the kit's own paths; the manifests pass the
Kubernetes schema and the "restricted" Pod Security standard; compose mounts everything its commands
name, readable by the user it runs as; the systemd unit verifies and is hardened."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml  # a dependency of flwr (flower-supernode reads YAML)

from fedpir.deployment import commands, provision
from fedpir.privacy.at_rest import StateCipher, new_state_key
from fedpir.privacy.policy import load_policy

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONTAINER_NODE = dict(approved_apps="/approved/approved_apps.txt", privacy_policy="/policy/privacy_policy.toml",
                      host="127.0.0.1", port=9094)
CONTAINER_LINK = dict(host="127.0.0.1", port=8000, fleet_host="0.0.0.0", fleet_port=9092,
                      database="/state/superlink.db")
#: The Kubernetes release the manifests are validated against (its schema ships with kubernetes-validate).
K8S_VERSION = "1.33.0"
#: Volume types the "restricted" Pod Security standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
HOSPITALS = ("st-anna", "city-general")


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _manifests() -> list[dict]:
    return _docs("k8s/superlink.yaml") + _docs("k8s/hospital-supernode.yaml")


def _deployment(name: str) -> tuple[dict, dict]:
    (deployment,) = [d for d in _docs(name) if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def restricted_violations(pod: dict) -> list[str]:
    """What a pod spec breaks of the Kubernetes "restricted" Pod Security standard (v1.33 rules), plus a
    read-only root file system (the kits' own rule)."""
    problems = []
    pod_sc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(key)
    for volume in pod.get("volumes", []):
        kind = set(volume) - {"name"}
        if not kind <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {sorted(kind)}")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities not dropped")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities added")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{name}: hostPort")
        if not sc.get("readOnlyRootFilesystem"):
            problems.append(f"{name}: root file system writable")
    return problems


def test_compose_commands_are_the_tested_ones() -> None:
    (compose,) = _docs("compose.yaml")
    services = compose["services"]
    assert services["superlink"]["command"] == commands.superlink_command("/kit", **CONTAINER_LINK)
    hospitals = {n.removeprefix("supernode-"): s for n, s in services.items() if n.startswith("supernode-")}
    assert set(hospitals) == set(HOSPITALS)
    for name, service in hospitals.items():
        assert service["command"] == commands.supernode_command(
            "superlink:9092", "/kit", "/data", "/state", name, state_key_file="/secrets/state.key", **CONTAINER_NODE)
        assert service["depends_on"] == ["superlink"]


def _compose_setup(root: Path) -> None:
    """The folders the compose header has the operator make (through fedpir's own functions)."""
    provision.init_federation(root / "federation", "pilot", ["superlink"])
    (root / "state" / "superlink").mkdir(parents=True)
    (root / "policies").mkdir()
    for h in HOSPITALS:
        provision.add_hospital(root / "federation", h)
        for folder in ("sites", "state", "approved", "secrets"):
            (root / folder / h).mkdir(parents=True)
        shutil.copy(DEPLOY / "privacy_policy.example.toml", root / "policies" / f"{h}.toml")
        new_state_key(root / "secrets" / h / "state.key")
        (root / "approved" / h / "approved_apps.txt").touch()


def _readable_by(path: Path, uid: int, gid: int) -> bool:
    st = path.stat()
    bits = (stat.S_IRUSR if st.st_uid == uid else stat.S_IRGRP if st.st_gid == gid else stat.S_IROTH)
    return bool(st.st_mode & bits)


def test_compose_mounts_what_its_commands_name_readable_by_its_user(tmp_path: Path) -> None:
    """After the header's setup, every file a command names lies under a mount whose source exists and
    which the container's user (the operator, FEDPIR_UID:FEDPIR_GID) can read; private keys stay 0600."""
    (compose,) = _docs("compose.yaml")
    _compose_setup(tmp_path)
    uid, gid = os.getuid(), os.getgid()
    for name, service in compose["services"].items():
        assert re.fullmatch(r"\$\{FEDPIR_UID:\?.*\}:\$\{FEDPIR_GID:\?.*\}", service["user"]), name
        assert service["read_only"] and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        mounts = {}
        for volume in service["volumes"]:
            source, target, *mode = volume.split(":")
            host = (tmp_path / "deploy" / source).resolve()
            assert host.exists(), f"{name}: {source} does not exist after the documented setup"
            mounts[target] = host
        argv = service["command"]
        named = [a for a in argv if a.startswith("/")]
        if "--node-config" in argv:
            named += re.findall(r"'(/[^']*)'", argv[argv.index("--node-config") + 1])
        for path in named:
            target = max((t for t in mounts if path == t or path.startswith(t + "/")), key=len, default=None)
            assert target is not None, f"{name}: {path} is not under any mount"
            host = mounts[target] / os.path.relpath(path, target)
            if host.suffix in (".key", ".crt", ".toml", ".txt"):
                assert host.is_file() and _readable_by(host, uid, gid), f"{name}: {path} ({host}) unreadable"
            if host.suffix == ".key":
                assert stat.S_IMODE(host.stat().st_mode) == 0o600, host
        if name.startswith("supernode-"):
            assert StateCipher.from_key_file(mounts["/secrets"] / "state.key").encrypts
            load_policy(mounts["/policy/privacy_policy.toml"])


def test_kubernetes_manifests_are_the_tested_commands() -> None:
    _, container = _deployment("k8s/superlink.yaml")
    assert container["command"] + container["args"] == commands.superlink_command(
        "/kit", health="0.0.0.0:9098", **CONTAINER_LINK)
    _, container = _deployment("k8s/hospital-supernode.yaml")
    assert container["command"] + container["args"] == commands.supernode_command(
        "superlink.example.org:9092", "/kit", "/data", "/state", "st-anna", state_key_env="FEDPIR_STATE_KEY",
        health="0.0.0.0:9098", **CONTAINER_NODE)
    assert {e["name"] for e in container["env"]} == {"FEDPIR_STATE_KEY"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/kit"]["readOnly"] and mounts["/data"]["readOnly"] and not mounts["/state"].get("readOnly")


def test_kubernetes_manifests_pass_the_schema() -> None:
    for doc in _manifests():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = copy.deepcopy(_deployment("k8s/superlink.yaml")[0])
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", ["k8s/superlink.yaml", "k8s/hospital-supernode.yaml"])
def test_kubernetes_manifests_are_restricted_and_complete(name: str) -> None:
    docs = _docs(name)
    deployment, container = _deployment(name)
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert pod["automountServiceAccountToken"] is False
    # probes on Flower's gRPC health server, resources bounded
    health = int(container["args"][container["args"].index("--health-server-address") + 1].rsplit(":", 1)[1])
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health
    assert set(container["resources"]["limits"]) == {"cpu", "memory"} and container["resources"]["requests"]
    # every referenced claim and config map is defined here; every secret is made by a command in the header
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    header = (DEPLOY / name).read_text().split("\napiVersion", 1)[0]
    for volume in pod["volumes"]:
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in defined
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in defined
        if "secret" in volume:
            assert f"create secret generic {volume['secret']['secretName']}" in header
    for env in container.get("env", []):
        assert f"create secret generic {env['valueFrom']['secretKeyRef']['name']}" in header.replace("\\\n#", "")
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_the_restricted_check_can_fail() -> None:
    pod = _deployment("k8s/superlink.yaml")[0]["spec"]["template"]["spec"]
    for mutate, expected in ((lambda p: p["securityContext"].pop("seccompProfile") and
                              p["containers"][0]["securityContext"].pop("seccompProfile"), "seccompProfile None"),
                             (lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
                              "allowPrivilegeEscalation"),
                             (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "volume h"),
                             (lambda p: p.update(hostNetwork=True), "hostNetwork")):
        broken = copy.deepcopy(pod)
        mutate(broken)
        assert any(expected in v for v in restricted_violations(broken)), expected


def test_only_the_fleet_port_is_exposed() -> None:
    docs = _docs("k8s/superlink.yaml")
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert [p["port"] for p in service["spec"]["ports"]] == [9092]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [9092]
    (compose,) = _docs("compose.yaml")
    assert compose["services"]["superlink"]["network_mode"] == "host"  # 8000 on the host's loopback only
    assert "127.0.0.1" == commands.superlink_command("/kit", **CONTAINER_LINK)[
        commands.superlink_command("/kit", **CONTAINER_LINK).index("--host") + 1]


def _systemd_argv() -> list[str]:
    unit = (DEPLOY / "systemd" / "fedpir-supernode.service").read_text()
    env = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / "supernode.env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    return shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], exec_start)), env


def test_systemd_unit_is_the_tested_command() -> None:
    argv, env = _systemd_argv()
    assert Path(argv[0]).name == "flower-supernode"
    assert ["flower-supernode", *argv[1:]] == commands.supernode_command(
        env["FEDPIR_SUPERLINK"], "/etc/fedpir/kit", "/srv/fedpir/data", "/var/lib/fedpir/state", env["FEDPIR_SITE"],
        approved_apps="/etc/fedpir/approved_apps.txt", privacy_policy="/etc/fedpir/privacy_policy.toml",
        state_key_file="/etc/fedpir/state.key", host="127.0.0.1", port=9094)
    unit = (DEPLOY / "systemd" / "fedpir-supernode.service").read_text()
    path = re.search(r"^Environment=PATH=(\S+)$", unit, re.M).group(1).split(":")
    assert path[0] == "/opt/fedpir/guard-bin", "the approval guard must come first on PATH"


def test_dockerfile_installs_the_lock_and_puts_the_approval_guard_first() -> None:
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "fedpir site guard /opt/fedpir/guard-bin" in docker
    assert re.search(r"^ENV PATH=/opt/fedpir/guard-bin:\$PATH$", docker, re.M)
    assert re.search(r"^USER fedpir$", docker, re.M)
    installs = re.findall(r"pip install ([^\n\\&]*)", docker)
    # everything from the lock the bundle holds; fedpir itself offline, without its dependencies
    assert installs == ["--system --no-deps -r pylock.toml ", "--system --no-deps --no-build-isolation --offline . "], \
        installs
    assert re.search(r"^COPY pyproject.toml README.md pylock.toml ./$", docker, re.M)


def _installed_unit(tmp_path: Path) -> Path:
    unit = (DEPLOY / "systemd" / "fedpir-supernode.service").read_text()
    unit = unit.replace("/opt/fedpir/venv/bin/flower-supernode", shutil.which("flower-supernode"))  # installed here
    unit = unit.replace("EnvironmentFile=/etc/", "EnvironmentFile=-/etc/")  # the file of a real install is optional here
    (tmp_path / "fedpir-supernode.service").write_text(unit)
    return tmp_path / "fedpir-supernode.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or shutil.which("flower-supernode") is None,
                    reason="systemd-analyze or flower-supernode not installed")
def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = _installed_unit(tmp_path)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "fedpir-supernode.service" not in res.stderr, res.stderr
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                         text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout).group(1))
    assert exposure < 2.0, res.stdout[-3000:]  # "OK" band, the lowest but "SAFE"; was 5.6 MEDIUM
