"""The cost benchmarks (``python -m benchmarks``), each run as a process on a tiny configuration: it
prints one JSON record with its config, machine and figures, appends that line to the results file,
and the cost table is generated from those records. The runs on Flower's simulation engine that take
minutes (overhead, communication with Dice, secure aggregation, scale) are slow tests."""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmark_runs import ROOT, one_line_error, run_benchmark


@pytest.fixture(scope="module")
def results() -> Iterator[Path]:
    """The records' file, inside the repository (under the ignored runs/, removed afterwards), so that
    every record shows that a path inside the repository is recorded relative to it."""
    (ROOT / "runs").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-test-", dir=ROOT / "runs"))
    yield folder / "benchmarks.jsonl"
    shutil.rmtree(folder)


def run(name: str, results: Path, *argv: str) -> dict:
    """Run ``benchmarks.cost.NAME`` and check its record: printed last, appended as printed, naming no
    folder of this machine, on this machine."""
    printed = run_benchmark("-m", f"benchmarks.cost.{name}", *argv, "--results", str(results)).stdout.strip().splitlines()[-1]
    assert results.read_text().splitlines()[-1] == printed and str(ROOT) not in printed
    record = json.loads(printed)
    assert record["benchmark"] == name
    command = shlex.join(["python", "-m", f"benchmarks.cost.{name}", *argv, "--results", str(results)])
    assert record["command"] == command.replace(f"{ROOT}/", "")
    assert record["machine"]["cores"] >= 1 and record["machine"]["device"] == "cpu"
    assert record["machine"]["torch_threads"] == 1
    return record


def cost_table(results: Path) -> str:
    return run_benchmark("-m", "benchmarks.cost.cost_table", "--results", str(results)).stdout


@pytest.mark.slow
def test_secure_aggregation_on_the_simulation_engine(results: Path) -> None:
    record = run("secure_aggregation", results, "--sites", "3", "--subjects", "3", "--rounds", "2")
    f = record["figures"]["sites_3"]
    assert len(f["plain_rounds_s"]) == len(f["secure_rounds_s"]) == 2
    assert f["ratio_round"] == pytest.approx(f["secure_round_s"] / f["plain_round_s"])
    assert record["figures"]["ratio_at_max_sites"] == f["ratio_round"]
    assert "3 sites:" in cost_table(results)


def test_data_path(results: Path) -> None:
    f = run("data_path", results, "--patients", "3", "--size", "16", "--epochs", "1")["figures"]
    assert set(f["patients_per_s"]) == {"memory_cache", "disk", "memory_tensors"}
    assert all(v > 0 for v in f["patients_per_s"].values())
    assert f["ratio_disk_to_memory"] == pytest.approx(f["patients_per_s"]["disk"] / f["patients_per_s"]["memory_tensors"])
    assert f["load_patients_per_s"] > 0 and f["cache_fill_s"] > 0


def test_dp_cost(results: Path) -> None:
    f = run("dp_cost", results, "--size", "16", "--batch", "2", "--views", "0", "--steps", "1", "--groups", "head")["figures"]
    rows = {r["mode"]: r for r in f["rows"]}
    assert set(rows) == {"none", "hooks", "functorch"}
    assert rows["none"]["trained_parameters"] == rows["hooks"]["trained_parameters"] > 0
    for mode in ("hooks", "functorch"):
        assert rows[mode]["time_ratio"] == pytest.approx(rows[mode]["step_s"] / rows["none"]["step_s"])
        assert rows[mode]["peak_added_bytes"] > 0 and rows[mode]["profile"]
    assert f["best"]["head"]["best_mode"] in ("hooks", "functorch")
    assert set(f["not_applicable"]) == {"ew", "ghost"}


@pytest.mark.slow  # Flower's simulation engine: about 70 s on 2 cores
def test_overhead_on_the_simulation_engine(results: Path) -> None:
    f = run("overhead", results, "--sites", "2", "--subjects", "4", "--size", "16", "--rounds", "2")["figures"]
    assert f["ratio_round"] == pytest.approx(f["federated_round_s"] / f["plain_round_s"])
    assert f["plain_round_s"] == min(f["plain_rounds_s"][1:]) and len(f["plain_rounds_before_s"]) == 2
    assert 1.0 < f["ratio_round_from_parts"] < f["federated_round_s"] / f["steady_round"]["training"]
    assert len(f["rounds"]) == 2 and f["first_round"]["startup"] > 0
    steady = f["steady_round"]
    assert steady["training"] > 0 and steady["serialization"] > 0
    assert sum(steady.values()) == pytest.approx(f["federated_round_s"])  # the parts add up to the round
    assert f["site_torch_threads"] == [f["plain_torch_threads"]]


def test_cost_table_shows_the_newest_record_of_each_benchmark(results: Path, tmp_path: Path) -> None:
    """From the records the tests above appended, and two more of the data path with made-up figures."""
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["benchmark"] for r in records} >= {"data_path", "dp_cost"}
    data = next(r for r in records if r["benchmark"] == "data_path")
    lines = results.read_text()
    for rate in (11111.11, 22222.22):
        data["figures"]["patients_per_s"]["memory_tensors"] = rate
        lines += json.dumps(data) + "\n"
    later = tmp_path / "later.jsonl"
    later.write_text(lines)
    text = cost_table(later)
    assert "**Data path**" in text and "**DP cost**" in text
    assert "22222.22" in text and "11111.11" not in text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "No cost benchmark records yet" in cost_table(empty)


def test_cli_latency(results: Path) -> None:
    """Each command answered with its expected exit code (else the benchmark fails) and its figures recorded."""
    record = run("cli", results, "--repeats", "1")
    assert set(record["figures"]) == {"help", "version", "simulate_help", "train_help", "bad_strategy", "bad_methods"}
    for figures in record["figures"].values():
        assert 0 < figures["min_s"] <= figures["median_s"] and figures["met"] == (figures["min_s"] <= figures["target_s"])
    assert "CLI latency" in cost_table(results)


def test_cost_table_without_records_says_so_in_one_line(tmp_path: Path) -> None:
    done = run_benchmark("-m", "benchmarks.cost.cost_table", "--results", str(tmp_path / "none.jsonl"), expect=2)
    assert "run `python -m benchmarks` first" in one_line_error(done)


def test_suite_refuses_an_unknown_benchmark_in_one_line() -> None:
    done = run_benchmark("-m", "benchmarks", "--only", "data_path,nope", "--results", "", expect=2)
    assert "unknown benchmark(s) nope" in one_line_error(done) and done.stdout == ""


@pytest.mark.slow  # every benchmark starts Flower's simulation engine or trains
def test_suite_runs_the_chosen_benchmarks(results: Path) -> None:
    done = run_benchmark("-m", "benchmarks", "--only", "secure_aggregation", "--results", str(results))
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["benchmark"] == "secure_aggregation" and record["run"]  # the suite's run id
    assert "Secure aggregation" in done.stdout and "benchmark secure_aggregation:" in done.stderr


@pytest.mark.slow
def test_communication_on_the_simulation_engine(results: Path) -> None:
    f = run("communication", results, "--warm-start", "none", "--size", "16", "--sites", "2", "--subjects", "4",
            "--rounds", "1", "--dtypes", "float32,int8")["figures"]
    assert f["dtypes"]["float32"]["ratio_to_fp32"] <= 1.02
    assert f["dtypes"]["int8"]["ratio_to_fp32"] < 0.3
    assert f["dtypes"]["int8"]["rejected_replies"] == 0  # the server decoded every int8 reply
    assert len(f["dtypes"]["int8"]["dice_minus_float32"]) == 1
    assert f["dtypes"]["float32"]["array_bytes"] / f["shared_fp32_bytes"] == pytest.approx(1.0, abs=0.02)
    assert f["dtypes"]["int8"]["array_bytes"] / f["shared_fp32_bytes"] == pytest.approx(0.25, abs=0.03)


@pytest.mark.slow
def test_scale_on_the_simulation_engine(results: Path) -> None:
    plot = results.parent / "scale.png"
    f = run("scale", results, "--sites", "2,5", "--subjects", "3", "--distinct", "2", "--plot", str(plot))["figures"]
    assert f["largest_completed"] == 5 and [r["train_replies"] for r in f["rows"]] == [4, 10]
    assert plot.stat().st_size > 0 and f["plot"] == str(plot.relative_to(ROOT))  # recorded relative to the repository



@pytest.mark.slow
def test_parallel_sites_on_the_simulation_engine(results: Path) -> None:
    plot = results.parent / "parallel.png"
    f = run("parallel", results, "--preset", "quick", "--sites", "4", "--rounds", "2", "--plot", str(plot))["figures"]
    rows = {r["mode"]: r for r in f["rows"]}
    assert all(r["completed"] for r in rows.values()), rows
    assert rows["one core"]["cores"] == 1 and rows["one core"]["threads"] == [1]
    assert rows["parallel"]["threads"] == [1] and rows["serial"]["threads"] == [rows["serial"]["cores"]]
    assert f["parallel_over_serial"] == pytest.approx(rows["parallel"]["later_round_s"] / rows["serial"]["later_round_s"])
    assert plot.stat().st_size > 0 and "Parallel sites" in cost_table(results)
