"""`fedpir train` (fedpir.client.train_cli) on a site of the synthetic federation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpir.client import train_cli


def train(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return train_cli.run(parser.parse_args(list(argv)))


def test_train_cli_private_rounds_then_budget_refusal(small_federation: Path, tmp_path: Path) -> None:
    site = small_federation / "site-1"
    common = ["--site", str(site), "--stage", "finetune", "--task", "classification", "--size", "16",
              "--state-dir", str(tmp_path / "state"), "--no-progress"]
    out = tmp_path / "run.json"
    assert train(*common, "--rounds", "2", "--epsilon", "6", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    assert result["config"]["modalities"] == vocab and result["config"]["dp"]["target_epsilon"] == 6.0
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert 0 < rounds[0]["epsilon"] < rounds[1]["epsilon"] <= 6.0
    assert {"loss_total", "eval_accuracy", "eval_loss_classification", "steps", "seconds"} <= set(rounds[0])
    # the site's budget is spent: a further run on the same state folder is refused
    assert train(*common, "--rounds", "1", "--epsilon", "6", "--out", str(out)) == train_cli.EXIT_BUDGET
    assert json.loads(out.read_text())["rounds"] == []
    ledger = (tmp_path / "state" / "privacy_ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 2


def test_train_cli_without_dp(small_federation: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    argv = ["--site", str(small_federation / "site-2"), "--modalities", "t1,t2,flair,pd", "--no-dp",
            "--stage", "finetune", "--task", "segmentation", "--size", "16", "--out", str(out), "--no-progress"]
    assert train(*argv) == 0
    (record,) = json.loads(out.read_text())["rounds"]
    assert record["dp"] == 0.0 and "epsilon" not in record and "eval_dice" in record
    assert train("--site", str(small_federation / "site-2"), "--stage", "finetune") == 2  # no --task
