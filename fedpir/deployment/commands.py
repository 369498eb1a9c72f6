"""The command lines of a fedpir deployment, declared once.

The loopback integration test (``tests/deployment/test_deploy_loopback.py``) starts exactly these commands, and
a test checks that the compose file, the Kubernetes manifests and the systemd units in ``deploy/``
use the same flags (with their own paths). Kit file names come from :mod:`fedpir.deployment.provision`.
"""

from __future__ import annotations

from pathlib import Path

from fedpir.deployment.provision import CA_CERT, NODE_KEY, SERVER_CERT, SERVER_KEY
from fedpir.deployment.superlink import DEFAULT_FLEET_PORT

#: TLS, SuperNode authentication, no runtime dependency installation (a hospital's environment is
#: fixed and offline; an app cannot pull packages into it).
SUPERLINK_SECURITY_FLAGS: tuple[str, ...] = ("--enable-supernode-auth", "--disable-runtime-dependency-installation")


def superlink_command(kit: Path | str, *, host: str = "127.0.0.1", port: int = 8000, fleet_host: str = "0.0.0.0",
                      fleet_port: int = DEFAULT_FLEET_PORT, database: Path | str | None = None,
                      isolation: str = "subprocess", health: str | None = None) -> list[str]:
    """``fedpir-superlink`` (Flower's SuperLink, see :mod:`fedpir.deployment.superlink`) with TLS from the
    server kit: the operator's APIs on ``host:port``, only the Fleet API on ``fleet_host:fleet_port``;
    ``health``: address of Flower's gRPC health server (for probes)."""
    kit = Path(kit)
    cmd = ["fedpir-superlink",
           "--ssl-ca-certfile", str(kit / CA_CERT), "--ssl-certfile", str(kit / SERVER_CERT),
           "--ssl-keyfile", str(kit / SERVER_KEY),
           *SUPERLINK_SECURITY_FLAGS, "--isolation", isolation, "--host", host, "--port", str(port),
           "--fleet-host", fleet_host, "--fleet-port", str(fleet_port)]
    if health is not None:
        cmd += ["--health-server-address", health]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def node_config(data_dir: Path | str, state_dir: Path | str, site_name: str, approved_apps: Path | str | None = None,
                privacy_policy: Path | str | None = None, state_key_file: Path | str | None = None,
                state_key_env: str | None = None) -> str:
    """The ``--node-config`` string the fedpir ClientApp reads (and the approval guard); without
    ``privacy_policy`` the node runs the safe default policy (fedpir.privacy.policy); with a state key
    (a file, or the name of an environment variable) its state is encrypted at rest (fedpir.privacy.at_rest)."""
    items = [f"data-dir='{data_dir}'", f"state-dir='{state_dir}'", f"site-name='{site_name}'"]
    for key, value in (("approved-apps", approved_apps), ("privacy-policy", privacy_policy),
                       ("state-key-file", state_key_file), ("state-key-env", state_key_env)):
        if value is not None:
            items.append(f"{key}='{value}'")
    return " ".join(items)


def supernode_command(superlink: str, kit: Path | str, data_dir: Path | str, state_dir: Path | str, site_name: str, *,
                      approved_apps: Path | str | None = None, privacy_policy: Path | str | None = None,
                      state_key_file: Path | str | None = None, state_key_env: str | None = None,
                      port: int = 9094, host: str = "127.0.0.1", health: str | None = None,
                      max_retries: int | None = None, max_wait_time: float | None = None) -> list[str]:
    """``flower-supernode`` of one hospital: verifies the SuperLink with the federation CA and
    authenticates with the hospital's node key; ``port`` is its local Runtime API (one per node);
    ``health``: address of Flower's gRPC health server (for probes)."""
    kit = Path(kit)
    cmd = ["flower-supernode", "--superlink", superlink,
           "--root-certificates", str(kit / CA_CERT), "--auth-supernode-private-key", str(kit / NODE_KEY),
           "--node-config", node_config(data_dir, state_dir, site_name, approved_apps, privacy_policy,
                                        state_key_file, state_key_env),
           "--isolation", "subprocess", "--host", host, "--port", str(port)]
    if health is not None:
        cmd += ["--health-server-address", health]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd


def flwr_config_toml(connection: str, address: str, ca_cert: Path | str) -> str:
    """A ``$FLWR_HOME/config.toml`` whose connection ``connection`` reaches the SuperLink over TLS."""
    return (f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\naddress = "{address}"\n'
            f'root-certificates = "{ca_cert}"\n')
