"""The DP forecast of a simulated federation, to set beside what its methods then learnt.

:func:`fedpir.privacy.dp.forecast` gives a site's noise/signal ratio as if every clipped per-patient gradient
pointed the same way. The signal is smaller: the mean of the clipped gradients has norm rho * C, rho being
their coherence. Here rho is measured at the warm start on each site's training patients, and the ratio R is
forecast three ways:

- a site alone, with its own patients: n_eff = q * n;
- fedpir, whose sites each add their own noise to an update that FedAvg weighs by patients: the noise of the
  mean is sqrt(K) times that of one pooled draw, so n_eff = (sum of q * n) / sqrt(K);
- fedpir-dn, whose noise is added once to the sum (secure aggregation): n_eff = sum of q * n.

Measuring rho reads the sites' patients, as a researcher may in a simulation; a deployed site never reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedpir.client.site import site_data
from fedpir.models.groups import objective_for, trainable_groups
from fedpir.models.losses import finetune_losses
from fedpir.models.pir import PIRNet
from fedpir.privacy.dp import collate_patients, default_delta, dp_config_for, forecast, plan_round
from fedpir.run_config import RunSettings
from fedpir.simulation.runner import site_names
from fedpir.training.model import build_model


@dataclass(frozen=True)
class SiteForecast:
    """One site's measured coherence and forecast noise/signal ratios (the pooled rho for the federated ones)."""

    site: str
    patients: int
    rho: float
    alone: float
    fedpir: float
    distributed: float


def clipped_gradient_sum(settings: RunSettings, site: str, model: PIRNet | None = None) -> tuple[torch.Tensor, int]:
    """Sum over a site's training patients of their clipped gradients of the fine-tuning loss at the warm start
    (``model``, left unchanged; default: built from ``settings``), on the groups the run trains (no augmentation),
    and how many patients."""
    model = model or build_model(settings)
    objective = objective_for("finetune", settings.finetune_task)
    names = model.set_trainable(objective, trainable_groups(settings.finetune_trainable))
    params = [p for n, p in model.named_parameters() if n in set(names)]
    train, _, _ = site_data(settings, settings.federation_path / site, site)
    total = torch.zeros(sum(p.numel() for p in params))
    for i in range(len(train)):
        loss = finetune_losses(model, collate_patients([train[i]]), settings.finetune_task,
                               positive_weight=settings.segment_positive_weight)["total"]
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        total += grad * min(1.0, settings.max_grad_norm / (float(grad.norm()) + 1e-12))
    return total, len(train)


def site_forecasts(settings: RunSettings) -> list[SiteForecast]:
    """Every site's rho and forecast ratios under ``settings``' private fine-tuning (DP on)."""
    warm = build_model(settings)  # one warm start for every site: the measurement never steps it
    sums = {site: clipped_gradient_sum(settings, site, warm) for site in site_names(settings)}
    d = next(iter(sums.values()))[0].numel()
    rounds = settings.finetune_rounds
    plans = {site: plan_round(dp_config_for(settings), n_patients=n, batch_size=settings.batch_size or n,
                              epochs=settings.local_epochs, delta=settings.delta or default_delta(n))
             for site, (_, n) in sums.items()}

    def ratio(site: str, batch: float, rho: float) -> float:
        """R of ``batch`` expected patients per noise draw, at this site's sampling rate and noise."""
        plan = plans[site]
        return forecast(plan, trained_parameters=d, n_patients=batch / plan.sample_rate, total_steps=plan.steps * rounds,
                        coherence=rho).ratio if rho > 0 else math.inf

    pooled = sum(s for s, _ in sums.values())
    rho_pool = min(1.0, float(pooled.norm()) / (sum(n for _, n in sums.values()) * settings.max_grad_norm))
    pooled_batch = sum(plans[s].sample_rate * n for s, (_, n) in sums.items())
    out = []
    for site, (total, n) in sums.items():
        rho = min(1.0, float(total.norm()) / (n * settings.max_grad_norm))  # <= 1 but for rounding
        out.append(SiteForecast(site, n, rho, ratio(site, plans[site].sample_rate * n, rho),
                                ratio(site, pooled_batch / math.sqrt(len(sums)), rho_pool),
                                ratio(site, pooled_batch, rho_pool)))
    return out
