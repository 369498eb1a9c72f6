"""benchmarks/experiments/zero_shot.py and stitching.py end to end at a tiny size, each run as a process:
they run, the federated fit equals the pooled one, the held-out patients are a stratified draw, and
they write the JSON (with its command) and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from benchmark_runs import one_line_error, run_benchmark

ZERO_SHOT = "benchmarks/experiments/zero_shot.py"
TINY = ("--sites", "2", "--subjects", "6", "--held-out", "2", "--size", "16", "--text", "hashed")


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """Two seeds of the zero-shot benchmark, pretraining one epoch: its JSON and where it is."""
    out = tmp_path_factory.mktemp("zero-shot") / "zs.json"
    run_benchmark(ZERO_SHOT, "--seeds", "0,1", *TINY, "--pretrain-epochs", "1", "--poolings", "mean,max", "--out", str(out))
    return json.loads(out.read_text()), out


def test_benchmark_runs_end_to_end(zero_shot: tuple[dict[str, Any], Path]) -> None:
    doc, out = zero_shot
    assert doc["command"].startswith(f"python {ZERO_SHOT} --seeds 0,1")
    assert doc["text_encoders"] == {"hashed": "hashed-ngrams-256"}
    assert [run["seed"] for run in doc["runs"]] == [0, 1]
    for run in doc["runs"]:
        assert run["n_train"] == 8 and run["n_test"] == 4
        assert {(r["encoder"], r["pooling"]) for r in run["results"]} == {
            (e, p) for e in ("random", "pretrained") for p in ("mean", "max")} | {("intensity", "percentiles")}
        assert {r["task"] for r in run["results"]} == {"lesion", "volume"}
        for result in run["results"]:
            assert max(result["federated_vs_pooled_max_rel_diff"].values()) < 1e-6
            assert set(result["metrics"]) == {"procrustes", "lstsq", "ridge", "naive", "probe"}
    assert {r["method"] for r in doc["summary"]} == {"procrustes", "lstsq", "ridge", "naive", "probe"}
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_stratified_split_keeps_each_sites_label_share(zero_shot: tuple[dict[str, Any], Path]) -> None:
    """Each site holds out ``--held-out`` patients with its share of lesion-bearing ones (to the nearest
    patient), drawn at random: seeds hold out different patients."""
    runs = zero_shot[0]["runs"]
    for run in runs:
        assert len(run["sites"]) == 2
        for site in run["sites"]:
            assert site["patients"] == {"train": 4, "test": 2} and len(set(site["test_subjects"])) == 2
            lesion = site["lesion"]["train"] + site["lesion"]["test"]
            assert abs(site["lesion"]["test"] - 2 * lesion / 6) <= 0.5, site
        assert run["test_positive"]["lesion"] == sum(site["lesion"]["test"] for site in run["sites"])
    assert [s["test_subjects"] for s in runs[0]["sites"]] != [s["test_subjects"] for s in runs[1]["sites"]]


def test_stitching_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "st.json"
    run_benchmark("benchmarks/experiments/stitching.py", "--seeds", "0", "--sites", "2", "--subjects", "8", "--held-out",
                  "3", "--size", "16", "--pretrain-epochs", "1", "--local-epochs", "1", "--tasks", "volume", "--out", str(out))
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python benchmarks/experiments/stitching.py --seeds 0")
    assert set(doc["summary"]["volume"]) == {"global", "naive", "stitched-procrustes", "stitched-ridge"}
    assert set(doc["summary"]["mismatch"]) == {"naive", "stitched-procrustes", "stitched-ridge"}
    assert doc["runs"][0]["metrics"]["volume"]["global"]["n"] == 6


def test_benchmark_embeds_with_a_warm_start_and_its_lesion_map(tmp_path: Path) -> None:
    from fedpir.models.warm_start import file_sha256
    from fedpir.training.recipe import WarmStartRecipe
    from fedpir.training.warm_start import build_warm_start

    warm = tmp_path / "warm.pt"
    build_warm_start(warm, size=16, modalities="t1,t2,flair,pd", recipe=WarmStartRecipe(subjects=4, pretrain_epochs=1,
                     segment_epochs=1), progress=False)
    out = tmp_path / "zs.json"
    run_benchmark(ZERO_SHOT, "--seeds", "0", *TINY, "--encoder", "warm-start", "--warm-start", str(warm),
                  "--poolings", "mean,lesion", "--out", str(out))
    (run,) = json.loads(out.read_text())["runs"]
    assert "pretrain_seconds" not in run and run["warm_start_sha256"] == file_sha256(warm)
    assert {(r["encoder"], r["pooling"]) for r in run["results"]} == {
        ("warm-start", "mean"), ("warm-start", "lesion"), ("intensity", "percentiles")}
    for result in run["results"]:
        assert max(result["federated_vs_pooled_max_rel_diff"].values()) < 1e-6


def test_a_file_that_is_no_warm_start_is_refused_in_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    done = run_benchmark(ZERO_SHOT, "--seeds", "0", *TINY, "--encoder", "warm-start", "--warm-start", str(junk),
                         "--out", str(tmp_path / "zs.json"), expect=2)
    assert "not a warm-start file" in one_line_error(done) and not (tmp_path / "zs.json").exists()
