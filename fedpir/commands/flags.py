"""Command-line flags of the run settings: each knob's flag, type, default, choices and help come
from its declaration in :class:`fedpir.run_config.RunSettings`, so every command that offers a knob
spells and defaults it the same way."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import Field, fields
from typing import Any

from fedpir.run_config import RunSettings

KNOBS: dict[str, Field] = {f.name: f for f in fields(RunSettings)}


def flag_of(name: str) -> str:
    """The command-line flag of knob ``name``: its declared one, else ``--<run-config key>`` (for a
    bool, the switch away from its default: ``--mim``, ``--no-dp``)."""
    knob = KNOBS[name]
    if knob.metadata["flag"]:
        return knob.metadata["flag"]
    key = name.replace("_", "-")
    return f"--no-{key}" if knob.default is True else f"--{key}"


def add_settings_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: Iterable[str],
                       defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per knob in ``names`` (``defaults`` overrides a knob's default for this command; None:
    the command fills it in, from a preset)."""
    for name in names:
        knob = KNOBS[name]
        default = (defaults or {}).get(name, knob.default)
        kwargs: dict[str, Any] = {"dest": name, "default": default, "help": knob.metadata["help"]}
        if isinstance(knob.default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
            kwargs["help"] += f" [{'on' if default else 'off'} unless this flag is given]"
        else:
            kwargs["type"] = type(knob.default)
            kwargs["help"] += " (default: %(default)s)" if default is not None else " (default: from --preset)"
            if knob.metadata["choices"]:
                kwargs["choices"] = knob.metadata["choices"]
        flag = flag_of(name)
        if not isinstance(knob.default, bool) and "choices" not in kwargs:
            kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(flag, **kwargs)


def settings_from_args(args: argparse.Namespace, names: Iterable[str], **overrides: Any) -> RunSettings:
    """The run settings of the knobs ``names`` (those :func:`add_settings_flags` added) as the flags set
    them, with ``overrides`` (ValueError if one is invalid)."""
    values = {name: getattr(args, name) for name in names}
    return RunSettings(**{**values, **overrides})
