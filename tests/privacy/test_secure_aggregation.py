"""Secure aggregation (Flower's SecAgg+) in fedpir's round: the server holds only the sum.

The federation test runs `tests/secagg_driver.py` (real ServerApp + ClientApp on Flower's simulation
engine, 3 sites, distributed noise on) in a subprocess: it records every reply the server receives
and, inside SecAgg+ at each site, the plain update the site masked.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from fedpir.audit.ledger import verify_ledger
from fedpir.client.client_app import make_client_app
from fedpir.privacy.secure_aggregation import DISTRIBUTED_DP, key_order, quantization_tolerance
from fedpir.privacy.signing import load_public_key
from fedpir.run_config import RunSettings
from fedpir.strategies import SharedFedAvg
from fedpir.wire.protocol import NUM_EXAMPLES_KEY, POLICY_REFUSED

DRIVER = Path(__file__).resolve().parents[1] / "secagg_driver.py"
SITES = 3


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from fedpir.synthetic.federation import generate_federation

    root = tmp_path_factory.mktemp("secagg")
    federation = generate_federation(root / "fed", n_sites=SITES, subjects_per_site=4, shape=(16, 16, 16), seed=1)
    settings = RunSettings(federation_dir=str(federation), run_dir=str(root / "run"), num_sites=SITES, volume_size=16,
                           pretrain_rounds=0, finetune_rounds=1, batch_size=2, min_sites=SITES,
                           secure_aggregation=True, distributed_noise=True)
    (root / "settings.json").write_text(json.dumps(settings.to_run_config()))
    out = root / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(DRIVER), str(root / "settings.json"), str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sites = {int(p.name.split("-")[1]): dict(np.load(p)) for p in out.glob("site-*-round-1.npz")}
    return {"settings": settings, "sites": sites, "replies": pickle.loads((out / "server_replies.pkl").read_bytes()),
            "final": torch.load(root / "run" / "global_model.pt")}


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.astype(np.float64).ravel() for a in arrays])


def _updates(site: dict) -> list[np.ndarray]:
    return [site[f"update_{i}"] for i in range(sum(k.startswith("update_") for k in site))]


def test_server_receives_only_masked_updates(secure_run: dict) -> None:
    sites, replies = secure_run["sites"], secure_run["replies"]
    assert len(sites) == SITES
    assert all(not a for r in replies if not r["error"] for rec in r["arrays"].values() for a in rec.values()), \
        "an array left a site in the clear"
    masked = {r["node"]: r["masked"] for r in replies if not r["error"] and r["masked"]}
    assert set(masked) == set(sites)
    for node, vectors in masked.items():
        arrays = [bytes_to_ndarray(b) for b in vectors][1:]  # the first is SecAgg+'s weight factor
        update = _flat(_updates(sites[node]))
        received = _flat(arrays)
        assert received.shape == update.shape
        assert abs(np.corrcoef(received, update)[0, 1]) < 0.2, f"site {node}'s masked vector reveals its update"


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity Flower stamps on a message built outside a running app (the server's)."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_sum_equals_plain_fedavg_within_quantization_tolerance(secure_run: dict, server_identity: None) -> None:
    sites, final = secure_run["sites"], secure_run["final"]
    settings: RunSettings = secure_run["settings"]
    keys = key_order(final)
    some = next(iter(sites.values()))
    global_arrays = {k: some[f"global_{i}"] for i, k in enumerate(keys)}
    strategy = SharedFedAvg(min_train_nodes=SITES)
    strategy.global_arrays = global_arrays
    replies = [Message(RecordDict({
        "arrays": ArrayRecord({k: Array(global_arrays[k] + u) for k, u in zip(keys, _updates(site))}),
        "metrics": MetricRecord({NUM_EXAMPLES_KEY: int(site["num_examples"])}),
    }), dst_node_id=node, message_type="train") for node, site in sites.items()]
    plain, _ = strategy.aggregate_train(1, replies)
    assert plain is not None
    tolerance = quantization_tolerance([int(s["num_examples"]) for s in sites.values()],
                                       settings.secagg_clipping_range, settings.secagg_max_weight)
    error = max(float(np.abs(final[k].numpy() - plain[k].numpy()).max()) for k in keys)
    moved = max(float(np.abs(final[k].numpy() - global_arrays[k]).max()) for k in keys)
    assert error <= tolerance < moved / 10, (error, tolerance, moved)


def test_ledger_states_distributed_guarantee_and_verifies(secure_run: dict) -> None:
    settings: RunSettings = secure_run["settings"]
    for site in range(SITES):
        state = settings.run_path / "sites" / f"site-{site}"
        entries = [json.loads(line) for line in (state / "privacy_ledger.jsonl").read_text().splitlines()]
        private = [e for e in entries if e.get("dp")]
        assert private and all(e["guarantee"] == DISTRIBUTED_DP for e in private)
        assert all(e["noise_share"] == pytest.approx(SITES ** -0.5) for e in private)
        assert all(h[0] == e["noise_multiplier"] for e in private for h in e["history"])  # the full sigma is counted
        result = verify_ledger(state / "privacy_ledger.jsonl", load_public_key(state / "ledger_signing.pub"))
        assert result.ok, result.summary()


def test_site_whose_policy_forbids_distributed_noise_refuses_at_setup(tmp_path: Path, server_identity: None) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("max-epsilon = 8.0\n")  # the defaults: distributed-noise-sites = 0
    settings = RunSettings(run_dir=str(tmp_path / "run"), secure_aggregation=True, distributed_noise=True, min_sites=3)
    app = make_client_app(settings)
    context = Context(run_id=1, node_id=7, node_config={"privacy-policy": str(policy), "data-dir": str(tmp_path),
                                                           "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config={})
    setup = ConfigRecord({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
                          Key.CLIPPING_RANGE: 1.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32,
                          Key.MAX_WEIGHT: 100.0})
    reply = app(Message(RecordDict({RECORD_KEY_CONFIGS: setup}), dst_node_id=7, message_type="train"), context)
    assert reply.has_error()
    assert reply.error.code == POLICY_REFUSED
    assert "rule distributed-noise" in reply.error.reason
    assert not (tmp_path / "state").exists()  # refused before the site or any key was made


@pytest.mark.parametrize("overrides, message", [
    (dict(distributed_noise=True), "needs secure-aggregation"),
    (dict(secure_aggregation=True, distributed_noise=True, dp=False), "needs secure-aggregation = true and dp"),
    (dict(secure_aggregation=True, strategy="median"), "weighted-mean strategy"),
    (dict(secure_aggregation=True, transfer_dtype="int8"), "transfer-dtype float32"),
])
def test_run_config_refuses_what_secure_aggregation_cannot_do(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunSettings(**overrides)
