"""``fedpir-superlink``: ``flower-superlink`` whose ``--host``/``--port`` serve the federation operator
and ``--fleet-host``/``--fleet-port`` only the hospitals' Fleet API (fedpir.deployment.superlink).

    fedpir-superlink [--fleet-host HOST] [--fleet-port PORT] FLOWER-SUPERLINK-FLAGS...
"""

from __future__ import annotations

import argparse
import sys

from fedpir.deployment.superlink import DEFAULT_FLEET_PORT, serve


def main(argv: list[str] | None = None) -> None:
    """Split off this command's two flags; every other flag is ``flower-superlink``'s."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fedpir-superlink", add_help=False,
        description="flower-superlink whose --host/--port serve the operator (Control and Runtime APIs) and "
                    "--fleet-host/--fleet-port only the hospitals' Fleet API; every other flag is flower-superlink's")
    parser.add_argument("--fleet-host", default="0.0.0.0", help="address of the hospitals' listener (default 0.0.0.0)")
    parser.add_argument("--fleet-port", type=int, default=DEFAULT_FLEET_PORT,
                        help=f"port of the hospitals' listener (default {DEFAULT_FLEET_PORT})")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nflower-superlink's flags:\n")
    ours, flower_argv = parser.parse_known_args(argv)
    serve(flower_argv, ours.fleet_host, ours.fleet_port)
