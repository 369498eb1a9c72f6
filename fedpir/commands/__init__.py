"""Every `fedpir` command, one module each (argument wiring only); :func:`main` is the console script.

A command module defines ``add_arguments(parser)`` and ``run(args) -> int``, and imports nothing heavy
at module level (torch, MONAI and Flower load inside ``run``), so that ``--help`` answers at once.
A user error (bad settings, a missing or unreadable file, a refused resume) ends the command with
one line on stderr and exit code 2, never a traceback; ``FEDPIR_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from fedpir import __version__

DESCRIPTION = ("fedpir: hospitals train one 3D medical imaging model together; no patient image leaves its hospital\n"
               "(personalized invariant pretraining, patient-level differential privacy, Flower).")
#: Each command: its module in this package and its one-line help (listed without importing the module).
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "write a synthetic hospital federation (physics-based MR phantoms, NIfTI + manifests)"),
    "validate": ("validate", "check a site's data (manifest, BraTS or IXI folder); list bad subjects with reasons"),
    "train": ("train", "train one site locally (patient-level DP-SGD unless --no-dp); report losses, epsilon, metrics"),
    "pretrain-public": ("pretrain_public", "build a warm-start file on public data (synthetic by default), with its SHA-256"),
    "simulate": ("simulate", "simulate a federation on this machine: fedpir vs baselines, a Markdown report and plots"),
    "provision": ("provision", "federation CA, SuperLink TLS certificate, hospital node keys: init, add, rotate, revoke"),
    "site": ("site", "a hospital's controls: approve or withdraw an app's FAB hash, node status, privacy policy"),
    "audit": ("audit", "verify a site's privacy ledger, write an audit report, run a membership-inference attack"),
}
#: What a user can cause by what they typed or pointed at: reported in one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the commands' docstrings as written and shows each option's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default is not argparse.SUPPRESS
                and not any(action.default is v for v in (None, False, True)) and action.default != []):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the reason and where to look), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `fedpir` parser: every command with its help line; only ``command``'s module is imported,
    for its arguments."""
    parser = Parser(prog="fedpir", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedpir {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_line) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_line, description=help_line, formatter_class=HelpFormatter)
        if name == command:
            module = importlib.import_module(f"{__name__}.{module_name}")
            cmd.description = module.__doc__ or help_line
            module.add_arguments(cmd)
            cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
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
