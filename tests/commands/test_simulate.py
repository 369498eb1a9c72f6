"""`fedpir simulate`: methods on the same federation, and a report whose figures come from the runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpir.commands import main
from fedpir.server.rounds import MetricsLog
from fedpir.simulation.report import final_by_site

TINY = ["--sites", "2", "--subjects", "4", "--size", "16", "--pretrain-rounds", "1", "--finetune-rounds", "1",
        "--warm-start", "none"]


def test_simulate_writes_a_report_from_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["simulate", "--out", str(out), "--methods", "local,centralized", "--transfer-dtype", "float16", *TINY]) == 0
    assert "report:" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    for png in ("curves.png", "dice_per_site.png", "epsilon_per_site.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report
    for method in ("local", "centralized"):
        finals = final_by_site(MetricsLog(out / method / "metrics.jsonl").read())
        assert set(finals) == {"site-0", "site-1"}
        psnr = finals["site-1"]["psnr"]
        assert f"| {method} | site-1 | " in report and f"{psnr:.3f}" in report
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final"]) == {"local", "centralized"} and summary["settings"]["num-sites"] == 2
    assert summary["settings"]["transfer-dtype"] == "float16"
    assert set(summary["cross_modal"]) == {"local", "centralized"}
    for result in summary["cross_modal"].values():
        assert set(result["sites"]) == {"site-0", "site-1"} and 0 <= result["seen"] <= 1
    assert "Cross-modal generalization" in report
    # the same output folder is not overwritten
    assert main(["simulate", "--out", str(out), "--methods", "local", *TINY]) == 2
    assert "already holds runs of local" in capsys.readouterr().err


def test_simulate_rejects_unknown_methods(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--out", str(tmp_path), "--methods", "fedavg,magic"]) == 2
    assert "unknown method(s) magic" in capsys.readouterr().err


@pytest.mark.slow
def test_default_simulation_runs_every_method(tmp_path: Path) -> None:
    from fedpir.simulation.methods import METHODS

    out = tmp_path / "out"
    assert main(["simulate", "--out", str(out), "--methods", ",".join(METHODS)]) == 0
    report = (out / "report.md").read_text()
    assert all(f"| **{m}** | **mean** |" in report for m in METHODS)
    assert (out / "synthesis.png").is_file()


def _prepare(run_dir: str) -> str:
    from fedpir.run_config import RunSettings
    from fedpir.synthetic.prepare import synthetic_federation

    settings = RunSettings(run_dir=run_dir, num_sites=2, subjects_per_site=2, volume_size=16)
    return str(synthetic_federation(settings, eval_subjects=1))


def test_simulated_sites_racing_to_prepare_the_federation_write_it_once(tmp_path: Path) -> None:
    """`flwr run .` without a federation folder: the simulated sites (parallel processes) prepare the
    run's synthetic federation; one writes it, the others wait for it and reuse it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.map(_prepare, [str(tmp_path)] * 3)
    federation = tmp_path / "federation"
    assert set(paths) == {str(federation)}
    assert sorted(p.name for p in federation.glob("site-*")) == ["site-0", "site-1"]
    assert sorted(p.name for p in (federation / "eval").iterdir()) == ["site-0", "site-1"]
    assert not list(tmp_path.glob(".federation.partial"))
    before = (federation / "federation.json").stat().st_mtime_ns
    assert _prepare(str(tmp_path)) == str(federation)
    assert (federation / "federation.json").stat().st_mtime_ns == before
