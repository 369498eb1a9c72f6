"""One hospital's side of the federation: its data, its model with local layers, its trainer.

Plain Python (no Flower): the ClientApp and the baseline runners wire it. The site keeps its
local layers (normalization, adapters, task heads: whatever the key policy does not send) in
``state_dir/local_state.pt`` so that a restarted client continues with them; its privacy ledger
lives in the same folder. The folder is private (0700, files 0600) and the local layers and
signing key are encrypted when the node config names a state key (:mod:`fedpir.privacy.at_rest`).
Training items are patients, not scans (:mod:`fedpir.data.patients`), and the held-out split
keeps all of a patient's sessions on one side.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from fedpir.data.confinement import data_roots_from
from fedpir.data.dataset import SiteDataset, load_site
from fedpir.data.manifest import ManifestError
from fedpir.data.patients import PatientDataset, patient_groups, patient_share
from fedpir.models.groups import objective_for, trainable_groups
from fedpir.models.warm_start import RECORD_NAME, warm_start_record
from fedpir.privacy.at_rest import (
    PLAINTEXT,
    StateCipher,
    load_tensors,
    private_dir,
    read_private,
    save_tensors,
    write_private,
)
from fedpir.run_config import RunSettings
from fedpir.training.model import build_model
from fedpir.training.trainer import LocalTrainer
from fedpir.wire.protocol import EVAL_KEYS

log = logging.getLogger("fedpir.client")

HOLDOUT_FRACTION = 0.25
#: A hospital's secret of its held-out split, in its state folder (see holdout_seed).
HOLDOUT_SECRET_NAME = "holdout_secret"


def summary_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The :data:`fedpir.wire.protocol.EVAL_KEYS` (NaN where not computable; ``loss`` is the total
    loss): the same keys at every site."""
    metrics = {**metrics, "loss": metrics.get("loss_total", float("nan"))}
    return {k: float(metrics.get(k, float("nan"))) for k in EVAL_KEYS}


def split_holdout(n: int, seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) split of ``n`` subject indices; at least one of each when n >= 2."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_hold = min(max(1, round(n * fraction)), n - 1) if n >= 2 else 0
    return sorted(order[n_hold:]), sorted(order[:n_hold])


class SiteDataError(ValueError):
    """A site cannot serve: its data folder cannot be read, or holds no usable subject."""


def split_patients(dataset: SiteDataset, seed: int) -> tuple[PatientDataset, Subset]:
    """Training patients (one DP sample each, see :class:`PatientDataset`) and every session of the
    held-out patients, split by :func:`split_holdout` over patients."""
    groups = patient_groups(dataset.records)
    train, held_out = split_holdout(len(groups), seed)
    return (PatientDataset(dataset, [groups[p] for p in train], seed=seed),
            Subset(dataset, sorted(i for p in held_out for i in groups[p])))


def holdout_seed(state_dir: Path, cipher: StateCipher = PLAINTEXT) -> int:
    """The seed of a hospital's held-out split: drawn once from the OS's entropy and kept in its state
    folder (:data:`HOLDOUT_SECRET_NAME`, 0600, encrypted at rest), so the site chooses its held-out
    patients and keeps them for its life; the server's seed plays no part."""
    path = Path(state_dir) / HOLDOUT_SECRET_NAME
    if not path.is_file():
        write_private(path, secrets.token_bytes(16), cipher)
    return int.from_bytes(read_private(path, cipher)[:8], "big")


#: Sites this process has loaded, by folder, grid, vocabulary, roots and the change times of every entry of the
#: folder (a file changed, added, removed or made unreadable loads the site again). A simulated node's messages
#: move between Ray workers, and a worker rebuilds its Site when another trained that node since
#: (fedpir.client.client_app.site_for); the data has not changed, so it is read once per worker (0.4 s for a site
#: of 20 patients at 24^3). A deployed node loads each task in a new process.
_LOADED: dict[tuple, tuple[SiteDataset, Any]] = {}


def _loaded_site(data_dir: Path, vocabulary: list[str], size: int, data_roots: Sequence[Path]) -> tuple[SiteDataset, Any]:
    """:func:`load_site`, once per process for an unchanged site folder."""
    try:
        stamps = tuple((str(p), s.st_mtime_ns, s.st_ctime_ns, s.st_size)
                       for p in (data_dir, *sorted(data_dir.rglob("*"))) for s in (p.stat(),))
    except OSError:  # unreadable: load_site says what
        return load_site(data_dir, vocabulary, (size, size, size), data_roots=data_roots)
    key = (str(data_dir), tuple(vocabulary), size, tuple(map(str, data_roots)), stamps)
    if key not in _LOADED:
        _LOADED[key] = load_site(data_dir, vocabulary, (size, size, size), data_roots=data_roots)
    return _LOADED[key]


def site_data(settings: RunSettings, data_dir: Path, name: str, data_roots: Sequence[Path] = (),
              split_seed: int | None = None) -> tuple[PatientDataset, Subset, list[str]]:
    """A site's validated data, split into training and held-out patients (by ``split_seed``, else
    the run's seed), and its modalities. Raises :class:`SiteDataError` (one line: what and what to do)
    when the site cannot serve."""
    try:
        dataset, report = _loaded_site(Path(data_dir), settings.vocabulary, settings.volume_size, data_roots)
    except (OSError, ManifestError) as err:
        reason = (f"cannot read its data folder {data_dir} ({err.strerror}: {err.filename})"
                  if isinstance(err, OSError) else str(err))
        raise SiteDataError(f"site {name}: {reason}; check data-dir in the node config and that the SuperNode's "
                            "user may read it") from err
    for issue in report.bad:
        log.warning("site %s: skipping %s", name, issue)
    for duplicate in report.duplicates:
        log.warning("site %s: %s", name, duplicate)
    if not report.good:
        first = f" (first: {report.bad[0]})" if report.bad else ""
        raise SiteDataError(f"site {name}: no usable subject in {data_dir}, {len(report.bad)} refused{first}; "
                            f"run `fedpir validate {data_dir}` and fix what it reports")
    train, holdout = split_patients(dataset, settings.seed if split_seed is None else split_seed)
    return train, holdout, _site_modalities(dataset)


class Site:
    """A site's data split, model, trainer and local state."""

    def __init__(self, settings: RunSettings, data_dir: Path, state_dir: Path, name: str | None = None, *,
                 cipher: StateCipher = PLAINTEXT, data_roots: Sequence[Path] = (), split_seed: int | None = None) -> None:
        self.settings, self.cipher = settings, cipher
        self.state_dir = private_dir(Path(state_dir))
        self.name = name or Path(data_dir).name
        self.train_set, self.holdout_set, self.modalities = site_data(settings, data_dir, self.name, data_roots,
                                                                      split_seed)
        #: Held-out patients, not sessions, for the sensitivity of released held-out averages.
        self.holdout_patients = patient_share(self.holdout_set.dataset.records, self.holdout_set.indices)
        self.model = build_model(settings)
        if settings.warm_start:  # build_model started from it, after checking its checksum
            write_private(self.state_dir / RECORD_NAME, warm_start_record(settings.warm_start, settings.warm_start_sha256))
        self.local_state_path = self.state_dir / "local_state.pt"
        if self.local_state_path.is_file():
            self.model.load_state_dict(load_tensors(self.local_state_path, cipher), strict=False)
        self.trainer = LocalTrainer.for_run(settings, self.model, self.train_set, state_dir=self.state_dir,
                                            seed=settings.seed + _stable_hash(self.name), name=self.name,
                                            state_cipher=cipher)

    @classmethod
    def for_node(cls, settings: RunSettings, data_dir: Path, state_dir: Path, name: str,
                 node_config: Mapping[str, Any]) -> Site:
        """The site of a node config: its state key (``state-key-file``/``state-key-env``), its
        allowed data roots (``data-roots``) and, for a hospital's node (``data-dir``), its own held-out
        split (:func:`holdout_seed`; a simulated site splits by the run's seed, so methods compare alike)."""
        cipher = StateCipher.from_node_config(node_config)
        split_seed = holdout_seed(private_dir(Path(state_dir)), cipher) if "data-dir" in node_config else None
        return cls(settings, data_dir, state_dir, name, cipher=cipher, data_roots=data_roots_from(node_config),
                   split_seed=split_seed)

    # ---- what crosses the network -----------------------------------------------------------
    @property
    def sent_keys(self) -> list[str]:
        """State-dict keys this site sends (and receives) under the run's key policy."""
        return self.model.federated_keys(self.settings.key_policy)

    def sent_state(self) -> dict[str, torch.Tensor]:
        """The tensors the site sends to the server: exactly :attr:`sent_keys`, nothing else."""
        state = self.model.state_dict()
        return {k: state[k].detach().clone() for k in self.sent_keys}

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        """Load the server's global weights; they must be exactly :attr:`sent_keys`."""
        expected = set(self.sent_keys)
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"global weights do not match the key policy: missing {missing[:5]}, unexpected {extra[:5]}")
        self.model.load_state_dict(state, strict=False)

    def save_local(self) -> None:
        """Persist the layers that never leave the site."""
        state = self.model.state_dict()
        kept = {k: v for k, v in state.items() if k not in set(self.sent_keys)}
        save_tensors(kept, self.local_state_path, self.cipher)

    # ---- rounds ---------------------------------------------------------------------------
    def train(self, stage: str, epochs: int, progress: bool = False, proximal_mu: float = 0.0) -> dict[str, float]:
        """One local round of federation ``stage``; returns the trainer's metrics (losses, epsilon, ...).
        ``proximal_mu`` > 0 pulls the exchanged weights towards the global ones (FedProx)."""
        metrics = self.trainer.train_round(
            objective_for(stage, self.settings.finetune_task), epochs,
            groups=trainable_groups(self.settings.trainable_for(stage)), progress=progress,
            proximal_mu=proximal_mu, proximal_keys=tuple(self.sent_keys),
        )
        self.save_local()
        return metrics

    def evaluate(self, stage: str) -> dict[str, float]:
        """Held-out metrics with a fixed key set (see :func:`summary_metrics`)."""
        return summary_metrics(self.trainer.evaluate(self.holdout_set, objective_for(stage, self.settings.finetune_task)))


def _site_modalities(dataset: SiteDataset) -> list[str]:
    present = np.zeros(len(dataset.modalities), dtype=bool)
    for i in range(len(dataset)):
        present |= dataset[i]["present"].numpy()
    return [m for m, p in zip(dataset.modalities, present) if p]


def _stable_hash(text: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % 10_000


def site_state_dir(settings: RunSettings, site_name: str, configured: Any = None) -> Path:
    """The site's state folder: the node config's, else (simulation) under the run folder."""
    return Path(str(configured)).expanduser() if configured else settings.run_path / "sites" / site_name
