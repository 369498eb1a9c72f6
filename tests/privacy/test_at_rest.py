"""State at rest: private folders and files, Fernet encryption with a configured key, clear errors for a
wrong or missing key, and what `fedpir site status` says. Real `cryptography`, real files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedpir.audit.ledger import verify_ledger
from fedpir.commands import main
from fedpir.privacy.at_rest import (
    MAGIC,
    PLAINTEXT,
    StateCipher,
    StateKeyError,
    load_tensors,
    new_state_key,
    save_tensors,
)
from fedpir.privacy.budget import LEDGER_NAME, PrivacyLedger
from fedpir.privacy.signing import PUBLIC_KEY_NAME, SIGNING_KEY_NAME, load_public_key
from fedpir.server.checkpoint import Checkpoint, CheckpointStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def key_cipher(tmp_path: Path, name: str = "state.key") -> StateCipher:
    return StateCipher.from_key_file(new_state_key(tmp_path / "keys" / name))


def test_state_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ledger = PrivacyLedger.in_dir(state)
    ledger.append({"dp": False, "objective": "pretrain", "steps": 1})
    save_tensors({"w": torch.ones(2)}, state / "local_state.pt")
    assert mode(state) == 0o700
    for name in (LEDGER_NAME, SIGNING_KEY_NAME, PUBLIC_KEY_NAME, "local_state.pt"):
        assert mode(state / name) == 0o600, name
    store = CheckpointStore(tmp_path / "run", {"seed": 0})
    store.save(Checkpoint(1, "pretrain", 1, ArrayRecord({"w": Array(np.ones(2, np.float32))}), {}))
    assert mode(store.dir) == 0o700
    assert {p.name: mode(p) for p in store.dir.iterdir()} == dict.fromkeys(
        ("run.json", "latest.json", "round-0001.npz", "round-0001.strategy.npz"), 0o600)


def test_encrypted_local_state_round_trips_and_a_wrong_key_is_one_clear_line(tmp_path: Path) -> None:
    cipher, path = key_cipher(tmp_path), tmp_path / "state" / "local_state.pt"
    weights = {"norm.weight": torch.arange(64, dtype=torch.float32)}
    save_tensors(weights, path, cipher)
    stored = path.read_bytes()
    assert stored.startswith(MAGIC) and weights["norm.weight"].numpy().tobytes() not in stored
    torch.testing.assert_close(load_tensors(path, cipher), weights)
    with pytest.raises(StateKeyError) as wrong:
        load_tensors(path, key_cipher(tmp_path, "other.key"))
    assert "cannot be decrypted with the state key from state-key-file" in str(wrong.value)
    assert "\n" not in str(wrong.value)
    with pytest.raises(StateKeyError, match="is encrypted at rest but no state key is configured"):
        load_tensors(path, PLAINTEXT)


def test_plaintext_state_is_encrypted_in_place_once_a_key_is_configured(tmp_path: Path) -> None:
    path = tmp_path / "local_state.pt"
    save_tensors({"w": torch.ones(3)}, path)
    assert not path.read_bytes().startswith(MAGIC)
    cipher = key_cipher(tmp_path)
    torch.testing.assert_close(load_tensors(path, cipher)["w"], torch.ones(3))
    assert path.read_bytes().startswith(MAGIC) and mode(path) == 0o600


def test_ledger_signing_key_is_encrypted_and_the_ledger_still_verifies(tmp_path: Path) -> None:
    state, cipher = tmp_path / "state", key_cipher(tmp_path)
    ledger = PrivacyLedger.in_dir(state, cipher=cipher)
    ledger.append({"dp": False, "objective": "pretrain", "steps": 1})
    assert (state / SIGNING_KEY_NAME).read_bytes().startswith(MAGIC)
    assert b"PUBLIC KEY" in (state / PUBLIC_KEY_NAME).read_bytes()  # the auditor's copy stays readable
    assert len(PrivacyLedger.in_dir(state, cipher=cipher).entries) == 1
    with pytest.raises(StateKeyError, match="cannot be decrypted"):
        PrivacyLedger.in_dir(state, cipher=key_cipher(tmp_path, "wrong.key"))
    with pytest.raises(StateKeyError, match="no state key is configured"):
        PrivacyLedger.in_dir(state)
    assert verify_ledger(state / LEDGER_NAME, load_public_key(state / PUBLIC_KEY_NAME)).ok


def test_a_new_key_and_its_new_folder_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # a careless admin's shell
    try:
        key_file = new_state_key(tmp_path / "keys" / "state.key")
    finally:
        os.umask(old)
    assert mode(key_file) == 0o600 and mode(key_file.parent) == 0o700


def test_key_sources_and_their_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = new_state_key(tmp_path / "k")
    assert mode(key_file) == 0o600
    with pytest.raises(FileExistsError, match="never overwritten"):
        new_state_key(key_file)
    assert StateCipher.from_node_config({"state-key-file": str(key_file)}).encrypts
    assert not StateCipher.from_node_config({}).encrypts
    monkeypatch.setenv("SITE_STATE_KEY", key_file.read_text())
    assert StateCipher.from_node_config({"state-key-env": "SITE_STATE_KEY"}).key == key_file.read_bytes().strip()
    with pytest.raises(StateKeyError, match="SITE_OTHER_KEY .* is not set"):
        StateCipher.from_node_config({"state-key-env": "SITE_OTHER_KEY"})
    with pytest.raises(StateKeyError, match="keep one"):
        StateCipher.from_node_config({"state-key-env": "SITE_STATE_KEY", "state-key-file": str(key_file)})
    key_file.chmod(0o644)
    with pytest.raises(StateKeyError, match="accessible to others"):
        StateCipher.from_key_file(key_file)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    bad.chmod(0o600)
    with pytest.raises(StateKeyError, match="holds no valid state key"):
        StateCipher.from_key_file(bad)


def test_site_status_says_whether_state_is_encrypted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain, sealed = tmp_path / "plain", tmp_path / "sealed"
    PrivacyLedger.in_dir(plain).append({"dp": False, "objective": "pretrain", "steps": 1})
    assert main(["site", "state-key", str(tmp_path / "site.key")]) == 0
    cipher = StateCipher.from_key_file(tmp_path / "site.key")
    PrivacyLedger.in_dir(sealed, cipher=cipher).append({"dp": False, "objective": "pretrain", "steps": 1})
    save_tensors({"w": torch.ones(1)}, sealed / "local_state.pt", cipher)
    capsys.readouterr()
    assert main(["site", "status", "--state-dir", str(plain)]) == 0
    assert f"at rest: NOT encrypted ({SIGNING_KEY_NAME} in plaintext)" in capsys.readouterr().out
    assert main(["site", "status", "--state-dir", str(sealed), "--json"]) == 0
    at_rest = json.loads(capsys.readouterr().out)["at_rest"]
    assert at_rest == {"encrypted_files": ["ledger_signing.key", "local_state.pt"], "plaintext_files": [],
                       "loose_permissions": []}
    (sealed / "local_state.pt").chmod(0o644)
    assert main(["site", "status", "--state-dir", str(sealed)]) == 0
    assert "WARNING: accessible to other users" in capsys.readouterr().out


def test_wrong_key_on_the_command_line_is_one_line_and_exit_2(tmp_path: Path, small_federation: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    PrivacyLedger.in_dir(state, cipher=key_cipher(tmp_path)).append({"dp": False, "objective": "pretrain", "steps": 1})
    wrong = new_state_key(tmp_path / "wrong.key")
    code = main(["train", "--site", str(small_federation / "site-0"), "--state-dir", str(state), "--state-key-file", str(wrong),
                 "--size", "16", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "cannot be decrypted with the state key" in err


def test_site_from_node_config_keeps_its_state_encrypted_across_restarts(small_federation: Path, tmp_path: Path) -> None:
    """The ClientApp's path (Site.for_node): trained local layers and the signing key are stored
    encrypted, a restart with the key restores the local layers, another key stops the site."""
    from fedpir.client.site import Site
    from fedpir.run_config import RunSettings
    from fedpir.training.model import build_model

    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    settings = RunSettings(volume_size=16, federation_dir=str(small_federation), run_dir=str(tmp_path / "run"),
                           modalities=",".join(vocab), noise_multiplier=1.0)
    node = {"state-key-file": str(new_state_key(tmp_path / "keys" / "site.key"))}
    state = tmp_path / "state"
    site = Site.for_node(settings, small_federation / "site-0", state, "site-0", node)
    site.train("pretrain", epochs=1)
    local = {k: v.clone() for k, v in site.model.state_dict().items() if k not in set(site.sent_keys)}
    fresh = build_model(settings).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in local.items())  # training changed the local layers
    for name in ("local_state.pt", SIGNING_KEY_NAME):
        assert (state / name).read_bytes().startswith(MAGIC) and mode(state / name) == 0o600, name
    assert mode(state) == 0o700
    restarted = Site.for_node(settings, small_federation / "site-0", state, "site-0", node)
    restored = restarted.model.state_dict()
    for key, value in local.items():
        torch.testing.assert_close(restored[key], value)
    with pytest.raises(StateKeyError, match="cannot be decrypted"):
        Site.for_node(settings, small_federation / "site-0", state, "site-0",
                      {"state-key-file": str(new_state_key(tmp_path / "keys" / "other.key"))})


def test_an_encrypted_node_is_admitted_again_after_it_trained(small_federation: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The guard checks the ledger on disk before every request; with the state encrypted it reads the
    signing key with the site's state key (found by the runbook test: every request after a node's first
    training round failed), and `fedpir site policy --state-key-file` reads the same folder."""
    from fedpir.client.guard import admit_evaluation, admit_training
    from fedpir.client.site import Site
    from fedpir.privacy.policy import RESEARCH_POLICY
    from fedpir.run_config import RunSettings

    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    settings = RunSettings(volume_size=16, federation_dir=str(small_federation), run_dir=str(tmp_path / "run"),
                           modalities=",".join(vocab), noise_multiplier=1.0)
    key = new_state_key(tmp_path / "keys" / "site.key")
    state = tmp_path / "state"
    site = Site.for_node(settings, small_federation / "site-0", state, "site-0", {"state-key-file": str(key)})
    admit_training(RESEARCH_POLICY, site, 1)
    site.train("pretrain", epochs=1)
    assert (state / SIGNING_KEY_NAME).read_bytes().startswith(MAGIC)
    admit_evaluation(RESEARCH_POLICY, site)
    admit_training(RESEARCH_POLICY, site, 1)
    assert main(["site", "policy", "--state-dir", str(state), "--state-key-file", str(key)]) == 0
    assert "chain and signatures verified" in capsys.readouterr().out
