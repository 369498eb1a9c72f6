"""The federation on Flower's simulation engine: what leaves a site, failing sites, crash and resume.

Each test runs `tests/federation_driver.py` (real ServerApp + ClientApp, Ray backend) in a
subprocess on a tiny synthetic federation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpir.models.warm_start import save_warm_start
from fedpir.run_config import RunSettings
from fedpir.server.rounds import MetricsLog
from fedpir.training.model import build_model

DRIVER = Path(__file__).resolve().parents[1] / "federation_driver.py"
sys.path.insert(0, str(DRIVER.parent))
from federation_driver import digest  # noqa: E402


def tiny_settings(tmp_path: Path, federation: Path, **overrides) -> RunSettings:
    values = dict(federation_dir=str(federation), run_dir=str(tmp_path / "run"), num_sites=4, volume_size=16,
                  pretrain_rounds=1, finetune_rounds=1, batch_size=2)
    return RunSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def federation16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedpir.synthetic.federation import generate_federation

    return generate_federation(tmp_path_factory.mktemp("fed16"), n_sites=4, subjects_per_site=5,
                               shape=(16, 16, 16), seed=1)


def start(settings: RunSettings, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings.to_run_config()))
    record = tmp_path / "record.jsonl"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(config), str(record), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, record


def run(settings: RunSettings, tmp_path: Path, *extra: str) -> list[dict]:
    proc, record = start(settings, tmp_path, *extra)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_sites_send_only_shared_weights_and_scalar_metrics(tmp_path: Path, federation16: Path) -> None:
    warm_model = build_model(tiny_settings(tmp_path, federation16))
    with torch.no_grad():
        warm_model.fusion.prior.tokens.weight.fill_(0.25)  # recognisable warm-start weights
    sha = save_warm_start(warm_model, tmp_path / "warm.pt", {"made": "test"})
    settings = tiny_settings(tmp_path, federation16, warm_start=str(tmp_path / "warm.pt"), warm_start_sha256=sha)
    entries = run(settings, tmp_path)
    model = build_model(settings)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    groups = model.key_groups()
    shared, local = set(groups.shared), set(groups.local) | set(groups.task_heads)
    train = [e for e in entries if e["type"] == "train"]
    evaluate = [e for e in entries if e["type"] == "evaluate"]
    assert len(train) == 4 * 2 and len(evaluate) == 4 * 2  # 4 sites x (1 pretrain + 1 finetune) rounds
    for entry in train:
        sent = entry["sent"]
        assert set(sent["arrays"]) == {"arrays"}, "one ArrayRecord per reply"
        keys = set(sent["arrays"]["arrays"])
        assert keys == shared and not keys & local
        # every tensor is a model weight of the model's own shape: nothing per patient
        assert all(sent["arrays"]["arrays"][k] == shapes[k] for k in keys)
        assert set(sent["configs"]) == {"site"} and set(sent["configs"]["site"]) == {"name"}
    for entry in train + evaluate:
        assert all(t in ("float", "int") for rec in entry["sent"]["metrics"].values() for t in rec.values())
    assert all(not e["sent"]["arrays"] for e in evaluate), "evaluation replies carry no weights"
    # the local layers stayed at the sites, on disk, and every site recorded the warm start it checked
    for site in range(4):
        assert (settings.run_path / "sites" / f"site-{site}" / "local_state.pt").is_file()
        record = json.loads((settings.run_path / "sites" / f"site-{site}" / "warm_start.json").read_text())
        assert record["sha256"] == sha
    # the server started the global weights from the warm start
    first = [e for e in train if e["received"]["configs"]["config"]["round"] == 1]
    from flwr.app import Array, ArrayRecord

    expected = digest(ArrayRecord({k: Array(v.numpy()) for k, v in warm_model.state_dict().items() if k in shared}))
    assert len(first) == 4 and all(e["received"]["digest"]["arrays"] == expected for e in first)
    assert (settings.run_path / "global_model.pt").is_file()


# About 55 s; the same rejections run in-process in tests/strategies/test_strategies.py, and a crashed and
# an unreadable site as deployed in tests/deployment/test_deploy_faults.py (pytest -m deploy).
@pytest.mark.slow
def test_failing_and_faulty_sites_are_dropped_and_the_round_goes_on(tmp_path: Path, federation16: Path) -> None:
    settings = tiny_settings(tmp_path, federation16, finetune_rounds=0)
    run(settings, tmp_path, "--fail-site", "2", "--corrupt-site", "1")
    records = MetricsLog(settings.run_path / "metrics.jsonl").read()
    errors = [r for r in records if r["kind"] == "train-error"]
    trained = {r["site"] for r in records if r["kind"] == "train"}
    assert len(errors) == 1 and "crashed on purpose" in errors[0]["error"]
    assert trained == {"site-0", "site-1", "site-3"}
    reasons = [r["rejection"]["reason"] for r in records if r["kind"] == "rejected"]
    assert sum("non-finite (NaN/Inf)" in reason for reason in reasons) == 1
    assert sum("client error" in reason for reason in reasons) == 1
    aggregate = [r for r in records if r["kind"] == "train-aggregate"]
    assert len(aggregate) == 1 and aggregate[0]["metrics"]
    with np.load(settings.run_path / "checkpoints" / "round-0001.npz") as data:
        assert all(np.isfinite(data[k]).all() for k in data.files)


# About 150 s; the same crash and resume, as deployed, runs in tests/deployment/test_deploy_faults.py (pytest -m deploy).
@pytest.mark.slow
def test_server_killed_after_round_k_resumes_at_k_plus_1(tmp_path: Path, federation16: Path) -> None:
    settings = tiny_settings(tmp_path, federation16, pretrain_rounds=4, finetune_rounds=0)
    latest = settings.run_path / "checkpoints" / "latest.json"
    proc, record = start(settings, tmp_path)
    deadline = time.time() + 300
    while not (latest.is_file() and json.loads(latest.read_text())["round"] >= 1):
        assert proc.poll() is None and time.time() < deadline, "federation ended before round 1 was checkpointed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the server (and its simulated sites) crash
    proc.wait()
    k = json.loads(latest.read_text())["round"]
    assert k < 4, "killed too late to test resuming"
    with np.load(settings.run_path / "checkpoints" / f"round-{k:04d}.npz") as data:
        checkpoint = {name: data[name] for name in data.files}
    record.unlink()

    entries = run(settings, tmp_path)
    records = MetricsLog(settings.run_path / "metrics.jsonl").read()
    resume = [r for r in records if r["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["round"] == k
    after = [r["round"] for r in records[records.index(resume[0]):] if r["kind"] == "train-aggregate"]
    assert after == list(range(k + 1, 5))
    # the first round after the restart starts from exactly the checkpointed weights
    from flwr.app import Array, ArrayRecord

    expected = digest(ArrayRecord({key: Array(value) for key, value in checkpoint.items()}))
    first = [e for e in entries if e["type"] == "train" and e["received"]["configs"]["config"]["round"] == k + 1]
    assert len(first) == 4 and all(e["received"]["digest"]["arrays"] == expected for e in first)
