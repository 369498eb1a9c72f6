"""Membership-inference audit (`fedpir audit attack`): the AUROC, the member split, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpir.audit.attack import auroc, split_members
from fedpir.commands import main

SIZE = 16


def test_auroc_known_cases() -> None:
    assert auroc(np.array([5.0, 4.0, 3.0]), np.array([2.0, 1.0])) == 1.0  # perfectly separated
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0  # perfectly reversed
    assert auroc(np.full(4, 0.7), np.full(3, 0.7)) == 0.5  # identical scores: a coin toss
    # pairs (member, non-member): (3,2) 1, (3,1) 1, (1,2) 0, (1,1) a tie, 1/2 -> 2.5 / 4
    assert auroc(np.array([3.0, 1.0]), np.array([2.0, 1.0])) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="at least one member"):
        auroc(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="finite"):
        auroc(np.array([np.nan]), np.array([1.0]))


def test_members_and_non_members_are_disjoint_patients(small_federation: Path) -> None:
    from fedpir.data.dataset import load_site

    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    dataset, _ = load_site(small_federation / "site-0", vocab, (SIZE,) * 3)
    members, others = split_members(dataset, seed=1)
    flat_members, flat_others = {i for g in members for i in g}, {i for g in others for i in g}
    assert not flat_members & flat_others
    assert flat_members | flat_others == set(range(len(dataset)))
    assert len(members) == len(others) == 4
    assert split_members(dataset, seed=1) == (members, others)
    assert split_members(dataset, seed=2) != (members, others)


@pytest.mark.parametrize("argv, message", [
    (["--epsilons", "0"], "must be > 0"),
    (["--epsilons", "one"], "not a number or inf"),
    (["--seeds", "0"], "must be >= 1"),
    (["--patients", "1"], "--patients must be >= 2"),
])
def test_bad_input_is_one_line(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", "attack", "--out", str(tmp_path / "a.json"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.json").exists()


def test_report_refuses_a_file_that_is_not_an_attack_result(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ledger, bogus = tmp_path / "ledger.jsonl", tmp_path / "attack.json"
    ledger.write_text("")
    bogus.write_text("[1, 2]")
    assert main(["audit", "report", str(ledger), "--out", str(tmp_path / "page"), "--attack", str(bogus)]) == 2
    err = capsys.readouterr().err
    assert "no 'summary' list" in err and len(err.strip().splitlines()) == 1
    assert main(["audit", "report", "--out", str(tmp_path / "page")]) == 2
    assert "nothing to report" in capsys.readouterr().err


def test_attack_end_to_end_on_a_site(small_federation: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A real (tiny) run: one model without DP and one with Opacus DP-SGD at epsilon 1, both attacked;
    the table and the JSON carry epsilon next to AUROC, and the audit report shows them."""
    out = tmp_path / "attack.json"
    assert main(["audit", "attack", "--site", str(small_federation / "site-0"), "--size", str(SIZE),
                 "--epsilons", "inf,1", "--seeds", "1", "--local-epochs", "2", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    document = json.loads(out.read_text())
    no_dp, private = document["runs"]
    assert no_dp["epsilon"] is None and no_dp["target_epsilon"] is None
    assert private["target_epsilon"] == 1.0 and 0.9 < private["epsilon"] <= 1.0 and private["delta"] > 0
    for run in document["runs"]:
        assert len(run["member_losses"]) == len(run["nonmember_losses"]) == 4
        assert run["auroc"] == auroc(-np.array(run["member_losses"]), -np.array(run["nonmember_losses"]))
    assert [row["epsilon"] for row in document["summary"]] == [None, private["epsilon"]]
    assert "AUROC mean" in printed and f"{no_dp['auroc']:.3f}" in printed

    assert main(["audit", "report", "--out", str(tmp_path / "page"), "--attack", str(out)]) == 0
    page = (tmp_path / "page" / "audit_report.md").read_text()
    assert "## Membership inference" in page and "| inf (no DP) |" in page and "| site |" not in page
    assert (tmp_path / "page" / "attack_auroc.png").stat().st_size > 1000
    assert f"| {private['epsilon']:.3g} | {private['auroc']:.3f} |" in page


@pytest.mark.slow
def test_dp_at_epsilon_1_blunts_the_attack_that_reads_an_overfit_model(tmp_path: Path) -> None:
    """The default overfitting configuration, one seed: without DP the attack tells members apart,
    at epsilon 1 it is much closer to a coin toss (docs/results/membership_attack/ has 3 seeds)."""
    out = tmp_path / "attack.json"
    assert main(["audit", "attack", "--seeds", "1", "--no-progress", "--out", str(out)]) == 0
    no_dp, private = json.loads(out.read_text())["summary"]
    assert no_dp["member_loss_mean"] < no_dp["nonmember_loss_mean"] / 10  # memorized
    assert no_dp["auroc_mean"] > 0.85
    assert private["auroc_mean"] < no_dp["auroc_mean"] - 0.2
