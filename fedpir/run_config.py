"""The settings of one federated run, shared by the ServerApp, the ClientApp and `fedpir simulate`.

Flower passes them as the run config (``[tool.flwr.app.config]`` in pyproject.toml, hyphenated
keys, overridable with ``flwr run . --run-config 'key=value'``). The defaults live here; a test
checks that pyproject.toml lists the same keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedpir.alignment.choices import ENCODERS, METHODS, POOLINGS
from fedpir.models.groups import KEY_POLICIES, PARAMETER_GROUPS, TASKS, TRAINABLE_PRESETS, trainable_groups
from fedpir.synthetic.sizes import LESION_CLASS_NAMES, site_sizes
from fedpir.wire.protocol import TRANSFER_DTYPES

#: The strategies a run may name (fedpir.strategies.factory builds each; a test keeps the two equal).
STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi", "trimmed", "median", "modality")
#: Strategies whose aggregation is the weighted mean that SecAgg+ computes (the others need the
#: individual updates: median, trimmed mean, the modality-aware mean, server optimizers).
SECURE_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")
#: The sites' optimizers (fedpir.training.trainer builds each; a test keeps the two equal).
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "adamw")
#: Where round metrics go besides metrics.jsonl (fedpir.server.tracking).
TRACKERS: tuple[str, ...] = ("auto", "tensorboard", "none")
#: Opacus accountants (fedpir.privacy.dp).
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
#: fedpir's folder in the user's home: runs that name no run folder, cached public warm starts.
STATE_ROOT = Path.home() / ".fedpir"
#: Where a run that names no run folder writes, in a folder of its own (``run-<Flower run id>``).
RUNS_ROOT = STATE_ROOT / "runs"
#: Settings that do not change what a run computes, so a resumed run may differ in them.
NOT_IN_FINGERPRINT: tuple[str, ...] = ("run_dir", "round_timeout", "device", "cpus_per_site", "tracking", "warm_start")


def knob(default: Any, help: str, *, choices: Sequence[str] = (), flag: str = "") -> Any:
    """A field of :class:`RunSettings`: its default, its help, its valid values (checked on every
    construction) and, where it is not ``--<run-config key>``, its command-line flag (a switch for a
    bool: it flips the default). The commands derive their flags from these (fedpir.commands.flags)."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices), "flag": flag})


#: The model grid's edge is bounded: below, the encoder has nothing to downsample; above, one patient's
#: volumes (256^3 voxels, 5 channels: 335 MB) already strain a hospital's training node.
MIN_VOLUME_SIZE, MAX_VOLUME_SIZE = 8, 256


@dataclass(frozen=True)
class RunSettings:
    """Every knob of a federated run, with CPU-friendly defaults (each declared once, here)."""

    federation_dir: str = knob("", "federation folder (one sub-folder per site); empty: a synthetic one under the run folder")
    run_dir: str = knob("", "run folder (checkpoints, metrics, model); empty: a new folder ~/.fedpir/runs/run-<Flower run id>")
    seed: int = knob(0, "seed of the synthetic federation, the initialisation and the public corpus")
    num_sites: int = knob(4, "synthetic sites", flag="--sites")
    subjects_per_site: str = knob("6,9,12,21", "patients per synthetic site: one number, or a comma list cycled over the sites",
                                  flag="--subjects")
    site_lesion: str = knob("B", "lesion class of the synthetic sites: B, a private target that no public scan holds; A, the "
                                 "public corpus's own (a task the warm start has already learnt)", choices=LESION_CLASS_NAMES)
    heterogeneity: float = knob(1.0, "how far the synthetic sites' scanners differ (protocol, noise, bias field, gain, slice "
                                     "thickness), 0 (one shared scanner) to 1")
    volume_size: int = knob(24, "model grid edge in voxels (volumes are resampled to it)", flag="--size")
    modalities: str = knob("t1,t2,flair,pd", "the federation's modality vocabulary, in model channel order")
    pretrain_rounds: int = knob(0, "private pretraining rounds (the public warm start is the pretraining)")
    finetune_rounds: int = knob(4, "private fine-tuning rounds")
    local_epochs: int = knob(1, "local epochs per round")
    batch_size: int = knob(4, "expected patients per batch; 0: all of a site's training patients (one step per epoch)")
    lr: float = knob(0.001, "learning rate")
    optimizer: str = knob("adam", "the sites' optimizer (sgd: plain SGD, as a private phase wants; see docs/architecture.md)",
                          choices=OPTIMIZERS)
    strategy: str = knob("fedavg", "server strategy of the federated methods", choices=STRATEGIES)
    key_policy: str = knob("fedpir", "which state-dict keys a site sends (PIRNet.federated_keys)", choices=KEY_POLICIES)
    dp: bool = knob(True, "patient-level DP-SGD (off: train without differential privacy)")
    epsilon_budget: float = knob(8.0, "privacy budget per site (epsilon)", flag="--epsilon")
    noise_multiplier: float = knob(0.0, "fixed DP noise multiplier; 0: the noise that spends the budget over all rounds")
    dp_rounds: int = knob(0, "rounds the planned DP noise spreads the budget over (0: the run's rounds); a hospital's "
                             "policy plans over its own max-rounds instead")
    max_grad_norm: float = knob(1.0, "per-patient clipping bound")
    delta: float = knob(0.0, "DP delta; 0: the ledger's, else min(1e-5, 1 / (10 patients))")
    accountant: str = knob("prv", "Opacus accountant (prv is tighter)", choices=ACCOUNTANTS)
    secret_noise: bool = knob(True, "seed DP noise and sampling from OS entropy; off (--reproducible-noise): from --seed, so "
                                    "that a run repeats (experiments only: whoever knows the seed can replay the noise)",
                              flag="--reproducible-noise")
    finetune_task: str = knob("segmentation", "fine-tuning task", choices=TASKS, flag="--task")
    pretrain_trainable: str = knob("all", "parameter groups a pretraining round trains: a preset "
                                          f"({', '.join(TRAINABLE_PRESETS)}) or a comma list of {', '.join(PARAMETER_GROUPS)}")
    finetune_trainable: str = knob("norms,adapters,prior,task_out", "parameter groups a fine-tuning round trains "
                                                                   "(as --pretrain-trainable; head: the task head only)")
    mim: bool = knob(False, "add Alice's masked-image-modelling term to pretraining")
    anatomical: bool = knob(False, "add Alice's anatomical-contrast term to pretraining")
    proximal_mu: float = knob(0.0, "FedProx mu (with strategy fedprox): sites pull towards the global weights")
    device: str = knob("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    tracking: str = knob("auto", "round metrics besides metrics.jsonl: tensorboard (event files in the run folder's "
                                 "tensorboard/), none, or auto (tensorboard when it is installed)", choices=TRACKERS)
    cpus_per_site: float = knob(0.0, "simulation only: CPUs (and torch threads) each simulated site reserves; 0: enough "
                                     "sites in parallel to fill the cores (cores // sites, at least 1)")
    warm_start: str = knob("", "public warm-start file (fedpir pretrain-public); empty: random initialisation")
    warm_start_sha256: str = knob("", "the warm start's SHA-256, checked by the server and every site")
    segment_positive_weight: float = knob(0.0, "segmentation loss: 0, MONAI Dice+CE; > 0, binary cross-entropy with lesion "
                                                 "voxels weighted by this")
    augment_views: int = knob(2, "fine-tuning: augmented views averaged per patient before clipping (0: none)")
    invariance_weight: float = knob(1.0, "weight of the invariance term (0: the fedpir-noinv ablation)")
    transfer_dtype: str = knob("float32", "how sites send their shared weights (float16/int8 halve/quarter the bytes)",
                               choices=TRANSFER_DTYPES)
    align: bool = knob(False, "after the last round, the alignment stage (docs/alignment.md)")
    align_method: str = knob("procrustes", "the alignment map T", choices=[m for m in METHODS if m != "identity"])
    align_pooling: str = knob("mean", "a patient as one vector: X_h mean, max, meanmax; or lesion", choices=POOLINGS)
    text_encoder: str = knob("auto", "report embeddings: auto (MiniLM when installed), minilm, hashed", choices=ENCODERS)
    secure_aggregation: bool = knob(False, "SecAgg+: the server learns only the sum of the updates")
    secagg_clipping_range: float = knob(1.0, "SecAgg+ clips each update value x num-examples / secagg-max-weight to +-this")
    secagg_max_weight: float = knob(100.0, "SecAgg+ weight scale (patients); a site above it is clipped harder")
    distributed_noise: bool = knob(False, "with secure aggregation: each site adds noise std sigma/sqrt(min-sites)")
    min_sites: int = knob(2, "sites a round needs")
    round_timeout: float = knob(600.0, "seconds the server waits for a round's replies")

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for f in fields(self):
            value, valid = getattr(self, f.name), f.metadata["choices"]
            if valid and value not in valid:
                raise ValueError(f"{f.name.replace('_', '-')} {value!r} unknown; valid: {', '.join(valid)}")
        for spec in (self.pretrain_trainable, self.finetune_trainable):
            trainable_groups(spec)
        if not MIN_VOLUME_SIZE <= self.volume_size <= MAX_VOLUME_SIZE:
            raise ValueError(f"volume-size must be in [{MIN_VOLUME_SIZE}, {MAX_VOLUME_SIZE}] voxels, got {self.volume_size}")
        if self.batch_size < 0 or self.lr <= 0 or self.segment_positive_weight < 0:
            raise ValueError("batch-size must be >= 0 (0: the whole site), lr > 0 and segment-positive-weight >= 0")
        if self.cpus_per_site < 0:
            raise ValueError(f"cpus-per-site must be >= 0 (0: fill the cores), got {self.cpus_per_site}")
        if not 0.0 <= self.heterogeneity <= 1.0:
            raise ValueError(f"heterogeneity must be in [0, 1], got {self.heterogeneity}")
        if self.dp_rounds < 0:
            raise ValueError(f"dp-rounds must be >= 0, got {self.dp_rounds}")
        if self.proximal_mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        site_sizes(self.subjects_per_site, self.num_sites)  # raises on a bad size list
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
            kind = type(getattr(cls, name))
            try:
                values[name] = _as_bool(value) if kind is bool else kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"run-config key {key!r} wants {kind.__name__}, got {value!r}") from None
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


def to_flower_keys(names: Any) -> list[str]:
    """Field names as hyphenated run-config keys."""
    return [n.replace("_", "-") for n in names]


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
