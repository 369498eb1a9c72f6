"""The settings of one federated run, shared by the ServerApp, the ClientApp and `fedpir simulate`.

Flower passes them as the run config (``[tool.flwr.app.config]`` in pyproject.toml, hyphenated
keys, overridable with ``flwr run . --run-config 'key=value'``). The defaults live here; a test
checks that pyproject.toml lists the same keys and values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

#: Which state-dict keys a site sends to the server (the baselines differ from fedpir here; "local" sends
#: nothing). The keys of each policy are declared on the model: PIRNet.federated_keys.
KEY_POLICIES: tuple[str, ...] = ("fedpir", "fedavg", "fedbn", "fedper", "local")


@dataclass(frozen=True)
class RunSettings:
    """Every knob of a federated run, with CPU-friendly defaults."""

    federation_dir: str = ""  # empty: synthetic federation under run_dir/federation
    run_dir: str = ""  # empty: ~/.fedpir/runs/default
    seed: int = 0
    num_sites: int = 4
    subjects_per_site: int = 12
    volume_size: int = 24
    modalities: str = "t1,t2,flair,pd"
    pretrain_rounds: int = 3
    finetune_rounds: int = 2
    local_epochs: int = 1
    batch_size: int = 4
    lr: float = 0.001
    strategy: str = "fedavg"
    key_policy: str = "fedpir"
    dp: bool = True
    epsilon_budget: float = 8.0
    noise_multiplier: float = 0.0  # 0: the noise that spends epsilon_budget over all rounds
    max_grad_norm: float = 1.0
    secret_noise: bool = True  # DP noise and sampling unknowable from the seed (fedpir.privacy.dp.DPConfig)
    finetune_task: str = "segmentation"
    freeze_encoder: bool = False
    min_sites: int = 2
    round_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.key_policy not in KEY_POLICIES:
            raise ValueError(f"key-policy {self.key_policy!r} unknown; valid: {', '.join(KEY_POLICIES)}")
        if self.finetune_task not in ("segmentation", "classification"):
            raise ValueError(f"finetune-task must be segmentation or classification, not {self.finetune_task!r}")

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        """Build from Flower's run config (hyphenated keys; missing keys take the defaults)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown run-config key {key!r}; known: {', '.join(to_flower_keys(known))}")
            default = getattr(cls, name)
            values[name] = type(default)(value) if not isinstance(default, bool) else _as_bool(value)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """Hyphenated dict, as Flower's run config."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @property
    def vocabulary(self) -> list[str]:
        """The federation's modality vocabulary, in model channel order."""
        return [m.strip() for m in self.modalities.split(",") if m.strip()]

    @property
    def run_path(self) -> Path:
        """Where the server writes checkpoints, logs and the exported model."""
        return Path(self.run_dir).expanduser() if self.run_dir else Path.home() / ".fedpir" / "runs" / "default"

    @property
    def federation_path(self) -> Path:
        """Folder of the federation (one sub-folder per site)."""
        return Path(self.federation_dir).expanduser() if self.federation_dir else self.run_path / "federation"


def to_flower_keys(names: Any) -> list[str]:
    """Field names as hyphenated run-config keys."""
    return [n.replace("_", "-") for n in names]


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
