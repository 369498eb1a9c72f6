"""Data path: patients per second of local training read from NIfTI on disk against the same model
fed from memory.

One synthetic site on disk (NIfTI + manifest). The same fine-tuning rounds (no DP: its cost is
benchmarks.cost.dp_cost's) run on the site read as a site runs it (``load_site``: MONAI CacheDataset,
every patient loaded and preprocessed once, then served from memory), read from disk at every
step (``cache=False``: loading and transforms on the training path), and on the cached patients
pre-collated into tensors (no dataset, no collation). Also: patients per second of loading and
preprocessing alone, and the seconds to fill the cache.

    python -m benchmarks.cost.data_path [--patients 8 --size 24 --epochs 3 --device cpu]
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from benchmarks.cost.common import emit, parser, ratio, timed
from fedpir.data.dataset import load_site
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.privacy.dp import DPConfig
from fedpir.run_config import RunSettings
from fedpir.synthetic.federation import generate_federation
from fedpir.synthetic.scanners import MODALITIES
from fedpir.training.trainer import LocalTrainer

OBJECTIVE = "segmentation"


class InMemory(Dataset):
    """Patients already loaded, as a list of dicts of tensors."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def patients_per_second(dataset: Dataset, size: int, epochs: int, device: str) -> float:
    """Patients per second of the fastest of ``epochs`` one-epoch fine-tuning rounds on a fresh model
    (after a warm-up epoch; the fastest is the least disturbed by other jobs)."""
    torch.manual_seed(0)
    model = PIRNet(PIRConfig(list(MODALITIES), spatial_size=(size,) * 3))
    trainer = LocalTrainer(model, dataset, dp=DPConfig(enabled=False), augment_views=RunSettings().augment_views,
                           device=device)
    trainer.train_round(OBJECTIVE, 1, progress=False)
    seconds = min(trainer.train_round(OBJECTIVE, 1, progress=False)["seconds"] for _ in range(epochs))
    return len(dataset) / seconds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--size", type=int, default=RunSettings().volume_size, help="volume edge in voxels")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per configuration (the fastest counts)")
    args = p.parse_args(argv)
    shape, vocab = (args.size,) * 3, list(MODALITIES)
    with tempfile.TemporaryDirectory(prefix="fedpir-data-") as tmp:
        fed = generate_federation(Path(tmp), n_sites=1, subjects_per_site=args.patients, shape=shape, seed=0,
                                  modality_subsets=[vocab])
        (cached, _), cache_s = timed(load_site, fed / "site-0", vocab, shape)
        disk, _ = load_site(fed / "site-0", vocab, shape, cache=False)
        start = time.perf_counter()
        items = [disk[i] for i in range(len(disk))]
        load_rate = len(items) / (time.perf_counter() - start)
        rates = {"memory_cache": patients_per_second(cached, args.size, args.epochs, args.device),
                 "disk": patients_per_second(disk, args.size, args.epochs, args.device),
                 "memory_tensors": patients_per_second(InMemory(items), args.size, args.epochs, args.device)}
    figures = {"patients_per_s": rates, "ratio_disk_to_memory": ratio(rates["disk"], rates["memory_tensors"]),
               "ratio_cache_to_memory": ratio(rates["memory_cache"], rates["memory_tensors"]),
               "load_patients_per_s": load_rate, "cache_fill_s": cache_s}
    config = {"patients": args.patients, "size": args.size, "epochs": args.epochs, "modalities": len(vocab),
              "objective": OBJECTIVE, "dp": False, "target": "loading is not the bottleneck (site's path / memory ~ 1)"}
    return emit("data_path", argv, args, config, figures)


if __name__ == "__main__":
    main()
