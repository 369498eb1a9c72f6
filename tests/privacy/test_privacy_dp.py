"""Patient-level DP-SGD wiring and the privacy budget, on a tiny patient model with real Opacus."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from torch import nn
from torch.utils.data import DataLoader

from fedpir.privacy.budget import BudgetExceededError, LedgerError, PrivacyBudget, PrivacyLedger
from fedpir.privacy.dp import (
    GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    DPConfig,
    PrivateModel,
    RoundPlan,
    batch_size_of,
    collate_patients,
    default_delta,
    plan_round,
)

M, S = 2, 6  # modalities, volume side


class TinyPatientNet(nn.Module):
    """Per-patient loss over all of the patient's modality views, batch dim = patients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 1)
        self.unused = nn.Linear(4, 4)  # takes no part in the loss: needs zero per-patient grads

    def patient_losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        per_view = []
        for m in range(batch["image"].shape[1]):
            h = self.norm(self.conv(batch["image"][:, m : m + 1])).relu().mean(dim=(2, 3, 4))
            per_view.append((self.head(h).squeeze(1) - batch["label"].float()) ** 2)
        return (torch.stack(per_view, 1) * batch["present"].float()).sum(1)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.patient_losses(batch).mean()


def patients(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(M, S, S, S, generator=g) * (1 + i),
            "present": torch.tensor([True, i % 2 == 0]),
            "label": torch.tensor(i % 2),
            "subject": f"sub-{i:03d}",
        }
        for i in range(n)
    ]


def private(model: nn.Module, data: list[dict], *, batch_size: int, sigma: float, clip: float, budget: PrivacyBudget,
            mode: str = GRAD_SAMPLE_MODE):
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate_patients, generator=torch.Generator().manual_seed(0))
    plan = RoundPlan(sample_rate=1 / len(loader), steps=len(loader), noise_multiplier=sigma, max_grad_norm=clip)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("unused")]
    return PrivateModel(
        model, torch.optim.SGD(params, lr=0.1), loader, accountant=budget.accountant, plan=plan,
        noise_generator=torch.Generator().manual_seed(1), grad_sample_mode=mode,
    ), plan


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig()
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig(target_epsilon=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="accountant"):
        DPConfig(noise_multiplier=1.0, accountant="foo")
    with pytest.raises(ValueError, match="budget"):
        DPConfig(target_epsilon=9.0, budget_epsilon=8.0)
    DPConfig(enabled=False)
    assert default_delta(8) == 1e-5 and default_delta(10**6) == pytest.approx(1e-7)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_plan_reaches_target(accountant: str) -> None:
    cfg = DPConfig(target_epsilon=4.0, accountant=accountant, planned_rounds=3)
    plan = plan_round(cfg, n_patients=10, batch_size=3, epochs=2, delta=1e-5)
    assert plan.sample_rate == 1 / 4 and plan.steps == 8
    independent = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    independent.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps * 3)]
    assert 3.9 < independent.get_epsilon(delta=1e-5) <= 4.0


def test_opacus_collate_breaks_on_empty_first_dict_batch() -> None:
    """Why PrivateModel replaces Opacus' collate: its empty-first-batch path fails on dict items."""
    from opacus.data_loader import DPDataLoader

    opacus_loader = DPDataLoader(patients(2), sample_rate=0.5)
    with pytest.raises(TypeError):
        opacus_loader.collate_fn([])


def test_empty_poisson_batches_with_dict_patients() -> None:
    """Opacus' Poisson loader yields empty batches; each is a counted noise-only step."""
    data = patients(3)
    model = TinyPatientNet()
    budget = PrivacyBudget(1000.0, 1e-5)
    loader = DataLoader(data, batch_size=1, generator=torch.Generator().manual_seed(3))
    plan = RoundPlan(sample_rate=1 / 3, steps=3, noise_multiplier=1.0, max_grad_norm=1.0)
    pm = PrivateModel(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, accountant=budget.accountant, plan=plan)
    pm.module.train()
    sizes = []
    for _ in range(4):
        for batch in pm.loader:
            sizes.append(batch_size_of(batch))
            before = [p.detach().clone() for p in model.parameters()]
            if sizes[-1]:
                assert batch["subject"] and batch["image"].shape[1:] == (M, S, S, S)
                model.loss(batch).backward()
            pm.step(sizes[-1])
            assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert 0 in sizes and max(sizes) > 0  # both kinds occurred (fixed seed)
    assert budget.accountant.history == [(1.0, 1 / 3, 12)]
    pm.close()


def pirnet_case(request: pytest.FixtureRequest):
    """The real PIRNet and pretraining losses on 3 patients of the synthetic federation (16^3)."""
    from fedpir.data.dataset import load_site
    from fedpir.models.losses import pretrain_losses
    from fedpir.models.pir import PIRConfig, PIRNet

    federation = request.getfixturevalue("small_federation")
    vocab = json.loads((federation / "federation.json").read_text())["modalities"]
    dataset, _ = load_site(federation / "site-0", vocab, (16, 16, 16))
    torch.manual_seed(0)
    cfg = PIRConfig(vocab, spatial_size=(16, 16, 16), channels=(4, 8, 16), prior_tokens=4, num_heads=2, proj_dim=8)
    model = PIRNet(cfg)
    model.set_trainable("pretrain")
    items = [dataset[i] for i in range(3)]
    for i, item in enumerate(items):
        item["seed"] = torch.tensor(100 + i)  # fixed per-patient augmentation streams

    def loss(net: nn.Module, batch: dict) -> torch.Tensor:
        return pretrain_losses(net, batch)["total"]

    return model, loss, items


def tiny_case(request: pytest.FixtureRequest):
    return TinyPatientNet(), lambda net, batch: net.loss(batch), patients(6)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("case", [tiny_case, pirnet_case], ids=["tiny", "pirnet"])
def test_per_patient_gradients_are_clipped(case, mode: str, request: pytest.FixtureRequest) -> None:
    """Opacus' per-sample grads, in every grad_sample_mode fedpir allows, are each patient's own
    gradient (computed alone on an untouched copy), and what DP-SGD sums before noise is each of
    them clipped to max_grad_norm."""
    model, loss, items = case(request)
    reference = copy.deepcopy(model)
    pm, _ = private(model, items, batch_size=len(items), sigma=0.0, clip=1.0, budget=PrivacyBudget(100.0, 1e-5),
                    mode=mode)
    batch = collate_patients(items)
    pm.module.train()
    loss(model, batch).backward()
    names = [n for n, p in model.named_parameters() if p in set(pm.optimizer.params)]
    ref_params = [dict(reference.named_parameters())[n] for n in names]
    per_patient = []
    for i in range(len(items)):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(loss(reference, one), ref_params, allow_unused=True)
        per_patient.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, ref_params, strict=True)])
    for j, p in enumerate(pm.optimizer.params):
        assert p.grad_sample is not None, names[j]
        torch.testing.assert_close(p.grad_sample, torch.stack([g[j] for g in per_patient]), atol=1e-5, rtol=1e-3)
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in grads)) for grads in per_patient])
    clip = float(norms.min() + norms.max()) / 2  # some patients above the bound, some below
    pm.set_plan(RoundPlan(sample_rate=1.0, steps=1, noise_multiplier=0.0, max_grad_norm=clip))
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors * norms <= clip * (1 + 1e-6)).all()
    assert pm.optimizer.pre_step()
    for j, p in enumerate(pm.optimizer.params):  # sum of clipped per-patient grads, before (zero) noise
        expected = sum(f * g[j] for f, g in zip(factors, per_patient, strict=True))
        torch.testing.assert_close(p.summed_grad, expected, atol=1e-4, rtol=1e-3)
    pm.close()


def test_budget_epsilon_matches_independent_rdp() -> None:
    data = patients(8)
    model = TinyPatientNet()
    budget = PrivacyBudget(50.0, 1e-5)
    pm, plan = private(model, data, batch_size=2, sigma=0.9, clip=1.0, budget=budget)
    pm.module.train()
    steps = 0
    for batch in pm.loader:
        if batch_size_of(batch):
            model.loss(batch).backward()
        pm.step(batch_size_of(batch))
        steps += 1
    assert steps == plan.steps == 4
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=0.25, noise_multiplier=0.9, steps=4, orders=orders)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert budget.spent() == pytest.approx(eps, rel=1e-9)
    assert budget.would_reach(plan) == pytest.approx(
        rdp_analysis.get_privacy_spent(orders=orders, rdp=2 * rdp, delta=1e-5)[0], rel=1e-9
    )
    pm.close()


def spend(budget: PrivacyBudget, plan: RoundPlan, objective: str) -> None:
    """A round as the trainer runs it: check, the optimizer hook's steps, the ledger entry."""
    budget.check(plan)
    for _ in range(plan.steps):
        budget.accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    budget.record(objective=objective, plan=plan, steps=plan.steps)


def test_budget_refusal_and_ledger_restore(tmp_path) -> None:
    plan = RoundPlan(sample_rate=0.25, steps=10, noise_multiplier=1.5, max_grad_norm=1.0)
    ledger = PrivacyLedger.in_dir(tmp_path)
    budget = PrivacyBudget(5.0, 1e-5, ledger=ledger)
    spend(budget, plan, "pretrain")
    first = budget.spent()
    spend(budget, plan, "segmentation")  # fine-tuning counts against the same budget
    assert budget.spent() > first
    content = ledger.path.read_text()
    with pytest.raises(BudgetExceededError, match=r"spent so far .* would reach .* > budget 5") as err:
        spend(budget, plan, "segmentation")
    assert err.value.would_reach > 5.0 >= err.value.spent == budget.spent()
    assert ledger.path.read_text() == content and budget.accountant.history == [(1.5, 0.25, 20)]
    restored = PrivacyBudget(5.0, 1e-5, ledger=PrivacyLedger.in_dir(tmp_path))  # client restart
    assert restored.spent() == budget.spent()
    with pytest.raises(BudgetExceededError):
        restored.check(plan)
    bigger = PrivacyBudget(8.0, 1e-5, ledger=PrivacyLedger.in_dir(tmp_path))
    spend(bigger, plan, "segmentation")
    independent = RDPAccountant()
    independent.history = [(1.5, 0.25, 30)]
    assert bigger.spent() == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-12)
    entries = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    assert [e["objective"] for e in entries] == ["pretrain", "segmentation", "segmentation"]
    assert [e["epsilon"] for e in entries] == sorted(e["epsilon"] for e in entries)
    keys = {"timestamp", "steps", "sample_rate", "noise_multiplier", "max_grad_norm", "epsilon", "history"}
    assert keys <= set(entries[0])
    with pytest.raises(LedgerError, match="delta"):
        PrivacyBudget(8.0, 1e-6, ledger=PrivacyLedger.in_dir(tmp_path))
    ledger.path.write_text(ledger.path.read_text() + "{broken\n")
    with pytest.raises(LedgerError, match="unreadable"):
        PrivacyLedger.in_dir(tmp_path)


def test_functorch_is_the_default_per_patient_gradient_mode() -> None:
    """The faster and leaner mode measured by benchmarks/cost/dp_cost.py; both are exact (test above)."""
    assert GRAD_SAMPLE_MODE == "functorch"
    pm, _ = private(TinyPatientNet(), patients(4), batch_size=2, sigma=1.0, clip=1.0, budget=PrivacyBudget(100.0, 1e-5))
    assert pm.module.force_functorch
    pm.close()
    with pytest.raises(ValueError, match="grad_sample_mode must be one of"):
        private(TinyPatientNet(), patients(4), batch_size=2, sigma=1.0, clip=1.0, budget=PrivacyBudget(100.0, 1e-5),
                mode="ew")
