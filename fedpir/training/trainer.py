"""Local training of one site: pretraining and fine-tuning rounds, private (Opacus) or not.

One :class:`LocalTrainer` per site and process. It trains the caller's plain :class:`PIRNet` in
place (Opacus only hooks it), so the federation reads and writes shared weights on that same
object between rounds. Each round is accounted in the site's ledger (``state_dir``); a private round
that would exceed the site's budget is refused before it changes anything.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fedpir.models.evaluation import evaluate as evaluate_model
from fedpir.models.groups import OBJECTIVE_MODULES, PARAMETER_GROUPS
from fedpir.models.losses import LossConfig, finetune_losses, loss_terms, pretrain_losses
from fedpir.models.pir import PIRNet
from fedpir.privacy.at_rest import PLAINTEXT, StateCipher
from fedpir.privacy.budget import PrivacyBudget, PrivacyLedger
from fedpir.privacy.dp import (
    DPConfig,
    Forecast,
    PrivateModel,
    RoundPlan,
    batch_size_of,
    collate_patients,
    default_delta,
    dp_config_for,
    forecast,
    plan_round,
)
from fedpir.run_config import RunSettings

log = logging.getLogger("fedpir.client")
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


@dataclass
class _Session:
    """Optimizer and loader of one set of trained parameters, reused across rounds."""

    key: tuple[str, tuple[str, ...]]
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    private: PrivateModel | None
    forecast: Forecast | None = None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def resolve_device(spec: str) -> torch.device:
    """A torch device from a setting: "auto" is CUDA when present, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    return device


class LocalTrainer:
    """Trains one site's PIRNet on its dataset, with patient-level DP-SGD unless ``dp.enabled`` is False.

    The epsilon budget, delta and accountant history live in the ledger of ``state_dir`` (in memory
    when None), so a new trainer on the same folder continues the site's accounting. ``seed`` makes
    rounds reproducible: the sampling, noise and augmentation streams of round r are seeded by
    (seed, r), with r counted in the ledger, so no two rounds of a site reuse a stream; under DP
    with ``dp.secret_noise`` (the default) the noise and sampling streams are secret instead.
    The ledger's entries are chained and signed with the site's key (``ledger_key``, by default in
    ``state_dir``, encrypted under ``state_cipher``); a ledger that does not verify raises
    LedgerError here, before any training.
    """

    def __init__(
        self,
        model: PIRNet,
        dataset: Dataset,
        *,
        dp: DPConfig,
        loss_cfg: LossConfig | None = None,
        batch_size: int = 4,
        lr: float = 1e-3,
        optimizer: str = "adam",
        seed: int = 0,
        state_dir: Path | None = None,
        device: str | torch.device = "cpu",
        augment_views: int = 0,
        modality_dropout: float = 0.0,
        name: str = "site",
        ledger_key: Path | None = None,
        state_cipher: StateCipher = PLAINTEXT,
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
        if batch_size < 1 or lr <= 0:
            raise ValueError(f"need batch_size >= 1 and lr > 0, got {batch_size}, {lr}")
        self.n_patients = len(dataset)  # type: ignore[arg-type]
        if self.n_patients < 1:
            raise ValueError("the site has no usable patients")
        self.model, self.dataset, self.dp, self.loss_cfg = model, dataset, dp, loss_cfg or LossConfig()
        self.batch_size, self.lr, self.optimizer_name, self.seed = batch_size, lr, optimizer, seed
        self.augment_views, self.modality_dropout, self.name = augment_views, modality_dropout, name
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model.to(self.device)
        self.ledger = PrivacyLedger.in_dir(state_dir, key_path=ledger_key, cipher=state_cipher)
        self.budget: PrivacyBudget | None = None
        if dp.enabled:
            delta = dp.delta or self.ledger.delta or default_delta(self.n_patients)
            self.budget = PrivacyBudget(dp.budget_epsilon, delta, accountant=dp.accountant, ledger=self.ledger)
        # Opacus draws the noise on the parameters' device; sampling and augmentation run on the CPU.
        self._data_gen, self._loss_gen = torch.Generator(), torch.Generator()
        self._noise_gen = torch.Generator(device=self.device)
        self._session: _Session | None = None
        self._plans: dict[int, RoundPlan] = {}
        self._last_objective = "pretrain"

    @classmethod
    def for_run(cls, settings: RunSettings, model: PIRNet, dataset: Dataset, *, state_dir: Path | None,
                seed: int, name: str = "site", state_cipher: StateCipher = PLAINTEXT,
                modality_dropout: float = 0.0) -> LocalTrainer:
        """The trainer of a run's settings (DP, losses, batch size, learning rate, device);
        ``modality_dropout``: see :func:`~fedpir.models.losses.augmented_views`."""
        return cls(model, dataset, dp=dp_config_for(settings),
                   loss_cfg=LossConfig(w_invariance=settings.invariance_weight, mim=settings.mim,
                                       anatomical=settings.anatomical, positive_weight=settings.segment_positive_weight),
                   batch_size=settings.batch_size or len(dataset),  # type: ignore[arg-type]
                   lr=settings.lr, optimizer=settings.optimizer, seed=seed, state_dir=state_dir,
                   device=settings.device, augment_views=settings.augment_views,
                   modality_dropout=modality_dropout, name=name, state_cipher=state_cipher)

    # ---- planning ------------------------------------------------------------------------
    @property
    def delta(self) -> float | None:
        """Delta of the site's guarantee (None without DP)."""
        return self.budget.delta if self.budget else None

    def epsilon(self) -> float | None:
        """Epsilon spent so far by the site (None without DP)."""
        return self.budget.spent() if self.budget else None

    def plan(self, epochs: int) -> RoundPlan:
        """Sample rate, steps and noise multiplier of a private round of ``epochs`` epochs
        (cached: Opacus' noise search for a target epsilon takes seconds)."""
        assert self.budget is not None, "plan() is for private training"
        if epochs not in self._plans:
            self._plans[epochs] = plan_round(
                self.dp, n_patients=self.n_patients, batch_size=self.batch_size, epochs=epochs, delta=self.budget.delta
            )
        return self._plans[epochs]

    # ---- rounds --------------------------------------------------------------------------
    def _session_for(self, objective: str, groups: tuple[str, ...], plan: RoundPlan | None) -> _Session:
        """Set which parameters train; reuse the current optimizer/Opacus wrapping if they did not change."""
        trainable = tuple(self.model.set_trainable(objective, groups))
        key = (objective, trainable)
        if self._session is not None and self._session.key == key:
            if self._session.private is not None and plan is not None:
                self._session.private.set_plan(plan)
            return self._session
        if self._session is not None and self._session.private is not None:
            self._session.private.close()  # new parameter set: re-wrap, the accountant carries on
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = OPTIMIZERS[self.optimizer_name](params, lr=self.lr)
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=True, generator=self._data_gen, collate_fn=collate_patients
        )
        private = None
        if plan is not None:
            assert self.budget is not None
            private = PrivateModel(
                self.model, optimizer, loader, accountant=self.budget.accountant, plan=plan, noise_generator=self._noise_gen
            )
            optimizer, loader = private.optimizer, private.loader
        self._session = _Session(key, optimizer, loader, private)
        return self._session

    def _seed_round(self, round_index: int) -> None:
        seeds = [int(s) for s in np.random.SeedSequence([self.seed, round_index]).generate_state(3, np.uint64)]
        if self.budget is not None and self.dp.secret_noise:
            seeds[:2] = [secrets.randbits(63), secrets.randbits(63)]  # sampling and noise: see DPConfig
        for gen, s in zip((self._data_gen, self._noise_gen, self._loss_gen), seeds, strict=True):
            gen.manual_seed(s % 2**63)

    def _losses(self, objective: str, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = _to_device(batch, self.device)
        if objective == "pretrain":
            return pretrain_losses(self.model, batch, self.loss_cfg, generator=generator)
        views = self.augment_views if self.model.training else 0
        return finetune_losses(self.model, batch, objective, views=views, generator=generator,
                               modality_dropout=self.modality_dropout, positive_weight=self.loss_cfg.positive_weight)

    def train_round(
        self,
        objective: str = "pretrain",
        epochs: int = 1,
        *,
        groups: tuple[str, ...] = PARAMETER_GROUPS,
        progress: bool = True,
        proximal_mu: float = 0.0,
        proximal_keys: tuple[str, ...] = (),
    ) -> dict[str, float]:
        """Train ``epochs`` local epochs of ``objective`` ("pretrain", "segmentation" or
        "classification"), updating only the parameters of ``groups`` (see
        :meth:`PIRNet.set_trainable`).

        FedProx: with ``proximal_mu`` > 0, after every optimizer step each trained parameter named
        in ``proximal_keys`` (the weights the server sent) moves towards its value at the start
        of the round, ``w -= lr * mu * (w - w_start)``: the gradient step of the proximal term
        ``mu/2 ||w - w_start||^2``, decoupled from the (noisy) data gradient. It depends on no
        patient, so under DP it is post-processing and costs no privacy.

        Returns the patient-weighted mean of each loss term over the round (``loss_<term>``, every
        term of :func:`~fedpir.models.losses.loss_terms`: 0 in a round whose Poisson batches were all empty),
        ``epsilon`` spent so far and ``delta`` (private rounds only), ``dp`` (1.0 or 0.0),
        ``n_patients``, ``steps``, ``empty_batches`` (Poisson batches without patients: a
        noise-only step each) and ``seconds``. Raises BudgetExceededError, with nothing changed,
        if a private round would exceed the site's budget. The loss means are for monitoring:
        they are computed from the private data and are not covered by the DP guarantee.
        """
        if objective not in OBJECTIVE_MODULES:
            raise ValueError(f"objective must be one of {tuple(OBJECTIVE_MODULES)}, got {objective!r}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        plan = self.plan(epochs) if self.budget else None
        if self.budget is not None and plan is not None:
            self.budget.check(plan)  # before anything changes
        session = self._session_for(objective, groups, plan)
        self._last_objective = objective
        if plan is not None:
            self._forecast(session, plan)
        anchor = self._proximal_anchor(proximal_mu, proximal_keys)
        self._seed_round(len(self.ledger.entries))
        steps_before = sum(h[2] for h in self.budget.accountant.history) if self.budget else 0
        sums: dict[str, float] = defaultdict(float)
        patients = steps = empty = 0
        start = time.perf_counter()
        completed = False
        self.model.train()
        (session.private.zero_grad if session.private else session.optimizer.zero_grad)()  # after a failed round
        bar = tqdm(total=epochs * len(session.loader), desc=objective, unit="step", disable=not progress, leave=False)
        try:
            for _ in range(epochs):
                for batch in session.loader:
                    n = batch_size_of(batch)
                    if n:
                        terms = self._losses(objective, batch, self._loss_gen)
                        terms["total"].backward()
                        for name, value in terms.items():
                            sums[name] += float(value.detach()) * n
                        patients += n
                    else:
                        empty += 1
                    if session.private is not None:
                        session.private.step(n)
                    elif n:
                        session.optimizer.step()
                        session.optimizer.zero_grad(set_to_none=True)
                    self._proximal_step(anchor, proximal_mu)
                    steps += 1
                    bar.update()
                    if n:
                        bar.set_postfix(loss=f"{float(terms['total'].detach()):.4f}")
                if self.budget is not None:
                    bar.set_postfix(loss=f"{sums['total'] / max(patients, 1):.4f}", eps=f"{self.budget.spent():.3f}")
            completed = True
        finally:
            bar.close()
            record: dict[str, Any] = {"epochs": epochs, "n_patients": self.n_patients}
            if self.budget is not None and plan is not None:
                counted = sum(h[2] for h in self.budget.accountant.history) - steps_before
                if counted:  # a failed round still spent what it counted
                    self.budget.record(objective=objective, plan=plan, steps=counted, completed=completed,
                                       secret_noise=self.dp.secret_noise, **record)
                if completed and counted != plan.steps:
                    raise RuntimeError(f"accountant counted {counted} steps, planned {plan.steps}")
            elif completed:
                self.ledger.append({"dp": False, "objective": objective, "steps": steps, **record})
        metrics = {f"loss_{name}": sums[name] / max(patients, 1) for name in loss_terms(objective, self.loss_cfg)}
        metrics.update(
            dp=float(self.budget is not None),
            n_patients=float(self.n_patients),
            steps=float(steps),
            empty_batches=float(empty),
            seconds=time.perf_counter() - start,
        )
        if self.budget is not None:
            metrics.update(epsilon=self.budget.spent(), delta=self.budget.delta)
        if session.forecast is not None:
            metrics.update(noise_to_signal=session.forecast.ratio)
        return metrics

    def _forecast(self, session: _Session, plan: RoundPlan) -> None:
        """Log the noise/signal forecast of the run's private rounds once per set of trained parameters
        (a warning with options when it predicts failure)."""
        if session.forecast is not None:
            return
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        session.forecast = forecast(plan, trained_parameters=trained, n_patients=self.n_patients,
                                    total_steps=plan.steps * self.dp.planned_rounds)
        (log.warning if session.forecast.fails else log.info)(session.forecast.message(self.name))

    def _proximal_anchor(self, mu: float, keys: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, its value now) for each trained parameter of ``keys`` when ``mu`` > 0."""
        if mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {mu}")
        if mu == 0:
            return {}
        wanted = set(keys)
        return {name: (p, p.detach().clone()) for name, p in self.model.named_parameters()
                if p.requires_grad and name in wanted}

    @torch.no_grad()
    def _proximal_step(self, anchor: dict[str, tuple[torch.Tensor, torch.Tensor]], mu: float) -> None:
        for param, start in anchor.values():
            param.sub_(self.lr * mu * (param - start))

    @torch.no_grad()
    def evaluate(self, dataset: Dataset, objective: str | None = None) -> dict[str, float]:
        """Metrics of :func:`fedpir.models.evaluation.evaluate` (synthesis PSNR/SSIM, Dice,
        accuracy/AUROC) plus the patient-weighted mean loss terms (``loss_<term>``) of an
        objective (default: the last trained one) on ``dataset``, with fixed augmentation seeds so
        that evaluations are comparable."""
        objective = objective or self._last_objective
        loader = DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate_patients)
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator().manual_seed(self.seed)
        sums: dict[str, float] = defaultdict(float)
        patients = 0
        try:
            for batch in loader:
                n = batch_size_of(batch)
                for name, value in self._losses(objective, batch, generator).items():
                    sums[name] += float(value) * n
                patients += n
        finally:
            self.model.train(was_training)
        losses = {f"loss_{name}": total / max(patients, 1) for name, total in sums.items()}
        return evaluate_model(self.model, loader) | losses | {"n_patients": float(patients)}
