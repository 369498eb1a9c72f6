"""The `fedpir` command. Each subcommand lives in the module that does its job; this file only wires.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
A user error (bad settings, a missing or unreadable file, a refused resume) ends the command with
one line on stderr and exit code 2, never a traceback; ``FEDPIR_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, str] = {
    "synth": "fedpir.commands.synth",
    "validate": "fedpir.commands.validate",
    "train": "fedpir.commands.train",
    "pretrain-public": "fedpir.commands.pretrain_public",
    "simulate": "fedpir.commands.simulate",
    "provision": "fedpir.commands.provision",
    "site": "fedpir.commands.site",
    "audit": "fedpir.commands.audit",
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


#: What a user can cause by what they typed or pointed at: reported in one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"fedpir {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if os.environ.get("FEDPIR_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"fedpir {args.command}: error: {message}", file=sys.stderr)
        return 2

