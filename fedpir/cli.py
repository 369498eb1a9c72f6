"""The `fedpir` command. Each subcommand lives in the module that does its job; this file only wires.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "synth": "fedpir.simulation.synth_cli",
    "validate": "fedpir.data.validate_cli",
    "train": "fedpir.client.train_cli",
    "simulate": "fedpir.simulation.simulate_cli",
}


def build_parser() -> argparse.ArgumentParser:
    """Parser with one subcommand per entry of COMMANDS (each module imported here, torch only on run)."""
    parser = argparse.ArgumentParser(prog="fedpir", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
