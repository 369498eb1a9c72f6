"""The federated alignment stage through the real ServerApp/ClientApp and Flower's Message API.

On Flower's simulation engine (``tests/federation_driver.py``, a subprocess): after one fine-tuning
round the server asks every site for its anchor statistics, fits T and broadcasts it; T equals the
fit on all sites' anchors pooled, what left each site is sums only and is in its ledger (bytes,
digest). Through the ClientApp as a hospital's node delivers a request: the default policy refuses
the statistics and nothing leaves or is recorded; a policy that allows them sends them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedpir.alignment.anchors import site_anchors
from fedpir.alignment.maps import AlignmentStatistics, fit_alignment
from fedpir.alignment.records import record_digest
from fedpir.alignment.text import load_text_encoder
from fedpir.audit.ledger import verify_ledger
from fedpir.client.alignment import anchor_sessions
from fedpir.client.client_app import make_client_app
from fedpir.client.site import Site
from fedpir.privacy.budget import LEDGER_NAME
from fedpir.privacy.release import ALIGNMENT_OBJECTIVE
from fedpir.privacy.signing import PUBLIC_KEY_NAME, load_public_key
from fedpir.run_config import RunSettings
from fedpir.server.rounds import MetricsLog
from fedpir.training.model import build_model
from fedpir.wire.protocol import ALIGN_STAGE, ALIGN_STATISTICS, ALIGNMENT_RECORD, NUM_EXAMPLES_KEY, POLICY_REFUSED, STAGE_KEY

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("simulation", "privacy")]  # shared helpers
from test_federation import run  # noqa: E402
from test_policy import settings_for, write_policy  # noqa: E402

STATISTICS = {f"alignment/{k}" for k in ("n", "sum_x", "sum_y", "sumsq_y", "xtx", "xty")}


@pytest.fixture(scope="module")
def federation3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedpir.synthetic.federation import generate_federation

    return generate_federation(tmp_path_factory.mktemp("fed3"), n_sites=3, subjects_per_site=8, shape=(16, 16, 16),
                               seed=2)


@pytest.mark.parametrize("pooling", ["mean", pytest.param("lesion", marks=pytest.mark.slow)])
def test_the_server_fits_T_on_all_sites_anchors_and_sites_send_only_sums(tmp_path: Path, federation3: Path,
                                                                        pooling: str) -> None:
    settings = RunSettings(federation_dir=str(federation3), run_dir=str(tmp_path / "run"), num_sites=3, volume_size=16,
                           pretrain_rounds=0, finetune_rounds=1, batch_size=2, align=True, text_encoder="hashed",
                           align_pooling=pooling)
    entries = run(settings, tmp_path)
    sent = {e["site"]: e["sent"] for e in entries if e["type"] == ALIGN_STATISTICS}
    assert sorted(sent) == [0, 1, 2]
    encoder = load_text_encoder("hashed")
    global_state = torch.load(settings.run_path / "global_model.pt")
    pooled_z, pooled_t = [], []
    for k, reply in sent.items():
        # only the sums leave: no array has a patient dimension
        arrays = reply["arrays"]["arrays"]
        assert set(arrays) == STATISTICS and set(reply["arrays"]) == {"arrays"}
        dx, dy = arrays["alignment/sum_x"][0], arrays["alignment/sum_y"][0]
        assert arrays["alignment/xtx"] == [dx, dx] and arrays["alignment/xty"] == [dx, dy] and dy == encoder.dim
        assert (dx == 2) == (pooling == "lesion")  # the lesion embedding: largest logit, mean probability
        assert set(reply["configs"]) == {"site", ALIGNMENT_RECORD}
        metrics = reply["metrics"]["metrics"]
        assert set(metrics) - {NUM_EXAMPLES_KEY} == {k for k in metrics if k.startswith("has-modality.")}
        # ... and the site's ledger recorded exactly what left, before it left
        state = settings.run_path / "sites" / f"site-{k}"
        entry = json.loads((state / LEDGER_NAME).read_text().splitlines()[-1])
        assert entry["objective"] == ALIGNMENT_OBJECTIVE and entry["dp"] is False
        assert entry["sha256"] == reply["digest"]["arrays"] and entry["released"] == sorted(STATISTICS)
        assert entry["bytes"] == 8 * (1 + dx + 2 * dy + dx * dx + dx * dy)
        # the pooled reference: the same site's model (global weights + its local layers) on its anchors
        site = Site(settings, federation3 / f"site-{k}", state, f"site-{k}")
        site.load_global(global_state)
        z, t, _ = site_anchors(site.model, anchor_sessions(site), encoder, pooling=pooling)
        assert entry["anchors"] == len(z) == len(t)
        pooled_z.append(z)
        pooled_t.append(t)
    pooled = fit_alignment(AlignmentStatistics.from_pairs(np.concatenate(pooled_z), np.concatenate(pooled_t)))
    served = json.loads((settings.run_path / "alignment.json").read_text())
    assert served["anchors"] == pooled.n_anchors and served["sites"] == ["site-0", "site-1", "site-2"]
    matrix = np.array(served["map"]["matrix"])
    assert np.abs(matrix - pooled.matrix).max() <= 1e-5 * np.abs(pooled.matrix).max()
    np.testing.assert_allclose(served["map"]["scale"], pooled.scale, rtol=1e-6)
    np.testing.assert_allclose(served["map"]["x_mean"], pooled.x_mean, rtol=1e-6, atol=1e-6)  # float32 sums in another order
    # T went back to every site, which scored its held-out patients zero-shot
    records = MetricsLog(settings.run_path / "metrics.jsonl").read()
    zero_shot = [r for r in records if r["kind"] == "align-zeroshot"]
    assert sorted(r["site"] for r in zero_shot) == ["site-0", "site-1", "site-2"]
    assert all(0 <= r["metrics"]["accuracy"] <= 1 for r in zero_shot)
    aggregate = [r for r in records if r["kind"] == "align-zeroshot-aggregate"]
    assert len(aggregate) == 1 and aggregate[0]["metrics"]["accuracy"] == pytest.approx(served["zero_shot"]["accuracy"])


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ClientApp process knows about its task (Flower sets it when it starts one)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def ask_statistics(settings: RunSettings, site_dir: Path, state: Path, policy: Path | None) -> Message:
    """The alignment stage's statistics request, as Flower delivers it to a hospital's node."""
    model = build_model(settings)
    keys = set(model.federated_keys(settings.key_policy))
    content = RecordDict({"arrays": ArrayRecord({k: v for k, v in model.state_dict().items() if k in keys}),
                          "config": ConfigRecord({STAGE_KEY: ALIGN_STAGE})})
    node = {"data-dir": str(site_dir), "state-dir": str(state)} | ({"privacy-policy": str(policy)} if policy else {})
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=settings.to_run_config())
    return make_client_app()(Message(content, dst_node_id=1, message_type=ALIGN_STATISTICS), context)


def test_a_hospital_sends_alignment_statistics_only_if_its_policy_says_so(tmp_path: Path, small_federation: Path) -> None:
    settings = settings_for(tmp_path, align=True, text_encoder="hashed")
    site_dir, state = small_federation / "site-0", tmp_path / "state"
    refused = ask_statistics(settings, site_dir, state, None)  # the default policy
    assert refused.has_error() and not refused.has_content() and refused.error.code == POLICY_REFUSED
    assert "rule alignment-statistics" in refused.error.reason
    assert not (state / LEDGER_NAME).exists(), "nothing left, nothing recorded"

    allowed = write_policy(tmp_path / "policy.toml", **{"max-epsilon": 6.0, "alignment-statistics": True})
    reply = ask_statistics(settings, site_dir, state, allowed)
    assert not reply.has_error()
    assert set(reply.content["arrays"].keys()) == STATISTICS and set(reply.content.array_records) == {"arrays"}
    [entry] = [json.loads(line) for line in (state / LEDGER_NAME).read_text().splitlines()]
    assert entry["objective"] == ALIGNMENT_OBJECTIVE and entry["policy_sha256"]
    assert (entry["bytes"], entry["sha256"]) == record_digest(reply.content["arrays"])
    assert entry["anchors"] == reply.content["metrics"][NUM_EXAMPLES_KEY] == 6
    audit = verify_ledger(state / LEDGER_NAME, load_public_key(state / PUBLIC_KEY_NAME))  # the auditor's view
    assert audit.ok and audit.entries == 1 and audit.non_private_rounds == 1, audit.summary()
