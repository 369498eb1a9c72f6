"""Per-round checkpoints of the global shared weights and the strategy state, for crash/resume.

Layout under the run folder::

    checkpoints/run.json             the settings that define the run and their SHA-256
    checkpoints/latest.json          {"round": k, "stage": "pretrain", "stage_round": j, "file": ...}
    checkpoints/round-0007.npz       global shared arrays after round 7
    checkpoints/round-0007.strategy.npz   server-optimizer state (FedAdam/FedYogi moments)

Files are written to a temporary name and renamed, so a crash mid-write leaves the previous
checkpoint intact; the folder is 0700 and its files 0600 (:mod:`fedpir.privacy.at_rest`). A store
opened with other settings than those in ``run.json`` refuses to resume (:class:`ResumeError`): a
run resumes only itself. Flower keeps the server-optimizer state in plain attributes
(`current_arrays`, `m_t`, `v_t` of FedOpt strategies) and offers no save/restore; we persist
those attributes here.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpir.privacy.at_rest import private_dir, write_private

#: Strategy attributes (dict[str, ndarray] or None) that carry server-optimizer state in Flower.
STRATEGY_STATE_ATTRS: tuple[str, ...] = ("current_arrays", "m_t", "v_t")


@dataclass
class Checkpoint:
    """What a resumed server needs: where it was, and the global shared weights then."""

    round: int
    stage: str
    stage_round: int
    arrays: ArrayRecord
    strategy_state: dict[str, dict[str, np.ndarray]]


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_private(path, buffer.getvalue())


def strategy_state(strategy: object) -> dict[str, dict[str, np.ndarray]]:
    """The server-optimizer state held by a Flower strategy (empty for stateless FedAvg)."""
    return {
        attr: dict(value)
        for attr in STRATEGY_STATE_ATTRS
        if isinstance(value := getattr(strategy, attr, None), dict)
    }


def restore_strategy_state(strategy: object, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put saved server-optimizer state back on a freshly built strategy."""
    for attr, value in state.items():
        setattr(strategy, attr, value)


class ResumeError(ValueError):
    """The run folder holds checkpoints of a run with other settings."""


def _digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


class CheckpointStore:
    """Saves and loads per-round checkpoints in ``run_dir/checkpoints`` for the run whose defining
    settings are ``fingerprint`` (written to ``run.json`` on first use, checked afterwards)."""

    def __init__(self, run_dir: Path, fingerprint: dict[str, Any], keep: int = 2) -> None:
        self.dir = private_dir(Path(run_dir) / "checkpoints")
        self.keep = keep
        self._claim(fingerprint)

    def _claim(self, fingerprint: dict[str, Any]) -> None:
        """Record this run's settings, or check them against the recorded ones."""
        run_file = self.dir / "run.json"
        digest = _digest(fingerprint)
        if run_file.is_file():
            recorded = json.loads(run_file.read_text())
            if recorded["sha256"] != digest:
                old = recorded["settings"]
                changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                diff = ", ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed[:6])
                raise ResumeError(
                    f"{self.dir.parent} holds a run with other settings ({diff}); it resumes only with "
                    "the same settings: give this run another run-dir (or leave run-dir unset for a new one)"
                )
            return
        if (self.dir / "latest.json").is_file():
            raise ResumeError(f"{self.dir} holds checkpoints without their run settings; use another run-dir")
        write_private(run_file, json.dumps({"sha256": digest, "settings": fingerprint}, indent=1, sort_keys=True).encode())

    def save(self, ckpt: Checkpoint) -> Path:
        """Write a checkpoint, point latest.json at it, prune old ones."""
        stem = f"round-{ckpt.round:04d}"
        arrays_path = self.dir / f"{stem}.npz"
        _atomic_savez(arrays_path, {k: v.numpy() for k, v in ckpt.arrays.items()})
        flat_state = {
            f"{attr}/{key}": arr for attr, d in ckpt.strategy_state.items() for key, arr in d.items()
        }
        _atomic_savez(self.dir / f"{stem}.strategy.npz", flat_state)
        latest = {"round": ckpt.round, "stage": ckpt.stage, "stage_round": ckpt.stage_round, "file": stem}
        write_private(self.dir / "latest.json", json.dumps(latest).encode())
        self._prune(ckpt.round)
        return arrays_path

    def _prune(self, newest: int) -> None:
        for path in self.dir.glob("round-*.npz"):
            number = int(path.name.split(".")[0].split("-")[1])
            if number <= newest - self.keep:
                path.unlink(missing_ok=True)

    def load_latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None when the run has none."""
        latest = self.dir / "latest.json"
        if not latest.is_file():
            return None
        meta = json.loads(latest.read_text())
        with np.load(self.dir / f"{meta['file']}.npz") as data:
            arrays = ArrayRecord({k: Array(data[k]) for k in data.files})
        state: dict[str, dict[str, np.ndarray]] = {}
        with np.load(self.dir / f"{meta['file']}.strategy.npz") as data:
            for flat in data.files:
                attr, key = flat.split("/", 1)
                state.setdefault(attr, {})[key] = data[flat]
        return Checkpoint(meta["round"], meta["stage"], meta["stage_round"], arrays, state)
