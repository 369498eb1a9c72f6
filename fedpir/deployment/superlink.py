"""``fedpir-superlink``: Flower's SuperLink with the operator's APIs off the hospitals' port.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (the ``flwr`` CLI: register and
unregister node keys, start and stop runs, pull artifacts) and the Runtime API (the ServerApp) on
one HTTPS port, and its open-source build has no account authentication for the Control API (OIDC
is in the enterprise build only). Exposed to the hospitals, that port lets anyone who holds the
public CA certificate register a node key, start runs and talk to a run's ServerApp.

This command runs Flower's own SuperLink (its FastAPI app, lifespan, flags and TLS, unchanged) on
two TLS listeners of one process:

- Flower's ``--host``/``--port`` (default ``127.0.0.1:8000``): the **operator's side**, every API;
  reached on the SuperLink's host, or through an SSH tunnel or ``kubectl port-forward``;
- ``--fleet-host``/``--fleet-port`` (default ``0.0.0.0:9092``): the **hospitals' side**, which answers
  only the Fleet API (``/v1/fleet/...``, whose requests the SuperLink authenticates with the
  registered node keys) and ``/health``; any other path gets 404 there.

Written here because Flower lacks per-API listeners since its APIs moved to HTTP; it builds on
three of Flower's internal names (:data:`FLOWER_INTERNALS`), so ``tests/deployment`` starts it for
real and fails if a Flower upgrade moves them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

#: The Flower internals this module uses (module, name): its flag parser and validation, its app
#: factory and the lifespan that starts the SuperExec.
FLOWER_INTERNALS = (("flwr.superlink.cli.flower_superlink", "_parse_superlink_lifespan_config"),
                    ("flwr.superlink.cli.flower_superlink", "SuperLinkLifespan"),
                    ("flwr.superlink.main", "create_app"))
#: The hospitals' port. Flower's historical Fleet API port.
DEFAULT_FLEET_PORT = 9092
#: Paths the hospitals' port answers: the Fleet API's endpoints (one path segment each) and health.
FLEET_PATH = re.compile(r"^/v1/fleet/[a-z][a-z-]*$|^/health$")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class FleetOnlyOnPort:
    """ASGI middleware: requests that arrive on ``fleet_port`` reach the app only for Fleet API paths.

    The listener a request came in on is the ASGI scope's ``server`` (the local address of the
    connection); the operator's listener must therefore use another port.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], fleet_port: int) -> None:
        self.app, self.fleet_port = app, fleet_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse (404) what the hospitals' port does not serve; pass everything else on."""
        server = scope.get("server")
        if scope["type"] in ("http", "websocket") and (server is None or server[1] == self.fleet_port) \
                and not FLEET_PATH.match(scope["path"]):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = b"not served on the hospitals' port\n"
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def serve(flower_argv: list[str], fleet_host: str = "0.0.0.0", fleet_port: int = DEFAULT_FLEET_PORT) -> None:
    """Run the SuperLink (blocking) as described in the module docstring; ``flower_argv`` are
    ``flower-superlink``'s own flags, which Flower parses and checks itself."""
    import uvicorn
    from flwr.common.logger import console_handler
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _parse_superlink_lifespan_config
    from flwr.superlink.main import create_app

    sys.argv = ["flower-superlink", *flower_argv]
    config = _parse_superlink_lifespan_config()  # Flower's own flags, checks and certificates
    if config.certificates is None:
        sys.exit("fedpir-superlink: the hospitals' port needs TLS; give --ssl-ca-certfile, --ssl-certfile and "
                 "--ssl-keyfile (the server kit of `fedpir provision init`), not --insecure")
    if fleet_port == config.port:
        sys.exit(f"fedpir-superlink: --fleet-port {fleet_port} is the operator's --port; give them different ports")
    app = FleetOnlyOnPort(create_app(config, SuperLinkLifespan), fleet_port)
    tls = dict(ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, access_log=True, workers=1,
                                           log_config=get_uvicorn_log_config(console_handler.level), **tls))
    sockets = [uvicorn.Config(app, host=host, port=port, **tls).bind_socket()  # exits with uvicorn's message if taken
               for host, port in ((config.host, config.port), (fleet_host, fleet_port))]
    print(f"fedpir-superlink: operator's APIs on {config.host}:{config.port}, "
          f"hospitals' Fleet API on {fleet_host}:{fleet_port}", flush=True)
    server.run(sockets=sockets)
