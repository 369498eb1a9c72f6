"""Tamper-evident privacy ledger and `fedpir audit verify`, on ledgers of real private training runs."""

from __future__ import annotations

import json
import math
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.utils.data import Subset

from fedpir.audit.ledger import REQUIRED, verify_ledger
from fedpir.commands import main
from fedpir.data.dataset import load_site
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.privacy.budget import LEDGER_NAME, LedgerError, PrivacyLedger
from fedpir.privacy.dp import DPConfig
from fedpir.privacy.signing import (
    GENESIS,
    PUBLIC_KEY_NAME,
    SIGNING_KEY_NAME,
    create_signing_key,
    entry_hash,
    load_public_key,
    load_signing_key,
    seal,
)
from fedpir.training.trainer import LocalTrainer

SIZE = (16, 16, 16)
DELTA = 1e-5
RDP = DPConfig(noise_multiplier=1.0, budget_epsilon=50.0, delta=DELTA, accountant="rdp")


def make_model(vocab: list[str]) -> PIRNet:
    torch.manual_seed(0)
    return PIRNet(PIRConfig(vocab, spatial_size=SIZE, channels=(4, 8, 16), prior_tokens=4, num_heads=2, proj_dim=8))


@pytest.fixture(scope="module")
def site(small_federation: Path) -> tuple[list[str], Subset]:
    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    dataset, _ = load_site(small_federation / "site-0", vocab, SIZE)
    return vocab, Subset(dataset, range(2))


@pytest.fixture(scope="module")
def honest(site, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """A state folder after three real rounds: private, non-private, private (RDP, 2 patients, batch 1)."""
    vocab, dataset = site
    state = tmp_path_factory.mktemp("honest") / "state"
    trainer = LocalTrainer(make_model(vocab), dataset, dp=RDP, batch_size=1, state_dir=state)
    eps = [trainer.train_round("classification", progress=False)["epsilon"]]
    LocalTrainer(make_model(vocab), dataset, dp=DPConfig(enabled=False), batch_size=1,
                 state_dir=state).train_round("classification", progress=False)
    restarted = LocalTrainer(make_model(vocab), dataset, dp=RDP, batch_size=1, state_dir=state)
    eps.append(restarted.train_round("classification", progress=False)["epsilon"])
    return state, eps


def copy_state(honest: tuple[Path, list[float]], tmp_path: Path) -> Path:
    return Path(shutil.copytree(honest[0], tmp_path / "state"))


def read(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / LEDGER_NAME).read_text().splitlines()]


def write(state: Path, entries: list[dict[str, Any]]) -> None:
    (state / LEDGER_NAME).write_text("".join(json.dumps(e) + "\n" for e in entries))


def reseal(entries: list[dict[str, Any]], key: Ed25519PrivateKey) -> list[dict[str, Any]]:
    """Re-chain and re-sign every entry with ``key`` (what a forger holding a key can do)."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        out.append(seal(entry, entry_hash(out[-1]) if out else GENESIS, key))
    return out


def audit(state: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["audit", "verify", str(state / LEDGER_NAME), "--public-key", str(state / PUBLIC_KEY_NAME), *extra])
    return code, capsys.readouterr().out


def failures(state: Path) -> set[tuple[int, str]]:
    result = verify_ledger(state / LEDGER_NAME, load_public_key(state / PUBLIC_KEY_NAME))
    return {(f.entry, f.rule) for f in result.failures}


def test_honest_ledger_verifies_and_matches_independent_accounting(honest, tmp_path: Path, capsys) -> None:
    state, eps = honest
    entries = read(state)
    assert [e["dp"] for e in entries] == [True, False, True]
    assert entries[0]["prev"] == GENESIS and all(isinstance(e["signature"], str) for e in entries)
    assert all(set(REQUIRED) <= set(e) for e in entries if e["dp"])
    result = verify_ledger(state / LEDGER_NAME, load_public_key(state / PUBLIC_KEY_NAME))
    assert result.ok and result.entries == 3 and result.private_rounds == 2 and result.non_private_rounds == 1
    independent = RDPAccountant()
    independent.history = [(1.0, 0.5, 4)]  # 2 rounds x 1 epoch x 2 steps (2 patients, batch 1)
    assert result.epsilon == pytest.approx(independent.get_epsilon(delta=DELTA), rel=1e-12)
    assert [r[1] for r in result.rounds] == pytest.approx(eps, rel=1e-12)
    assert result.epsilon_budget == 50.0 and result.delta == DELTA
    assert result.guarantee == math.inf  # the non-private round voids the guarantee of what the site released
    code, out = audit(state, capsys=capsys)
    assert code == 0 and out.count("\n") == 1 and ": OK: 3 entries, 2 private" in out and "epsilon inf" in out
    assert result.last_hash in out
    code, out = audit(state, "--json", capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["failures"] == [] and report["epsilon"] == pytest.approx(eps[-1])
    assert report["epsilon_guarantee"] == "inf"
    assert "PRIVATE KEY" not in out and SIGNING_KEY_NAME not in out


def test_prv_ledger_is_recomputed_with_prv(site, tmp_path: Path) -> None:
    vocab, dataset = site
    dp = DPConfig(noise_multiplier=1.0, budget_epsilon=50.0, delta=DELTA, accountant="prv")
    trainer = LocalTrainer(make_model(vocab), dataset, dp=dp, batch_size=1, state_dir=tmp_path)
    spent = trainer.train_round("classification", progress=False)["epsilon"]
    entry = read(tmp_path)[0]
    assert entry["accountant"] == "prv"
    independent = PRVAccountant()
    independent.history = [(1.0, 0.5, 2)]
    result = verify_ledger(tmp_path / LEDGER_NAME, load_public_key(tmp_path / PUBLIC_KEY_NAME))
    assert result.ok and result.epsilon == pytest.approx(independent.get_epsilon(delta=DELTA), rel=1e-9) == spent
    rdp = RDPAccountant()
    rdp.history = [(1.0, 0.5, 2)]
    entry["accountant"] = "rdp"  # claim RDP for a PRV epsilon, re-signed with the site's own key
    write(tmp_path, reseal([entry], load_signing_key(tmp_path / SIGNING_KEY_NAME)))
    assert abs(rdp.get_epsilon(delta=DELTA) - spent) > 1e-3
    assert failures(tmp_path) == {(1, "epsilon")}


def _delete_second(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    return [entries[0], entries[2]]


def _edit_epsilon(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    entries[2]["epsilon"] /= 2
    return entries


def _edit_noise(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    entries[0]["noise_multiplier"] = 3.0
    return entries


def _resign_other_key(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    entries[0]["epsilon"] /= 2
    return [*reseal(entries[:1], Ed25519PrivateKey.generate()), *entries[1:]]


def _resign_all_other_key(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    return reseal(entries, Ed25519PrivateKey.generate())


def _reorder(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    return [entries[0], entries[2], entries[1]]


def _site_key_understates_epsilon(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    entries[2]["epsilon"] /= 2  # chain and signatures redone with the site's key: only the accounting shows it
    return reseal(entries, load_signing_key(state / SIGNING_KEY_NAME))


def _site_key_drops_steps(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    entries[2]["history"] = entries[0]["history"]  # hide round 3's steps from the accountant
    entries[2]["epsilon"] = entries[0]["epsilon"]
    return reseal(entries, load_signing_key(state / SIGNING_KEY_NAME))


def _site_key_raises_budget(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    entries[2]["epsilon_budget"] = 80.0
    return reseal(entries, load_signing_key(state / SIGNING_KEY_NAME))


def _site_key_budget_below_spent(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    entries[2]["epsilon_budget"] = entries[2]["epsilon"] / 2
    return reseal(entries, load_signing_key(state / SIGNING_KEY_NAME))


def _site_key_claims_distributed_noise(entries: list[dict[str, Any]], state: Path) -> list[dict[str, Any]]:
    entries[2]["guarantee"] = "distributed-dp-under-secagg"  # while its noise share says the site added it all
    return reseal(entries, load_signing_key(state / SIGNING_KEY_NAME))


TAMPERING = {
    "delete-entry": (_delete_second, {(2, "chain")}),
    "edit-epsilon": (_edit_epsilon, {(3, "signature"), (3, "epsilon")}),
    "edit-noise-multiplier": (_edit_noise, {(1, "signature"), (1, "history"), (2, "chain")}),
    "resign-other-key": (_resign_other_key, {(1, "signature"), (1, "epsilon"), (2, "chain")}),
    "resign-all-other-key": (_resign_all_other_key, {(1, "signature"), (2, "signature"), (3, "signature")}),
    "reorder": (_reorder, {(2, "chain"), (3, "chain")}),
    "site-key-understates-epsilon": (_site_key_understates_epsilon, {(3, "epsilon")}),
    "site-key-drops-steps": (_site_key_drops_steps, {(3, "history")}),
    "site-key-raises-budget": (_site_key_raises_budget, {(3, "budget-growth")}),
    "site-key-budget-below-spent": (_site_key_budget_below_spent, {(3, "budget")}),
    "site-key-claims-distributed-noise": (_site_key_claims_distributed_noise, {(3, "guarantee")}),
}


@pytest.mark.parametrize("name", list(TAMPERING))
def test_tampering_fails_verify_naming_the_entry(name: str, honest, tmp_path: Path, capsys) -> None:
    state = copy_state(honest, tmp_path)
    tamper, expected = TAMPERING[name]
    write(state, tamper(read(state), state))
    assert failures(state) == expected
    code, out = audit(state, capsys=capsys)
    lines = out.splitlines()
    assert code == 1 and len(lines) == len(expected) + 1 and "FAILED" in lines[-1]
    for entry, rule in expected:
        assert any(f"entry {entry}: {rule}: " in line for line in lines[:-1])
    report = json.loads(audit(state, "--json", capsys=capsys)[1])
    assert not report["ok"] and {(f["entry"], f["rule"]) for f in report["failures"]} == expected


def test_tampered_ledger_stops_training(honest, site, tmp_path: Path) -> None:
    vocab, dataset = site
    state = copy_state(honest, tmp_path)
    ledger = (state / LEDGER_NAME).read_bytes()
    entries = read(state)
    entries[1]["n_patients"] = 1
    write(state, entries)
    with pytest.raises(LedgerError, match=r"entry 2 breaks the signature rule"):
        LocalTrainer(make_model(vocab), dataset, dp=RDP, batch_size=1, state_dir=state)
    write(state, _reorder(read(state), state))
    with pytest.raises(LedgerError, match=r"entry 2 breaks the chain rule"):
        LocalTrainer(make_model(vocab), dataset, dp=RDP, batch_size=1, state_dir=state)
    (state / LEDGER_NAME).write_bytes(ledger)
    create_signing_key(tmp_path / "keys" / "other.key")
    with pytest.raises(LedgerError, match=r"entry 1 breaks the signature rule"):  # another key, at its path
        LocalTrainer(make_model(vocab), dataset, dp=RDP, batch_size=1, state_dir=state,
                     ledger_key=tmp_path / "keys" / "other.key")
    LocalTrainer(make_model(vocab), dataset, dp=RDP, batch_size=1, state_dir=state)  # the honest ledger loads
    write(state, [{k: v for k, v in e.items() if k not in ("prev", "signature")} for e in read(state)])
    with pytest.raises(LedgerError, match="entries are not signed"):  # a ledger from before signing
        LocalTrainer(make_model(vocab), dataset, dp=RDP, batch_size=1, state_dir=state)
    (state / LEDGER_NAME).write_bytes(ledger)
    (state / SIGNING_KEY_NAME).unlink()
    with pytest.raises(LedgerError, match="signing key .* is missing"):
        LocalTrainer(make_model(vocab), dataset, dp=DPConfig(enabled=False), state_dir=state)


def test_missing_ledger_with_trained_state_stops_training(site, tmp_path: Path) -> None:
    vocab, dataset = site
    (tmp_path / "local_state.pt").write_bytes(b"trained layers")
    for ledger in ("absent", "empty"):
        if ledger == "empty":
            (tmp_path / LEDGER_NAME).write_text("")
        with pytest.raises(LedgerError, match=r"trained state \(local_state.pt\) but no privacy ledger"):
            LocalTrainer(make_model(vocab), dataset, dp=RDP, batch_size=1, state_dir=tmp_path)
    assert not (tmp_path / SIGNING_KEY_NAME).exists()  # nothing created while refusing
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    LocalTrainer(make_model(vocab), dataset, dp=RDP, batch_size=1, state_dir=fresh)  # a new site starts


def test_key_and_state_folder_modes(honest, tmp_path: Path) -> None:
    state = honest[0]
    assert stat.S_IMODE((state / SIGNING_KEY_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    public = load_public_key(state / PUBLIC_KEY_NAME)
    assert public.public_bytes_raw() == load_signing_key(state / SIGNING_KEY_NAME).public_key().public_bytes_raw()
    raw = tmp_path / "site.raw"
    raw.write_bytes(public.public_bytes_raw())  # an auditor may receive the 32 raw bytes instead
    assert verify_ledger(state / LEDGER_NAME, load_public_key(raw)).ok
    # overridden key path: key 0600 in a 0700 folder, public key next to it, state folder 0700
    ledger = PrivacyLedger.in_dir(tmp_path / "site", key_path=tmp_path / "keys" / "ledger.key")
    ledger.append({"dp": False, "objective": "classification", "steps": 1})
    assert stat.S_IMODE((tmp_path / "keys" / "ledger.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "site").stat().st_mode) == 0o700
    assert verify_ledger(tmp_path / "site" / LEDGER_NAME, load_public_key(tmp_path / "keys" / "ledger.pub")).ok
    assert not (tmp_path / "site" / SIGNING_KEY_NAME).exists()


def test_cli_usage_errors_exit_2(honest, tmp_path: Path, capsys) -> None:
    state = honest[0]
    assert main(["audit", "verify", str(tmp_path / "nope.jsonl"), "--public-key", str(state / PUBLIC_KEY_NAME)]) == 2
    assert "error: ledger" in capsys.readouterr().err
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    assert main(["audit", "verify", str(state / LEDGER_NAME), "--public-key", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a PEM or raw" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "verify", str(state / LEDGER_NAME)])  # --public-key is required
    assert exit_.value.code == 2


def test_garbled_line_fails_with_exit_1(honest, tmp_path: Path, capsys) -> None:
    state = copy_state(honest, tmp_path)
    lines = (state / LEDGER_NAME).read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    (state / LEDGER_NAME).write_text("\n".join(lines) + "\n")
    assert failures(state) == {(2, "format"), (3, "chain")}
    assert audit(state, capsys=capsys)[0] == 1


def test_report_page_with_epsilon_plot(honest, tmp_path: Path, capsys) -> None:
    state, eps = honest
    other = copy_state(honest, tmp_path / "b")
    write(other, _edit_epsilon(read(other), other))
    ledgers = [str(state / LEDGER_NAME), str(other / LEDGER_NAME)]
    keys = ["--public-key", str(state / PUBLIC_KEY_NAME), "--public-key", str(other / PUBLIC_KEY_NAME)]
    assert main(["audit", "report", *ledgers, "--out", str(tmp_path / "out"), *keys]) == 1
    page = (tmp_path / "out" / "audit_report.md").read_text()
    assert "FAILED verification (2 failures)" in page and "verified OK" in page
    assert f"| inf (private rounds: {eps[-1]:.4g}) | 50 | none |" in page  # the ledger has a non-private round
    png = (tmp_path / "out" / "epsilon.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert main(["audit", "report", ledgers[0], "--out", str(tmp_path / "plain")]) == 0
    assert "not verified (no public key)" in (tmp_path / "plain" / "audit_report.md").read_text()
    assert main(["audit", "report", *ledgers, "--out", str(tmp_path / "x"), *keys[:2]]) == 2
    assert "one --public-key per ledger" in capsys.readouterr().err
