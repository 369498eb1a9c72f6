"""fedpir-superlink's port split, without a network: the middleware's decisions on ASGI requests, the
Flower internals it builds on, and its refusals. Over real processes and TLS (a stranger with the
public CA cannot register, list nodes, start runs or reach the runtime on the Fleet port):
tests/deployment/test_deploy_loopback.py."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from fedpir.deployment import provision
from fedpir.deployment.superlink import FLEET_PATH, FLOWER_INTERNALS, FleetOnlyOnPort

FLEET, OPERATOR = 9092, 8000


def _status(path: str, port: int | None, kind: str = "http") -> int:
    """The status the middleware answers for ``path`` arriving on ``port`` (200: passed to the app)."""
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": kind, "path": path, "server": None if port is None else ("127.0.0.1", port)}
    asyncio.run(FleetOnlyOnPort(app, FLEET)(scope, None, send))
    return sent[0].get("status", 1008 if sent[0]["type"] == "websocket.close" else 0)


@pytest.mark.parametrize("path", ["/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/health"])
def test_the_fleet_port_passes_the_fleet_api(path: str) -> None:
    assert _status(path, FLEET) == 200


@pytest.mark.parametrize("path", ["/v1/control/register-node", "/v1/control/start-run", "/v1/control/list-nodes",
                                  "/v1/runtime/pull-task-input", "/docs", "/openapi.json", "/v1/fleet/../control/x",
                                  "/v1/fleet//control", "/v1/fleetx/register-node", "/V1/fleet/activate-node", ""])
def test_the_fleet_port_refuses_everything_else(path: str) -> None:
    assert _status(path, FLEET) == 404
    assert _status(path, OPERATOR) == 200  # the operator's port serves everything


def test_unknown_listener_and_websockets_are_refused() -> None:
    assert _status("/v1/control/register-node", None) == 404
    assert _status("/v1/control/stream-logs", FLEET, kind="websocket") == 1008
    assert FLEET_PATH.match("/v1/fleet/push-object")


def test_the_flower_internals_it_uses_exist() -> None:
    for module, name in FLOWER_INTERNALS:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name} moved: see fedpir/deployment/superlink.py"


def test_it_refuses_plaintext_and_one_port_for_both(tmp_path: Path) -> None:
    fed = provision.init_federation(tmp_path / "fed", "t")
    kit = fed.superlink_dir
    exe = [sys.executable, "-c", "from fedpir.commands.superlink import main; main()"]
    res = subprocess.run([*exe, "--insecure", "--fleet-port", "19092"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "needs TLS" in res.stderr and "Traceback" not in res.stderr, res.stderr
    tls = ["--ssl-ca-certfile", str(kit / "ca.crt"), "--ssl-certfile", str(kit / "server.crt"),
           "--ssl-keyfile", str(kit / "server.key")]
    res = subprocess.run([*exe, *tls, "--port", "19093", "--fleet-port", "19093"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and "different ports" in res.stderr and "Traceback" not in res.stderr, res.stderr
