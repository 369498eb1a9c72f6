"""LocalTrainer on the real PIRNet and a site of the synthetic federation (16^3 volumes)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant
from torch.utils.data import Subset

from fedpir.data.dataset import load_site
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.privacy.budget import BudgetExceededError
from fedpir.privacy.dp import DPConfig
from fedpir.run_config import RunSettings
from fedpir.training.trainer import LocalTrainer

SIZE = (16, 16, 16)
DELTA = 1e-5


@pytest.fixture(scope="module")
def site(small_federation: Path):
    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    dataset, report = load_site(small_federation / "site-0", vocab, SIZE)
    assert len(dataset) == 8 and not report.bad
    return vocab, dataset


def make_model(vocab: list[str], seed: int = 0) -> PIRNet:
    torch.manual_seed(seed)
    return PIRNet(PIRConfig(vocab, spatial_size=SIZE, channels=(4, 8, 16), prior_tokens=4, num_heads=2, proj_dim=8))


def independent_epsilon(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """Epsilon from a fresh Opacus accountant of the default mechanism, outside the trainer."""
    accountant = create_accountant(DPConfig.accountant)
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return accountant.get_epsilon(delta=DELTA)


def state(model: PIRNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_private_pretraining_then_finetuning_spends_one_budget(site, tmp_path: Path) -> None:
    """Real PIRNet + pretrain_losses under DP; target epsilon planned over 2 rounds; re-wrapping
    for fine-tuning keeps the accountant; the epsilon matches a fresh Opacus accountant's."""
    vocab, dataset = site
    model = make_model(vocab)
    trainer = LocalTrainer(
        model, Subset(dataset, range(2)), dp=DPConfig(target_epsilon=3.0, planned_rounds=2, delta=DELTA),
        batch_size=1, state_dir=tmp_path,
    )
    before = state(model)
    pre = trainer.train_round("pretrain", progress=False)
    assert {"loss_rotation", "loss_contrastive", "loss_reconstruction", "loss_invariance", "loss_total"} <= set(pre)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in pre.items() if k.startswith("loss_"))
    changed = [k for k, v in state(model).items() if not torch.equal(v, before[k])]
    assert set(changed) >= {k for k in model.key_groups().shared if not k.startswith("lesion_probe")}
    assert not any(k.startswith(("seg_head", "cls_head", "lesion_probe")) for k in changed)  # not trained in pretraining
    sigma = json.loads((tmp_path / "privacy_ledger.jsonl").read_text().splitlines()[0])["noise_multiplier"]
    assert pre["steps"] == 2 and pre["epsilon"] == pytest.approx(independent_epsilon(sigma, 0.5, 2), rel=1e-9)
    fine = trainer.train_round("classification", progress=False)
    assert fine["epsilon"] == pytest.approx(independent_epsilon(sigma, 0.5, 4), rel=1e-9)
    assert 2.9 < fine["epsilon"] <= 3.0  # the planned target is reached, not exceeded
    metrics = trainer.evaluate(dataset)
    assert {"loss_classification", "accuracy", "dice", "psnr"} <= set(metrics)


def test_refused_round_changes_nothing(site, tmp_path: Path) -> None:
    vocab, dataset = site
    model = make_model(vocab)
    trainer = LocalTrainer(model, dataset, dp=DPConfig(noise_multiplier=1.0, budget_epsilon=6.0), state_dir=tmp_path)
    first = trainer.train_round("classification", progress=False)
    assert first["epsilon"] == pytest.approx(independent_epsilon(1.0, 0.5, 2), rel=1e-9)
    assert first["epsilon"] < 6.0
    ledger = (tmp_path / "privacy_ledger.jsonl").read_bytes()
    weights = state(model)
    optimizer = copy.deepcopy(trainer._session.optimizer.state_dict())
    trainable = [p.requires_grad for p in model.parameters()]
    for objective in ("classification", "pretrain"):
        with pytest.raises(BudgetExceededError, match="would reach .* > budget 6") as err:
            trainer.train_round(objective, progress=False)
        assert err.value.spent == pytest.approx(first["epsilon"]) and err.value.would_reach > 6.0
    assert (tmp_path / "privacy_ledger.jsonl").read_bytes() == ledger
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    after = trainer._session.optimizer.state_dict()
    assert after["param_groups"] == optimizer["param_groups"]
    for i, s in optimizer["state"].items():
        assert all(torch.equal(v, after["state"][i][k]) for k, v in s.items())
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert trainer.epsilon() == first["epsilon"]


def test_restart_continues_the_ledger(site, tmp_path: Path) -> None:
    vocab, dataset = site
    dp = DPConfig(noise_multiplier=1.2, budget_epsilon=20.0)
    first = LocalTrainer(make_model(vocab), dataset, dp=dp, state_dir=tmp_path)
    one = first.train_round("classification", progress=False)
    restarted = LocalTrainer(make_model(vocab), dataset, dp=dp, state_dir=tmp_path)  # new process
    assert restarted.epsilon() == pytest.approx(one["epsilon"]) and restarted.delta == first.delta == DELTA
    two = restarted.train_round("classification", progress=False)
    assert two["epsilon"] > one["epsilon"]
    assert two["epsilon"] == pytest.approx(independent_epsilon(1.2, 0.5, 4), rel=1e-9)
    entries = [json.loads(line) for line in (tmp_path / "privacy_ledger.jsonl").read_text().splitlines()]
    assert [e["history"] for e in entries] == [[[1.2, 0.5, 2]], [[1.2, 0.5, 4]]]


def test_empty_poisson_batches_are_noise_only_steps(site) -> None:
    vocab, dataset = site
    model = make_model(vocab)
    dp = DPConfig(noise_multiplier=1.0, budget_epsilon=100.0, secret_noise=False)
    trainer = LocalTrainer(model, Subset(dataset, range(3)), dp=dp, batch_size=1)
    out = trainer.train_round("classification", epochs=3, progress=False)
    assert out["steps"] == 9 and out["empty_batches"] > 0  # P(empty) = (2/3)^3 per step; fixed seed
    assert out["epsilon"] == pytest.approx(independent_epsilon(1.0, 1 / 3, 9), rel=1e-9)


def test_a_round_of_only_empty_batches_reports_every_loss_term(site) -> None:
    """The server aggregates metrics only over identical key sets: a site whose Poisson batches were
    all empty must not look different (it once lacked the loss terms, and its update was rejected)."""
    vocab, dataset = site
    dp = DPConfig(noise_multiplier=1.0, budget_epsilon=1e6, secret_noise=False)
    # 2 patients, batch 1: sample rate 1/2, 2 steps; with seed 36 both draws are empty, with 23 neither
    empty, full = (LocalTrainer(make_model(vocab), Subset(dataset, range(2)), batch_size=1, seed=seed, dp=dp)
                   .train_round("pretrain", progress=False) for seed in (36, 23))
    assert empty["empty_batches"] == empty["steps"] == 2 and full["empty_batches"] == 0
    assert set(empty) == set(full) and {"loss_total", "loss_rotation", "loss_invariance"} <= set(empty)
    assert empty["loss_rotation"] == 0.0 < full["loss_rotation"]


@pytest.mark.parametrize("enabled", [False, True], ids=["no-dp", "dp"])
def test_same_seed_same_round(site, enabled: bool, tmp_path: Path) -> None:
    vocab, dataset = site
    dp = DPConfig(enabled=enabled, noise_multiplier=1.0 if enabled else None, secret_noise=False)
    runs = []
    for k in range(2):
        model = make_model(vocab)
        trainer = LocalTrainer(model, dataset, dp=dp, seed=7, state_dir=tmp_path / str(k))
        out = trainer.train_round("classification", progress=False)
        runs.append(({k: v for k, v in out.items() if k != "seconds"}, state(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    assert runs[0][0]["dp"] == float(enabled) and ("epsilon" in runs[0][0]) == enabled
    entry = json.loads((tmp_path / "0" / "privacy_ledger.jsonl").read_text())
    assert entry["dp"] is enabled and ("epsilon" in entry) == enabled
    assert entry.get("secret_noise") is (False if enabled else None)  # the auditor sees replayable noise


def test_secret_noise_is_not_replayable_from_the_seed(site) -> None:
    """By default (deployment) the DP noise and sampling come from OS entropy: two runs with the
    same seed, model and data end with different weights, though each spends the same epsilon."""
    vocab, dataset = site
    runs = []
    for _ in range(2):
        model = make_model(vocab)
        trainer = LocalTrainer(model, dataset, dp=DPConfig(noise_multiplier=1.0), seed=7)
        out = trainer.train_round("classification", progress=False)
        runs.append((out["epsilon"], state(model)))
        assert trainer.ledger.entries[-1]["secret_noise"] is True
    assert runs[0][0] == runs[1][0]
    trained = [k for k, p in make_model(vocab).named_parameters() if k.startswith("cls_head")]
    assert trained and not all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in trained)


@pytest.mark.parametrize("enabled", [False, True], ids=["no-dp", "dp"])
def test_fedprox_mu_pulls_the_update_towards_the_global_weights(site, enabled: bool) -> None:
    """FedProx: with mu > 0 the same round (same seed, same data, same noise) ends much closer to
    the weights it started from (the global ones) than with mu = 0."""
    vocab, dataset = site
    dp = DPConfig(enabled=enabled, noise_multiplier=1.0 if enabled else None, budget_epsilon=100.0, secret_noise=False)
    start = state(make_model(vocab))
    exchanged = tuple(k for k in start if k.startswith(("cls_head.", "encoder.")))
    ends = {}
    for mu in (0.0, 50.0):
        model = make_model(vocab)
        trainer = LocalTrainer(model, dataset, dp=dp, seed=3, lr=1e-2)
        trainer.train_round("classification", epochs=2, progress=False, proximal_mu=mu, proximal_keys=exchanged)
        ends[mu] = state(model)

    def distance(end: dict, keys) -> float:
        return sum(float((end[k] - start[k]).norm() ** 2) for k in keys) ** 0.5

    assert 0 < distance(ends[50.0], exchanged) < 0.5 * distance(ends[0.0], exchanged)


def test_private_phase_is_one_full_site_step_on_the_probe(site, tmp_path: Path) -> None:
    """batch-size 0: every training patient in one batch (sample rate 1, one step per epoch); only the lesion
    probe moves, by plain SGD on the weighted cross-entropy."""
    vocab, dataset = site
    model = make_model(vocab)
    settings = RunSettings(modalities=",".join(vocab), volume_size=SIZE[0], batch_size=0, optimizer="sgd", lr=3.0,
                           segment_positive_weight=30.0, noise_multiplier=1.0, augment_views=0)
    trainer = LocalTrainer.for_run(settings, model, dataset, state_dir=tmp_path, seed=0)
    before = state(model)
    metrics = trainer.train_round("segmentation", groups=("probe",), progress=False)
    assert metrics["steps"] == 1 and trainer.plan(1).sample_rate == 1.0
    assert isinstance(trainer._session.optimizer.original_optimizer, torch.optim.SGD)
    changed = {k for k, v in state(model).items() if not torch.equal(v, before[k])}
    assert changed == {"lesion_probe.linear.weight", "lesion_probe.linear.bias"}
    assert metrics["epsilon"] == pytest.approx(independent_epsilon(1.0, 1.0, 1), rel=1e-9)


def test_the_run_settings_offer_every_optimizer_the_trainer_builds() -> None:
    from fedpir.run_config import OPTIMIZERS
    from fedpir.training.trainer import OPTIMIZERS as BUILT
    assert tuple(BUILT) == OPTIMIZERS
    with pytest.raises(ValueError, match="batch-size must be >= 0"):
        RunSettings(batch_size=-1)
