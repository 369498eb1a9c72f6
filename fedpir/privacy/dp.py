"""Patient-level DP-SGD with Opacus: configuration, round planning and the private wiring.

The privacy unit is the patient (docs/architecture.md, "Privacy unit"): one dataset item is one patient with
all its modality views, the model keeps the batch dimension = patients in every layer call, so the
per-sample gradients Opacus computes, clips and noises are per-patient gradients and the
accountant's epsilon is patient-level.

Separation as in Opacus: the model stays the caller's plain module (Opacus only attaches hooks to
it, nothing is copied), the optimizer is wrapped into a ``DPOptimizer``, and the accountant belongs
to the site's :class:`~fedpir.privacy.budget.PrivacyBudget`, so that epsilon keeps accumulating
across rounds, stages and client restarts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from fedpir.privacy.secure_aggregation import noise_share
from fedpir.run_config import ACCOUNTANTS, RunSettings

# Opacus' backward hooks make torch warn when a layer's input needs no gradient (the first layer
# sees the image); that is expected here and says nothing about the privacy guarantee.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
# Opacus warns that its secure RNG (torchcsprng, unavailable for current torch) is off. fedpir seeds
# the noise generator itself, from the operating system's entropy unless the run asked for
# reproducible noise (see DPConfig.secret_noise), so the warning says nothing about this run.
warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
# The PRV accountant bounds its numeric domain with an RDP estimate; when that estimate's best order
# is the largest one tried, Opacus warns. The epsilon reported is PRV's own, not the bound.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
# Sampling rate 1 (a site whose batch holds all its training patients, or a noised metric, a Gaussian
# mechanism on all held-out patients: fedpir.privacy.release): PRV's subsampling formula takes
# log(1 - q) = log(0) = -inf, which numpy reports and which is used correctly as the bound of its domain.
warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning,
                        module=r"opacus\.accountants\.analysis\.prv")
# Opacus' functorch per-sample gradients enter torch.amp.autocast with the model's dtype (float32);
# on CPU torch supports only bfloat16/float16 autocast, so it warns and disables autocast: the
# gradients are computed in float32, as without autocast.
warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported", category=UserWarning)

#: How Opacus computes per-patient gradients (``make_private(grad_sample_mode=...)``): "hooks" (per-layer
#: rules; a Conv3d unfolds 27x its input per patient) or "functorch" (vmap of each layer's own
#: backward). ``python -m benchmarks.cost.dp_cost`` measures both (docs/results/benchmarks.jsonl): functorch
#: is the faster and, with every parameter trained, needs no more memory than the non-private step
#: where hooks needs about 1.8x; both give each patient's exact gradient (tests/privacy/test_privacy_dp.py).
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch")
GRAD_SAMPLE_MODE = "functorch"


@dataclass
class DPConfig:
    """Patient-level DP-SGD settings of one site.

    Attributes:
        enabled: False trains without DP (baselines, benchmarks); the ledger then records
            ``"dp": false`` for the round instead of an epsilon.
        target_epsilon: if given, the noise multiplier is computed with Opacus'
            ``get_noise_multiplier`` so that ``planned_rounds`` local rounds of the requested shape
            (epochs, sample rate) reach this epsilon. Exclusive with ``noise_multiplier``.
        noise_multiplier: fixed noise multiplier (std of the noise / max_grad_norm).
        delta: the delta of the (epsilon, delta) guarantee. ``None`` means
            ``min(1e-5, 1 / (10 * n_patients))`` (well below 1/n, the usual rule), or the delta
            already in the site's ledger, so that one site keeps one delta for its whole life.
        max_grad_norm: clipping bound of each patient's gradient (L2 over all trained parameters).
        accountant: ``"rdp"`` or ``"prv"`` (Opacus accountants).
        budget_epsilon: the site's total budget; a round that would exceed it is refused.
        planned_rounds: how many local rounds ``target_epsilon`` is spread over.
        secret_noise: seed each round's Gaussian noise and Poisson sampling from the operating
            system's entropy (:mod:`secrets`), so that nobody who knows the run's seed, the
            server included, can replay the noise and subtract it from an update. False seeds them
            from the trainer's seed: reproducible experiments, only where the seed's owner is the
            data's owner. (Opacus' own ``secure_mode`` needs torchcsprng, which has no build for
            current torch; this is the stand-in, on torch's generator.)
        noise_share: the fraction of the noise std this site adds itself: 1 (local DP), or
            ``1/sqrt(sites)`` under distributed noise with secure aggregation
            (:func:`fedpir.privacy.secure_aggregation.noise_share`); the accountant and the ledger
            count the full ``noise_multiplier``, the guarantee of the sum of the sites' updates.
    """

    enabled: bool = True
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = RunSettings.accountant
    budget_epsilon: float = 8.0
    planned_rounds: int = 1
    secret_noise: bool = True
    noise_share: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.noise_share <= 1:
            raise ValueError(f"noise_share must be in (0, 1], got {self.noise_share}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.budget_epsilon <= 0:
            raise ValueError(f"budget_epsilon must be > 0, got {self.budget_epsilon}")
        if self.planned_rounds < 1:
            raise ValueError(f"planned_rounds must be >= 1, got {self.planned_rounds}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not self.enabled:
            return
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("DP needs exactly one of target_epsilon or noise_multiplier")
        if self.target_epsilon is not None and not 0 < self.target_epsilon <= self.budget_epsilon:
            raise ValueError(
                f"target_epsilon must be in (0, budget_epsilon={self.budget_epsilon}], "
                f"got {self.target_epsilon}"
            )
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")


def dp_config_for(settings: RunSettings) -> DPConfig:
    """A site's DP-SGD settings for a run: a fixed noise multiplier, or (noise-multiplier = 0) the
    one that spends exactly the budget over ``dp-rounds`` rounds (0: all rounds of the run)."""
    common = dict(max_grad_norm=settings.max_grad_norm, budget_epsilon=settings.epsilon_budget,
                  secret_noise=settings.secret_noise, accountant=settings.accountant, delta=settings.delta or None,
                  noise_share=noise_share(settings.distributed_noise, settings.min_sites))
    if not settings.dp:
        return DPConfig(enabled=False, **common)
    if settings.noise_multiplier > 0:
        return DPConfig(noise_multiplier=settings.noise_multiplier, **common)
    rounds = settings.dp_rounds or settings.pretrain_rounds + settings.finetune_rounds
    return DPConfig(target_epsilon=settings.epsilon_budget, planned_rounds=rounds, **common)


def default_delta(n_patients: int) -> float:
    """The delta used when none is configured: ``min(1e-5, 1 / (10 * n_patients))``."""
    if n_patients < 1:
        raise ValueError("a site needs at least one patient")
    return min(1e-5, 1.0 / (10 * n_patients))


@dataclass(frozen=True)
class RoundPlan:
    """What one private local round will do, known before it touches anything."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    noise_share: float = 1.0

    @property
    def added_noise_multiplier(self) -> float:
        """The noise multiplier of the noise this site adds (its share under distributed noise)."""
        return self.noise_multiplier * self.noise_share


def sample_rate_for(n_patients: int, batch_size: int) -> float:
    """Poisson sampling rate of each patient: ``1 / len(DataLoader)``, exactly as Opacus sets it."""
    if n_patients < 1 or batch_size < 1:
        raise ValueError(f"need n_patients >= 1 and batch_size >= 1, got {n_patients}, {batch_size}")
    return 1 / math.ceil(n_patients / batch_size)


def steps_per_epoch(sample_rate: float) -> int:
    """Batches per epoch of Opacus' Poisson sampler (``UniformWithReplacementSampler``)."""
    return int(1 / sample_rate)


def plan_round(cfg: DPConfig, *, n_patients: int, batch_size: int, epochs: int, delta: float) -> RoundPlan:
    """Sample rate, steps and noise multiplier of a private round of ``epochs`` epochs."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    rate = sample_rate_for(n_patients, batch_size)
    steps = epochs * steps_per_epoch(rate)
    if cfg.target_epsilon is not None:
        sigma = get_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps * cfg.planned_rounds,
            accountant=cfg.accountant,
        )
    else:
        assert cfg.noise_multiplier is not None  # DPConfig validation
        sigma = cfg.noise_multiplier
    return RoundPlan(sample_rate=rate, steps=steps, noise_multiplier=float(sigma), max_grad_norm=cfg.max_grad_norm,
                     noise_share=cfg.noise_share)


#: Above this forecast noise/signal ratio a private run is expected to learn little (see forecast).
FORECAST_LIMIT = 10.0


@dataclass(frozen=True)
class Forecast:
    """Expected noise/signal of a private run, known before it starts (see :func:`forecast`)."""

    trained_parameters: int
    expected_batch: float
    steps: int
    noise_multiplier: float
    ratio: float

    @property
    def fails(self) -> bool:
        """Whether the run is expected to learn little."""
        return self.ratio > FORECAST_LIMIT

    def message(self, site: str = "this site") -> str:
        """One paragraph for the site's log: the figures, and what to change when it fails."""
        text = (f"{site}: DP forecast noise/signal {self.ratio:.1f} (d={self.trained_parameters} privately trained "
                f"parameters, {self.expected_batch:.1f} patients per noise draw, {self.steps} private steps, "
                f"noise multiplier {self.noise_multiplier:.2f})")
        if self.fails:
            text += (f"; above {FORECAST_LIMIT:g}, this run is expected to learn little. Options: train fewer "
                     "parameters (pretrain-/finetune-trainable, e.g. norms,adapters,task_head), start from a public "
                     "warm start, pool more patients per noise draw (larger batch-size or more patients), or a "
                     "larger epsilon signed off by the site's privacy officer")
        return text


def forecast(plan: RoundPlan, *, trained_parameters: int, n_patients: float, total_steps: int,
             coherence: float = 1.0) -> Forecast:
    """Noise/signal of DP-SGD over ``total_steps`` steps: sigma * sqrt(d) / (rho * B * sqrt(T)).

    Per step the clipped mean gradient has norm rho * C (rho = ``coherence``, at most 1: the clipped
    per-patient gradients all pointing one way) while the noise added to it has norm about
    sigma * C * sqrt(d) / B (B = q * n expected patients per draw); over T steps the signal adds up
    linearly and independent noise as sqrt(T). A ratio well above 1 means that the noise dominates
    every direction of the update.
    """
    if not 0 < coherence <= 1:
        raise ValueError(f"coherence must be in (0, 1], got {coherence}")
    batch = plan.sample_rate * n_patients
    ratio = plan.noise_multiplier * math.sqrt(trained_parameters) / (coherence * batch * math.sqrt(max(total_steps, 1)))
    return Forecast(trained_parameters, batch, total_steps, plan.noise_multiplier, ratio)


def collate_patients(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``default_collate`` of patient dicts, and ``{}`` for an empty Poisson batch.

    Replaces the collate of Opacus' ``DPDataLoader`` (see :class:`PrivateModel`): Opacus' own
    empty-batch wrapper (``CollateFnWithEmpty``) crashes on dict samples when the *first* batch of
    a loader is empty (it derives zero-length shapes by iterating the first item, which for a dict
    yields its string keys, then calls ``torch.zeros(dtype=str)``), and rebuilding later empty
    batches fails on the list of ``"subject"`` strings. Empty batches never reach the model here
    (see :meth:`PrivateModel.step`), so ``{}`` is all they need to be.
    """
    return default_collate(list(items)) if items else {}


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Number of patients in a batch made by :func:`collate_patients` (0 for an empty batch).
    """
    return int(batch["image"].shape[0]) if batch else 0


class PrivateModel:
    """A plain model, its optimizer and loader made private by Opacus, sharing a given accountant.

    ``module`` is the Opacus ``GradSampleModule`` around the caller's model; the model itself is
    not copied, so weights loaded into it between rounds are what the next round trains.
    :meth:`close` removes the hooks so that the model can be wrapped again (new parameter set).
    The loader must yield patient dicts; its Poisson batches are collated by
    :func:`collate_patients`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        *,
        accountant: IAccountant,
        plan: RoundPlan,
        noise_generator: torch.Generator | None = None,
        grad_sample_mode: str = GRAD_SAMPLE_MODE,
    ) -> None:
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
        engine = PrivacyEngine(accountant=accountant.mechanism())
        engine.accountant = accountant
        self.model = model
        self.module, self.optimizer, self.loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=plan.added_noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode,
        )
        assert isinstance(self.module, GradSampleModule) and isinstance(self.optimizer, DPOptimizer)
        self.loader.collate_fn = collate_patients  # see collate_patients: Opacus' wrapper breaks on dicts
        if self.loader.sample_rate != plan.sample_rate:
            raise RuntimeError(f"Opacus sample rate {self.loader.sample_rate} != planned {plan.sample_rate}")
        self.accountant, self.plan = accountant, plan
        self.optimizer.attach_step_hook(self._account)

    def _account(self, optimizer: DPOptimizer) -> None:
        """Opacus' accounting hook, counting the plan's noise multiplier: the full one even where
        this site adds only its share (distributed noise: the guarantee of the sum)."""
        self.accountant.step(noise_multiplier=self.plan.noise_multiplier,
                             sample_rate=self.plan.sample_rate * optimizer.accumulated_iterations)

    def set_plan(self, plan: RoundPlan) -> None:
        """Use the noise multiplier of a new round plan (the sample rate is fixed by the loader)."""
        if plan.sample_rate != self.loader.sample_rate:
            raise ValueError("sample rate changed: wrap the model again")
        self.optimizer.noise_multiplier = plan.added_noise_multiplier
        self.plan = plan
        self.optimizer.max_grad_norm = plan.max_grad_norm

    def step(self, n_patients: int) -> None:
        """Clip, noise and apply the per-patient gradients of the last backward (or none at all).

        Parameters that took no part in this batch's loss (e.g. the adapter of a modality that no
        sampled patient has) have an exactly zero per-patient gradient; Opacus wants a
        ``grad_sample`` for every optimized parameter, so it gets zeros. With ``n_patients == 0``
        (an empty Poisson batch) this is the noise-only step that DP-SGD takes for an empty sample:
        skipping it would break the accountant's assumptions, so it is applied and counted.
        """
        for p in self.optimizer.params:
            if p.grad_sample is None:
                p.grad_sample = torch.zeros((n_patients, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        """Clear gradients and per-sample gradients of every model parameter."""
        self.optimizer.zero_grad(set_to_none=True)
        self.module.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Remove Opacus hooks and attributes from the model."""
        self.module.cleanup()
