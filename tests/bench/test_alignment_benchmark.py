"""benchmarks/experiments/zero_shot.py end to end at a tiny size: it runs, its federated fit equals the pooled
one, and it writes the JSON (with its command) and the plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np


def _load_benchmark() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "experiments" / "zero_shot.py"
    spec = importlib.util.spec_from_file_location("zero_shot_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_stratified_split_keeps_each_sites_label_share() -> None:
    bench = _load_benchmark()
    labels = [0] * 8 + [1] * 16
    train, test = bench.split_site(labels, 6, np.random.default_rng(0))
    assert sorted(train + test) == list(range(24)) and len(test) == 6
    assert sum(labels[i] for i in test) == 4
    _, other = bench.split_site(labels, 6, np.random.default_rng(1))
    assert other != test


def test_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    bench = _load_benchmark()
    out = tmp_path / "zs.json"
    argv = ["--seeds", "0", "--sites", "2", "--subjects", "6", "--held-out", "2", "--size", "16",
            "--pretrain-epochs", "1", "--text", "hashed", "--poolings", "mean,max", "--out", str(out)]
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python benchmarks/experiments/zero_shot.py --seeds 0")
    assert doc["text_encoders"] == {"hashed": "hashed-ngrams-256"}
    (run,) = doc["runs"]
    assert run["n_train"] == 8 and run["n_test"] == 4
    assert {(r["encoder"], r["pooling"]) for r in run["results"]} == {
        (e, p) for e in ("random", "pretrained") for p in ("mean", "max")} | {("intensity", "percentiles")}
    assert {r["task"] for r in run["results"]} == {"lesion", "volume"}
    for result in run["results"]:
        assert max(result["federated_vs_pooled_max_rel_diff"].values()) < 1e-6
        assert set(result["metrics"]) == {"procrustes", "lstsq", "ridge", "naive", "probe"}
    assert {r["method"] for r in doc["summary"]} == {"procrustes", "lstsq", "ridge", "naive", "probe"}
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_stitching_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks" / "experiments"
    sys.path.insert(0, str(bench_dir))  # stitching.py imports zero_shot.py beside it
    try:
        spec = importlib.util.spec_from_file_location("stitching_benchmark", bench_dir / "stitching.py")
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        out = tmp_path / "st.json"
        argv = ["--seeds", "0", "--sites", "2", "--subjects", "8", "--held-out", "3", "--size", "16",
                "--pretrain-epochs", "1", "--local-epochs", "1", "--tasks", "volume", "--out", str(out)]
        assert bench.main(argv) == 0
    finally:
        sys.path.remove(str(bench_dir))
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python benchmarks/experiments/stitching.py --seeds 0")
    assert set(doc["summary"]["volume"]) == {"global", "naive", "stitched-procrustes", "stitched-ridge"}
    assert set(doc["summary"]["mismatch"]) == {"naive", "stitched-procrustes", "stitched-ridge"}
    assert doc["runs"][0]["metrics"]["volume"]["global"]["n"] == 6


def test_benchmark_embeds_with_a_warm_start_and_its_lesion_map(tmp_path: Path) -> None:
    from fedpir.models.warm_start import file_sha256
    from fedpir.training.warm_start import build_warm_start

    warm = tmp_path / "warm.pt"
    build_warm_start(warm, size=16, modalities="t1,t2,flair,pd", subjects=4, pretrain_epochs=1, segment_epochs=1,
                     progress=False)
    bench = _load_benchmark()
    out = tmp_path / "zs.json"
    argv = ["--seeds", "0", "--sites", "2", "--subjects", "6", "--held-out", "2", "--size", "16",
            "--encoder", "warm-start", "--warm-start", str(warm), "--text", "hashed", "--poolings", "mean,lesion",
            "--out", str(out)]
    assert bench.main(argv) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert "pretrain_seconds" not in run and run["warm_start_sha256"] == file_sha256(warm)
    assert {(r["encoder"], r["pooling"]) for r in run["results"]} == {
        ("warm-start", "mean"), ("warm-start", "lesion"), ("intensity", "percentiles")}
    for result in run["results"]:
        assert max(result["federated_vs_pooled_max_rel_diff"].values()) < 1e-6
