"""`fedpir audit verify --policy`: a ledger checked against the site's policy, each mechanism recomputed
from the policy. The forged ledgers are what a site whose code was changed would write: signed with
its own key and consistent as accounting, so that only the policy tells them apart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fedpir.audit.ledger import verify_ledger
from fedpir.commands import main
from fedpir.privacy.budget import LEDGER_NAME, PrivacyBudget, PrivacyLedger
from fedpir.privacy.dp import RoundPlan
from fedpir.privacy.policy import DAY_SECONDS, SitePolicy, bind_budget
from fedpir.privacy.release import RELEASE_OBJECTIVE
from fedpir.privacy.signing import PUBLIC_KEY_NAME, load_public_key

POLICY = SitePolicy(max_epsilon=8.0, max_rounds_per_day=2, metric_noise_multiplier=20.0, min_release_patients=3,
                    metrics={"dice": "noise"})
#: A private training round the policy allows (secret noise, multiplier 2 >= 0.5).
ROUND = RoundPlan(sample_rate=0.25, steps=1, noise_multiplier=2.0, max_grad_norm=1.0)


def _train(budget: PrivacyBudget, plan: RoundPlan = ROUND, **extra) -> None:
    budget.spend(plan, objective="finetune", secret_noise=True, epochs=1, n_patients=6, **extra)


def _release(budget: PrivacyBudget, metrics: tuple[str, ...] = ("dice",), sigma: float = 20.0, patients: int = 4) -> None:
    plan = RoundPlan(sample_rate=1.0, steps=len(metrics), noise_multiplier=sigma, max_grad_norm=1.0)
    budget.spend(plan, objective=RELEASE_OBJECTIVE, message="evaluate", metrics=sorted(metrics), n_patients=patients)


FORGERIES: dict[str, tuple[Callable[[PrivacyBudget], None], str]] = {
    "metric released with a tenth of the noise": (lambda b: _release(b, sigma=2.0), "release-mechanism"),
    "metric of one patient": (lambda b: _release(b, patients=1), "min-release-patients"),
    "a metric the policy drops, noised": (lambda b: _release(b, metrics=("dice", "loss")), "release-mode"),
    "training noise below the policy's": (
        lambda b: _train(b, RoundPlan(sample_rate=0.05, steps=1, noise_multiplier=0.45, max_grad_norm=1.0)),
        "min-noise-multiplier"),
    "a third round the same day": (lambda b: (_train(b), _train(b)), "max-rounds-per-day"),
    "noise replayable from the seed": (lambda b: b.spend(ROUND, objective="finetune", secret_noise=False),
                                       "secret-noise"),
    "a share of distributed noise the policy never allows": (
        lambda b: _train(b, RoundPlan(sample_rate=0.25, steps=1, noise_multiplier=2.0, max_grad_norm=1.0,
                                      noise_share=0.5)), "distributed-noise"),
    "a round without DP": (lambda b: b.ledger.append({"dp": False, "objective": "finetune", "steps": 2}),
                           "dp-required"),
}


def _ledger(state: Path, forge: Callable[[PrivacyBudget], None] | None) -> tuple[Path, Path]:
    """A site's ledger under :data:`POLICY`: an honest round and release, then ``forge``'s entries."""
    ledger = PrivacyLedger.in_dir(state)
    budget = PrivacyBudget(8.0, 1e-5, ledger=ledger)
    bind_budget(POLICY, ledger, budget, 8.0)
    _train(budget)
    _release(budget)
    if forge is not None:
        forge(budget)
    return state / LEDGER_NAME, state / PUBLIC_KEY_NAME


def test_an_honest_ledger_conforms_to_its_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger, key = _ledger(tmp_path / "state", None)
    assert verify_ledger(ledger, load_public_key(key), [POLICY]).ok
    policy = tmp_path / "policy.toml"
    policy.write_text('max-epsilon = 8.0\nmax-rounds-per-day = 2\n[metrics]\ndice = "noise"\n')
    assert main(["audit", "verify", str(ledger), "--public-key", str(key), "--policy", str(policy)]) == 0
    assert f"checked against policy {POLICY.sha256[:12]}" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_ledger_outside_its_policy_fails_with_the_rule(name: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    forge, rule = FORGERIES[name]
    ledger, key = _ledger(tmp_path / "state", forge)
    public = load_public_key(key)
    assert verify_ledger(ledger, public).ok, "the accounting alone is consistent: only the policy tells"
    result = verify_ledger(ledger, public, [POLICY])
    assert {f.rule for f in result.failures} == {rule}, [f.line("ledger") for f in result.failures]
    assert all(f.entry > 2 for f in result.failures), "the honest entries conform"


def test_the_day_window_follows_the_signed_timestamps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    ledger, key = _ledger(tmp_path / "state", _train)  # two rounds in the first day
    budget = PrivacyBudget(8.0, 1e-5, ledger=PrivacyLedger.in_dir(ledger.parent))
    bind_budget(POLICY, budget.ledger, budget, 8.0)
    clock[0] += DAY_SECONDS
    _train(budget)  # the first round has left the window
    assert verify_ledger(ledger, load_public_key(key), [POLICY]).ok


def test_cli_policy_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger, key = _ledger(tmp_path / "state", FORGERIES["metric of one patient"][0])
    bad = tmp_path / "bad.toml"
    bad.write_text('max-epsilon = "8"\n')
    assert main(["audit", "verify", str(ledger), "--public-key", str(key), "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "max-epsilon must be a number" in err and "Traceback" not in err and err.count("\n") == 1
    good = tmp_path / "policy.toml"
    good.write_text('max-epsilon = 8.0\nmax-rounds-per-day = 2\n[metrics]\ndice = "noise"\n')
    assert main(["audit", "verify", str(ledger), "--public-key", str(key), "--policy", str(good)]) == 1
    assert "entry 3: min-release-patients: summarized 1 patients < the policy's 3" in capsys.readouterr().out
