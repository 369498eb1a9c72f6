"""The settings of one federated run, shared by the ServerApp, the ClientApp and `fedpir simulate`.

Flower passes them as the run config (``[tool.flwr.app.config]`` in pyproject.toml, hyphenated
keys, overridable with ``flwr run . --run-config 'key=value'``). The defaults live here; a test
checks that pyproject.toml lists the same keys and values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from fedpir.alignment.maps import METHODS, POOLINGS
from fedpir.alignment.text import ENCODERS
from fedpir.models.groups import KEY_POLICIES, TASKS
from fedpir.synthetic.sizes import site_sizes
from fedpir.wire.protocol import check_transfer_dtype

#: Strategies whose aggregation is the weighted mean that SecAgg+ computes (the others need the
#: individual updates: median, trimmed mean, the modality-aware mean, server optimizers).
SECURE_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")
#: Where a run that names no run folder writes, in a folder of its own (``run-<Flower run id>``).
RUNS_ROOT = Path.home() / ".fedpir" / "runs"
#: Settings that do not change what a run computes, so a resumed run may differ in them.
NOT_IN_FINGERPRINT: tuple[str, ...] = ("run_dir", "round_timeout", "device", "warm_start")


@dataclass(frozen=True)
class RunSettings:
    """Every knob of a federated run, with CPU-friendly defaults."""

    federation_dir: str = ""  # empty: synthetic federation under run_dir/federation
    run_dir: str = ""  # empty: a new folder RUNS_ROOT/run-<Flower run id> (see with_run_folder)
    seed: int = 0
    num_sites: int = 4
    subjects_per_site: str = "6,9,12,21"  # synthetic sites' patients: one number, or a list cycled over the sites
    volume_size: int = 24
    modalities: str = "t1,t2,flair,pd"
    pretrain_rounds: int = 0  # private pretraining rounds (the public warm start is the pretraining)
    finetune_rounds: int = 4
    local_epochs: int = 1
    batch_size: int = 4
    lr: float = 0.001
    strategy: str = "fedavg"
    key_policy: str = "fedpir"
    dp: bool = True
    epsilon_budget: float = 8.0
    noise_multiplier: float = 0.0  # 0: the noise that spends epsilon_budget over all rounds
    max_grad_norm: float = 1.0
    delta: float = 0.0  # 0: the ledger's delta, else min(1e-5, 1 / (10 patients))
    accountant: str = "prv"  # Opacus accountant: prv (tighter) or rdp
    secret_noise: bool = True  # DP noise and sampling unknowable from the seed (fedpir.privacy.dp.DPConfig)
    finetune_task: str = "segmentation"
    pretrain_trainable: str = "all"  # parameter groups a pretraining round trains (fedpir.models.pir)
    finetune_trainable: str = "norms,adapters,prior,task_out"  # ... a fine-tuning round (docs/results/dp_recipe.json)
    mim: bool = False  # Alice's masked image modelling term in pretraining
    anatomical: bool = False  # Alice's anatomical contrast term in pretraining
    proximal_mu: float = 0.0  # FedProx: the server sends it, sites pull towards the global weights
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    warm_start: str = ""  # public warm-start file (fedpir.models.warm_start); empty: random initialisation
    warm_start_sha256: str = ""  # its checksum, checked by the server and every site
    augment_views: int = 2  # fine-tuning: augmented views averaged per patient before clipping (0: none)
    invariance_weight: float = 1.0  # weight of the invariance term (0: the fedpir-noinv ablation)
    transfer_dtype: str = "float32"  # how a site sends its shared weights: float32, float16, int8 (fedpir.wire.transfer)
    align: bool = False  # after the last round, the alignment stage (fedpir.server.alignment; docs/alignment.md)
    align_method: str = "procrustes"  # the map T: procrustes, lstsq, ridge (fedpir.alignment.maps)
    align_pooling: str = "mean"  # a patient as one vector: X_h mean, max, meanmax; or lesion (fedpir.alignment.anchors)
    text_encoder: str = "auto"  # report embeddings: auto (MiniLM when installed), minilm, hashed (fedpir.alignment.text)
    secure_aggregation: bool = False  # SecAgg+: the server learns only the sum of the updates (fedpir.privacy.secure_aggregation)
    secagg_clipping_range: float = 1.0  # SecAgg+ clips each update value x num-examples / secagg-max-weight to +-this
    secagg_max_weight: float = 100.0  # SecAgg+ weight scale (patients); a site above it is clipped harder
    distributed_noise: bool = False  # with secure-aggregation: each site adds noise std sigma/sqrt(min-sites)
    min_sites: int = 2
    round_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.key_policy not in KEY_POLICIES:
            raise ValueError(f"key-policy {self.key_policy!r} unknown; valid: {', '.join(KEY_POLICIES)}")
        if self.finetune_task not in TASKS:
            raise ValueError(f"finetune-task must be segmentation or classification, not {self.finetune_task!r}")
        check_transfer_dtype(self.transfer_dtype)
        if self.proximal_mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        site_sizes(self.subjects_per_site, self.num_sites)  # raises on a bad size list
        _check_alignment(self)
        self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        """Secure aggregation composes with weighted-mean strategies and float32 transfer only."""
        if self.secure_aggregation and self.strategy not in SECURE_STRATEGIES:
            raise ValueError(f"secure-aggregation needs a weighted-mean strategy ({', '.join(SECURE_STRATEGIES)}), "
                             f"not {self.strategy!r}: the others need each site's update")
        if self.secure_aggregation and self.transfer_dtype != "float32":
            raise ValueError("secure-aggregation quantizes the updates itself: use transfer-dtype float32")
        if self.secure_aggregation and not (self.secagg_clipping_range > 0 and self.secagg_max_weight > 0):
            raise ValueError("secagg-clipping-range and secagg-max-weight must be > 0")
        if self.distributed_noise and not (self.secure_aggregation and self.dp):
            raise ValueError("distributed-noise needs secure-aggregation = true and dp = true: without secure "
                             "aggregation the server would see each site's under-noised update")

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
    def site_sizes(self) -> list[int]:
        """Patients of each synthetic site (``subjects-per-site``, a list cycled over the sites)."""
        return site_sizes(self.subjects_per_site, self.num_sites)

    @property
    def vocabulary(self) -> list[str]:
        """The federation's modality vocabulary, in model channel order."""
        return [m.strip() for m in self.modalities.split(",") if m.strip()]

    def trainable_for(self, stage: str) -> str:
        """The trained parameter groups setting of a federation stage."""
        return self.pretrain_trainable if stage == "pretrain" else self.finetune_trainable

    def with_run_folder(self, run_id: int | str) -> RunSettings:
        """These settings with the run folder resolved: the configured one, else a new folder of
        this run (a rerun never resumes another run by accident)."""
        return self if self.run_dir else replace(self, run_dir=str(RUNS_ROOT / f"run-{run_id}"))

    @property
    def run_path(self) -> Path:
        """Where the server writes checkpoints, logs and the exported model."""
        if not self.run_dir:
            raise ValueError("the run folder is not resolved yet; call with_run_folder(run_id) first")
        return Path(self.run_dir).expanduser()

    def fingerprint(self) -> dict[str, Any]:
        """The settings that define what a run computes (a checkpoint resumes only under these)."""
        return {k: v for k, v in self.to_run_config().items() if k.replace("-", "_") not in NOT_IN_FINGERPRINT}

    @property
    def federation_path(self) -> Path:
        """Folder of the federation (one sub-folder per site)."""
        return Path(self.federation_dir).expanduser() if self.federation_dir else self.run_path / "federation"


def _check_alignment(settings: RunSettings) -> None:
    """Raise ValueError naming the alignment setting that is not one of its choices."""
    for key, value, valid in (("align-method", settings.align_method, [m for m in METHODS if m != "identity"]),
                              ("align-pooling", settings.align_pooling, POOLINGS),
                              ("text-encoder", settings.text_encoder, ENCODERS)):
        if value not in valid:
            raise ValueError(f"{key} {value!r} unknown; valid: {', '.join(valid)}")


def to_flower_keys(names: Any) -> list[str]:
    """Field names as hyphenated run-config keys."""
    return [n.replace("_", "-") for n in names]


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
