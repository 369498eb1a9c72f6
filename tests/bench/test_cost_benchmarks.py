"""The cost benchmarks (``python -m benchmarks``) on tiny configurations: each runs, prints one
JSON record with its config, machine and figures, appends it to the results file, and the cost
table is generated from those records. The runs on Flower's simulation engine that take minutes
(communication with Dice, scale) are slow tests; their parts that need no engine run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.cost import __main__ as suite
from benchmarks.cost import communication, cost_table, data_path, dp_cost, overhead, scale, secure_aggregation
from fedpir.run_config import RunSettings


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench") / "benchmarks.jsonl"


def run(module, results: Path, *argv: str) -> dict:
    record = module.main([*argv, "--results", str(results)])
    lines = results.read_text().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(record, default=float))  # appended as printed
    assert record["machine"]["cores"] >= 1 and record["machine"]["device"] == "cpu"
    assert record["machine"]["torch_threads"] == 1
    return record


@pytest.mark.slow
def test_secure_aggregation_on_the_simulation_engine(results: Path) -> None:
    record = run(secure_aggregation, results, "--sites", "3", "--subjects", "3", "--rounds", "2")
    f = record["figures"]["sites_3"]
    assert len(f["plain_rounds_s"]) == len(f["secure_rounds_s"]) == 2
    assert f["ratio_round"] == pytest.approx(f["secure_round_s"] / f["plain_round_s"])
    assert record["figures"]["ratio_at_max_sites"] == f["ratio_round"]
    assert "3 sites:" in cost_table.table([record])


def test_data_path(results: Path) -> None:
    f = run(data_path, results, "--patients", "3", "--size", "16", "--epochs", "1")["figures"]
    assert set(f["patients_per_s"]) == {"memory_cache", "disk", "memory_tensors"}
    assert all(v > 0 for v in f["patients_per_s"].values())
    assert f["ratio_disk_to_memory"] == pytest.approx(f["patients_per_s"]["disk"] / f["patients_per_s"]["memory_tensors"])
    assert f["load_patients_per_s"] > 0 and f["cache_fill_s"] > 0


def test_dp_cost(results: Path) -> None:
    f = run(dp_cost, results, "--size", "16", "--batch", "2", "--views", "0", "--steps", "1", "--groups", "head")["figures"]
    rows = {r["mode"]: r for r in f["rows"]}
    assert set(rows) == {"none", "hooks", "functorch"}
    assert rows["none"]["trained_parameters"] == rows["hooks"]["trained_parameters"] > 0
    for mode in ("hooks", "functorch"):
        assert rows[mode]["time_ratio"] == pytest.approx(rows[mode]["step_s"] / rows["none"]["step_s"])
        assert rows[mode]["peak_added_bytes"] > 0 and rows[mode]["profile"]
    assert f["best"]["head"]["best_mode"] in ("hooks", "functorch")
    assert set(f["not_applicable"]) == {"ew", "ghost"}


def test_overhead_on_the_simulation_engine(results: Path) -> None:
    f = run(overhead, results, "--sites", "2", "--subjects", "4", "--size", "16", "--rounds", "2")["figures"]
    assert f["ratio_round"] == pytest.approx(f["federated_round_s"] / f["plain_round_s"])
    assert f["plain_round_s"] == min(f["plain_rounds_s"][1:]) and len(f["plain_rounds_before_s"]) == 2
    assert 1.0 < f["ratio_round_from_parts"] < f["federated_round_s"] / f["steady_round"]["training"]
    assert len(f["rounds"]) == 2 and f["first_round"]["startup"] > 0
    steady = f["steady_round"]
    assert steady["training"] > 0 and steady["serialization"] > 0
    assert sum(steady.values()) == pytest.approx(f["federated_round_s"])  # the parts add up to the round
    assert f["site_torch_threads"] == [f["plain_torch_threads"]]


def test_communication_bytes_without_the_engine() -> None:
    settings = RunSettings(volume_size=16)
    fp32 = communication.shared_fp32_bytes(settings)
    ratios = {d: communication.array_bytes(settings, d) / fp32 for d in ("float32", "float16", "int8")}
    assert 1.0 < ratios["float32"] <= 1.02
    assert ratios["float16"] == pytest.approx(0.5, abs=0.02) and ratios["int8"] == pytest.approx(0.25, abs=0.03)


def test_cost_table_from_the_records(results: Path, tmp_path: Path) -> None:
    records = [json.loads(line) for line in results.read_text().splitlines()]
    text = cost_table.table(records)
    latest = cost_table.newest(records)
    assert latest  # the tests above wrote records
    for name, variants in latest.items():
        assert cost_table.SECTIONS[name](variants[-1])[0] in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Cost\n\n{cost_table.BEGIN}\nSTALE-TABLE\n{cost_table.END}\n\n## Next\n")
    assert cost_table.main(["--results", str(results), "--readme", str(readme)]) == 0
    content = readme.read_text()
    assert "STALE-TABLE" not in content and text in content and content.endswith("## Next\n")


@pytest.mark.slow  # every benchmark now starts Flower's simulation engine or trains
def test_suite_runs_the_chosen_benchmarks(results: Path, capsys: pytest.CaptureFixture) -> None:
    assert suite.main(["--only", "secure_aggregation", "--results", str(results)]) == 0
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["benchmark"] == "secure_aggregation" and record["run"]
    assert "Secure aggregation" in capsys.readouterr().out
    assert suite.main(["--only", "nope", "--results", str(results)]) == 2


@pytest.mark.slow
def test_communication_on_the_simulation_engine(results: Path) -> None:
    f = run(communication, results, "--warm-start", "none", "--size", "16", "--sites", "2", "--subjects", "4",
            "--rounds", "1", "--dtypes", "float32,int8")["figures"]
    assert f["dtypes"]["float32"]["ratio_to_fp32"] <= 1.02
    assert f["dtypes"]["int8"]["ratio_to_fp32"] < 0.3
    assert f["dtypes"]["int8"]["rejected_replies"] == 0  # the server decoded every int8 reply
    assert len(f["dtypes"]["int8"]["dice_minus_float32"]) == 1


@pytest.mark.slow
def test_scale_on_the_simulation_engine(results: Path, tmp_path: Path) -> None:
    f = run(scale, results, "--sites", "2,5", "--subjects", "3", "--distinct", "2", "--plot", str(tmp_path / "s.png"))["figures"]
    assert f["largest_completed"] == 5 and [r["train_replies"] for r in f["rows"]] == [4, 10]
    assert (tmp_path / "s.png").stat().st_size > 0


def test_records_name_paths_inside_the_repository_relative_to_it(capsys: pytest.CaptureFixture) -> None:
    from argparse import Namespace

    from benchmarks.cost.common import ROOT, emit

    argv = ["--results", "", "--plot", str(ROOT / "docs" / "results" / "x.png")]
    emit("probe", argv, Namespace(device="cpu", results=""), {}, {"plot": str(ROOT / "docs" / "x.png")})
    line = capsys.readouterr().out
    assert str(ROOT) not in line and "docs/results/x.png" in line and '"plot": "docs/x.png"' in line
