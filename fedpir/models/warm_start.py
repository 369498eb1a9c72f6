"""Warm starts: model weights pretrained without privacy cost on public data, as a file with a checksum.

A run names the file and its SHA-256 (run config ``warm-start``, ``warm-start-sha256``). The server
starts the global shared weights from it and every site initialises its whole model (shared and
local layers, task heads) from it before its first round, after checking the checksum, and records
which file it started from in its state folder (``warm_start.json``). ``fedpir pretrain-public``
builds such a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

RECORD_NAME = "warm_start.json"


class WarmStartError(ValueError):
    """The warm-start file is missing, altered, or does not fit the model."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_warm_start(model: nn.Module, path: Path, meta: dict[str, Any]) -> str:
    """Write the model's state dict and ``meta`` (how it was made) to ``path``; return its SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)
    return file_sha256(path)


def read_warm_start(path: Path, sha256: str) -> dict[str, Any]:
    """The checked content of a warm-start file: {"state_dict": ..., "meta": ...}."""
    path = Path(path).expanduser()
    if not sha256:
        raise WarmStartError(f"warm start {path}: the run config must name its SHA-256 (warm-start-sha256)")
    if not path.is_file():
        raise WarmStartError(f"warm start {path} does not exist; build it with `fedpir pretrain-public`")
    actual = file_sha256(path)
    if actual != sha256:
        raise WarmStartError(f"warm start {path} has SHA-256 {actual}, the run expects {sha256}: refusing to start from it")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is no checkpoint
        raise WarmStartError(f"warm start {path} is not a warm-start file ({type(err).__name__})") from err
    if not isinstance(content, dict) or "state_dict" not in content:
        raise WarmStartError(f"warm start {path} is not a warm-start file (no state_dict)")
    return content


def load_warm_start(model: nn.Module, path: Path, sha256: str) -> dict[str, Any]:
    """Load a checked warm start into every layer of ``model``; return its meta."""
    content = read_warm_start(path, sha256)
    try:
        model.load_state_dict(content["state_dict"])
    except RuntimeError as err:
        raise WarmStartError(f"warm start {path} does not fit this model ({str(err).splitlines()[0]})") from err
    return content["meta"]


def warm_start_record(path: str, sha256: str) -> bytes:
    """What a site keeps in its state folder (as :data:`RECORD_NAME`) about the warm start it began from."""
    return (json.dumps({"path": str(path), "sha256": sha256}) + "\n").encode()
