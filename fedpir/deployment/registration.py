"""The SuperLink's accepted node keys, kept equal to the federation's registry.

The registry (:mod:`fedpir.deployment.provision`) says which hospitals' keys are valid; the SuperLink
accepts the keys registered with it. These functions drive Flower's own ``flwr supernode register /
unregister / list`` (its JSON output) through a connection of the operator's ``$FLWR_HOME/config.toml``,
which reaches the SuperLink's operator port (:mod:`fedpir.deployment.superlink`), so that a revoked
key is refused at once and :func:`sync` can prove that the two sets are equal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from fedpir.deployment import provision as p

#: Node statuses of ``flwr supernode list`` under which the SuperLink accepts the key.
ACCEPTED = ("registered", "online", "offline")


class RegistrationError(p.ProvisionError):
    """The SuperLink refused or could not be reached (one line, with what to do)."""


def _flwr(args: list[str], connection: str, timeout: float = 120) -> dict:
    """``flwr supernode ARGS --format json`` through ``connection``; its JSON answer, or
    :class:`RegistrationError`."""
    exe = shutil.which("flwr")
    if exe is None:
        raise RegistrationError("the `flwr` command is not on PATH; install fedpir (it brings Flower) and retry")
    try:
        res = subprocess.run([exe, "supernode", *args, "--format", "json"], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RegistrationError(f"flwr supernode {args[0]}: no answer in {timeout:.0f} s; is the SuperLink's "
                                f"operator port reachable through the connection {connection!r}?") from None
    out = res.stdout
    try:
        answer = json.loads(out[out.index("{"):])
    except ValueError:
        answer = {"success": False, "error-message": (out + res.stderr).strip()[-300:]}
    if res.returncode != 0 or not answer.get("success"):
        message = " ".join(str(answer.get("error-message", "no answer")).split())
        raise RegistrationError(f"flwr supernode {args[0]}: {message}; check the connection "
                                f"{connection!r} in $FLWR_HOME/config.toml (the SuperLink's operator port)")
    return answer


def flwr_config_path() -> Path:
    """The operator's ``flwr`` configuration: ``$FLWR_HOME/config.toml`` (default ``~/.flwr``)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "config.toml"


def add_connection(root: Path | str, name: str, address: str) -> Path:
    """Add the connection ``name`` to the SuperLink's operator port at ``address``, trusting the
    federation CA, to the operator's ``flwr`` configuration (the default one if it is the first);
    never changes an existing connection."""
    from fedpir.deployment.commands import flwr_config_toml

    p.check_name(name, "connection")
    ca = p.load_federation(root).ca_cert.resolve()
    path = flwr_config_path()
    text = path.read_text() if path.exists() else ""
    if name in tomllib.loads(text).get("superlink", {}):
        raise RegistrationError(f"{path} already has a connection {name!r}; edit it there or choose another name")
    section = flwr_config_toml(name, address, ca)
    if text:  # keep the file's default; add only the connection's own table
        section = section[section.index(f"[superlink.{name}]"):]
        text = text.rstrip("\n") + "\n\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + section)
    partial.replace(path)
    return path


def accepted_nodes(connection: str) -> dict[int, str]:
    """Node ids the SuperLink accepts now, with their status."""
    nodes = _flwr(["list", connection], connection)["nodes"]
    return {int(n["node-id"]): n["status"] for n in nodes if n["status"] in ACCEPTED}


def register(root: Path | str, hospital: str, connection: str) -> int:
    """Register the hospital's current public key with the SuperLink and note its node id."""
    fed = p.load_federation(root)
    entry = fed.hospitals.get(hospital)
    if entry is None or entry["status"] != "active":
        raise RegistrationError(f"hospital {hospital!r} has no active key in {fed.root / p.REGISTRY}")
    pub = fed.hospital_dir(hospital) / p.NODE_PUB
    node_id = int(_flwr(["register", str(pub), connection, "--name", hospital], connection)["node-id"])
    p.record_node_id(fed.root, hospital, node_id)
    return node_id


def unregister_retired(root: Path | str, hospital: str, connection: str) -> list[int]:
    """Unregister the node ids of the hospital's revoked or rotated keys; returns them."""
    fed = p.load_federation(root)
    done = []
    accepted = accepted_nodes(connection)
    for node_id in list(fed.hospitals[hospital].get("unregister", [])):
        if node_id in accepted:
            _flwr(["unregister", str(node_id), connection], connection)
        p.forget_retired_node_id(fed.root, hospital, node_id)
        done.append(node_id)
    return done


@dataclass
class SyncReport:
    """What :func:`sync` changed on the SuperLink."""

    registered: dict[str, int] = field(default_factory=dict)  # hospital -> new node id
    unregistered: dict[int, str] = field(default_factory=dict)  # node id -> why

    @property
    def changed(self) -> bool:
        """Whether the SuperLink's accepted set differed from the registry."""
        return bool(self.registered or self.unregistered)


def sync(root: Path | str, connection: str) -> SyncReport:
    """Make the SuperLink accept exactly the active keys of the registry: unregister every node the
    registry does not hold as active (retired keys, keys registered by anyone else), register every
    active hospital whose key the SuperLink does not accept."""
    report = SyncReport()
    fed = p.load_federation(root)
    for hospital, entry in fed.hospitals.items():
        for node_id in unregister_retired(fed.root, hospital, connection) if entry.get("unregister") else []:
            report.unregistered[node_id] = f"retired key of {hospital}"
    active = {entry["node_id"]: name for name, entry in p.load_federation(root).hospitals.items()
              if entry["status"] == "active" and "node_id" in entry}
    accepted = accepted_nodes(connection)
    for node_id in sorted(set(accepted) - set(active)):
        _flwr(["unregister", str(node_id), connection], connection)
        report.unregistered[node_id] = "not in the registry"
    fed = p.load_federation(root)
    for name in fed.active():
        if fed.hospitals[name].get("node_id") not in accepted:
            report.registered[name] = register(root, name, connection)
    return report
