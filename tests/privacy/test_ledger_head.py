"""The ledger's sealed head: a budget cannot be rolled back by cutting, restoring or deleting the ledger,
in any process that loads it; a fresh budget needs a new identity (`fedpir site reset`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedpir.commands import main
from fedpir.privacy.budget import LEDGER_NAME, LedgerError, PrivacyLedger
from fedpir.privacy.signing import HEAD_NAME, PUBLIC_KEY_NAME, SIGNING_KEY_NAME


def ledger_with(state: Path, n: int) -> PrivacyLedger:
    ledger = PrivacyLedger.in_dir(state)
    for i in range(n):
        ledger.append({"objective": "pretrain", "dp": True, "epsilon": 0.5 * (i + 1)})
    return ledger


def test_a_reloaded_ledger_reaches_its_sealed_head(tmp_path: Path) -> None:
    written = ledger_with(tmp_path, 3)
    assert (tmp_path / HEAD_NAME).stat().st_mode & 0o777 == 0o600
    reloaded = PrivacyLedger.in_dir(tmp_path)  # as a new process loads it
    assert reloaded.last_hash == written.last_hash and len(reloaded.entries) == 3


@pytest.mark.parametrize("tamper", ["cut", "older copy", "deleted", "head deleted", "head forged"])
def test_a_rolled_back_ledger_is_refused(tmp_path: Path, tamper: str) -> None:
    state = tmp_path / "state"
    ledger_with(state, 1)
    backup = (state / LEDGER_NAME).read_text()
    ledger = ledger_with(state, 0)
    ledger.append({"objective": "finetune", "dp": True, "epsilon": 2.0})
    path = state / LEDGER_NAME
    if tamper == "cut":
        path.write_text(path.read_text().splitlines(keepends=True)[0])
    elif tamper == "older copy":
        path.write_text(backup)
    elif tamper == "deleted":
        path.unlink()
    elif tamper == "head deleted":
        path.unlink()
        (state / HEAD_NAME).unlink()
    else:
        (state / HEAD_NAME).write_text((state / HEAD_NAME).read_text().replace('"entries": 2', '"entries": 1'))
    with pytest.raises(LedgerError, match="sealed head|fedpir site reset"):
        PrivacyLedger.in_dir(state)


def test_reset_retires_the_identity_with_its_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state = tmp_path / "state"
    ledger_with(state, 2)
    old_key = (state / PUBLIC_KEY_NAME).read_bytes()
    (state / LEDGER_NAME).unlink()  # the careless admin's fresh start is refused ...
    with pytest.raises(LedgerError):
        PrivacyLedger.in_dir(state)
    assert main(["site", "reset", "--state-dir", str(state), "--reason", "disk replaced"]) == 0
    (retired,) = state.glob("retired-*")
    assert {SIGNING_KEY_NAME, PUBLIC_KEY_NAME, HEAD_NAME, "REASON.txt"} <= {p.name for p in retired.iterdir()}
    assert "disk replaced" in (retired / "REASON.txt").read_text()
    fresh = ledger_with(state, 1)  # ... only a new identity starts afresh, under a new key
    assert len(fresh.entries) == 1 and (state / PUBLIC_KEY_NAME).read_bytes() != old_key
    assert main(["site", "reset", "--state-dir", str(state), "--reason", " "]) == 2
    assert "--reason" in capsys.readouterr().err


def test_a_node_that_restores_its_ledger_from_a_backup_is_refused_in_a_new_process(
        small_federation: Path, tmp_path: Path) -> None:
    """Each `fedpir train` is a process of its own, with the default privacy settings (DP, the default budget)."""
    state = tmp_path / "state"
    site = tmp_path / "site"
    shutil.copytree(small_federation / "site-1", site)

    def train(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = ["train", "--site", str(site), "--modalities", "t1,t2,flair,pd", "--size", "16",
                "--state-dir", str(state), "--no-progress", *extra]
        return subprocess.run([sys.executable, "-m", "fedpir", *argv], capture_output=True, text=True, timeout=600)

    assert train("--rounds", "2").returncode == 0  # the planned noise spreads the budget over the policy's max-rounds
    rounds = (state / LEDGER_NAME).read_text().splitlines(keepends=True)
    assert len(rounds) == 2
    (state / LEDGER_NAME).write_text(rounds[0])  # the ledger alone, as restored from the backup after round one
    refused = train()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "does not reach its sealed head" in refused.stderr.strip().splitlines()[-1]
    (state / LEDGER_NAME).write_text("".join(rounds))  # the true ledger: the node trains on from it
    assert train().returncode == 0 and len((state / LEDGER_NAME).read_text().splitlines()) == 3
