"""`fedpir simulate`: methods on the same federation, and a report whose figures come from the runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tracking_events import tensorboard_scalars

from fedpir.commands import main
from fedpir.server.rounds import MetricsLog
from fedpir.simulation.report import final_by_site

TINY = ["--sites", "2", "--subjects", "4", "--size", "16", "--pretrain-rounds", "1", "--finetune-rounds", "1",
        "--warm-start", "none"]


def test_simulate_writes_a_report_from_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    methods = ["local", "public-only", "local-nodp", "pooled-nodp"]
    assert main(["simulate", "--out", str(out), "--methods", ",".join(methods), "--transfer-dtype", "float16", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed
    report = (out / "report.md").read_text()
    for png in ("curves.png", "dice_per_site.png", "epsilon_per_site.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report
    records = {m: MetricsLog(out / m / "metrics.jsonl").read() for m in methods}
    for method in methods:
        finals = final_by_site(records[method])
        assert set(finals) == {"site-0", "site-1"}
        psnr = finals["site-1"]["psnr"]
        assert f"| {method} | site-1 | " in report and f"{psnr:.3f}" in report
    # public-only trains nothing; the -nodp references train without spending privacy
    assert not [r for r in records["public-only"] if r["kind"] == "train"]
    assert all(r["metrics"].get("epsilon", 0.0) == 0.0 for m in ("local-nodp", "pooled-nodp")
               for r in records[m] if r["kind"] == "train")
    assert any(r["metrics"]["epsilon"] > 0 for r in records["local"] if r["kind"] == "train")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final"]) == set(methods) and summary["settings"]["num-sites"] == 2
    assert summary["settings"]["transfer-dtype"] == "float16"
    assert set(summary["cross_modal"]) == set(methods)
    for result in summary["cross_modal"].values():
        assert set(result["sites"]) == {"site-0", "site-1"} and 0 <= result["seen"] <= 1
    assert "Cross-modal generalization" in report
    # the DP forecast of each site beside what local-only learnt there
    assert [f["site"] for f in summary["forecast"]] == ["site-0", "site-1"] and "## DP forecast" in report
    assert all(0 < f["rho"] <= 1 and f["alone"] > 0 and "local" in f["gain"] for f in summary["forecast"])
    # the validity gates, measured from the references, in the report, the summary and the output
    public = sum(final_by_site(records["public-only"])[s]["dice"] for s in ("site-0", "site-1")) / 2
    assert summary["gates"][0]["measured"] == pytest.approx(public)
    gates = summary["gates"]
    assert [g["holds"] for g in gates] == [gates[0]["measured"] <= 0.2, gates[1]["measured"] >= 0.6,
                                          gates[2]["measured"] >= 0.15]
    assert "## Validity gates" in report and f"| {public:.3f} |" in report
    assert printed.count("gate: ") == 3
    assert ("cannot tell the methods apart" in printed) == (False in [g["holds"] for g in gates])
    # the same output folder is not overwritten
    assert main(["simulate", "--out", str(out), "--methods", "local", *TINY]) == 2
    assert "already holds runs of local" in capsys.readouterr().err


def test_a_sweep_over_sites_runs_one_simulation_per_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    flags = ["--methods", "local,public-only", "--size", "16", "--finetune-rounds", "1", "--warm-start", "none"]
    assert main(["simulate", "--out", str(out), "--sweep", "sites=1,2", "--subjects", "4", *flags]) == 0
    assert "sweep report:" in capsys.readouterr().out
    for k in (1, 2):
        summary = json.loads((out / f"sites-{k}" / "summary.json").read_text())
        assert summary["settings"]["num-sites"] == k and summary["settings"]["subjects-per-site"] == "4"
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["value"] for r in sweep["rows"]] == ["1", "2"] and set(sweep["rows"][1]["dice"]) == {"local", "public-only"}
    # one site alone: its forecast is the whole federation's
    assert sweep["rows"][0]["forecast"]["alone"] == pytest.approx(sweep["rows"][0]["forecast"]["distributed"])
    assert (out / "sweep.png").stat().st_size > 1000 and "| 2 |" in (out / "sweep.md").read_text()
    for bad, reason in (("magic=1", "KNOB one of sites, epsilon, h"), ("sites=0", "must be > 0"),
                        ("epsilon=x", "is not a number (or nodp)"), ("h=0,2", "must be in [0, 1]")):
        assert main(["simulate", "--out", str(tmp_path / "no"), "--sweep", bad, *flags]) == 2
        assert reason in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


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


def test_presets_set_the_federation_and_flags_override_them(tmp_path: Path) -> None:
    import argparse

    from fedpir.commands.simulate import add_arguments, checked_settings
    from fedpir.simulation.methods import DEFAULT_METHODS
    from fedpir.simulation.presets import PRESETS

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings, methods = checked_settings(parser.parse_args([]), tmp_path / "a")
    assert (settings.num_sites, settings.site_sizes) == (8, [4, 6, 8, 10, 12, 14, 16, 20])
    assert methods == list(DEFAULT_METHODS) and settings.site_lesion == "B"
    settings, methods = checked_settings(parser.parse_args(["--preset", "hospital"]), tmp_path / "b")
    assert settings.num_sites == 32 and min(settings.site_sizes) == 4 and max(settings.site_sizes) == 60
    assert sum(settings.site_sizes) > 600
    args = parser.parse_args(["--preset", "quick", "--finetune-rounds", "3", "--sites", "3"])
    settings, methods = checked_settings(args, tmp_path / "c")
    assert (settings.num_sites, settings.finetune_rounds, settings.site_sizes, settings.volume_size) == (3, 3, [4] * 3, 16)
    assert methods == PRESETS["quick"]["methods"].split(",") and args.warm_start == "none"
    args = parser.parse_args(["--preset", "quick", "--warm-start", "auto", "--methods", "local"])
    assert checked_settings(args, tmp_path / "d")[1] == ["local"] and args.warm_start == "auto"


def test_simulated_methods_share_one_engine_start_and_track_to_tensorboard(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two methods on Flower's simulation engine: Ray starts once (the real ``ray.init``, counted) and
    is down at the end; each site reserves one of this machine's cores when the sites outnumber them;
    the round metrics of the ServerApp and of a baseline are in TensorBoard, equal to metrics.jsonl."""
    import ray

    from fedpir.simulation.engine import site_cpus

    starts = []
    real_init = ray.init
    monkeypatch.setattr(ray, "init", lambda *a, **k: starts.append(k) or real_init(*a, **k))
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--methods", "fedpir,fedavg,local", "--tracking", "tensorboard", *TINY]) == 0
    assert len(starts) == 1 and not ray.is_initialized()
    checked = 0
    for method in ("fedpir", "local"):  # the ServerApp's records and a baseline runner's, read back from TensorBoard
        scalars = tensorboard_scalars(out / method / "tensorboard")
        for r in MetricsLog(out / method / "metrics.jsonl").read():
            tag = "/".join(p for p in (r.get("stage"), r["kind"], r.get("site")) if p)
            for name in ("dice", "epsilon"):
                if r["kind"] in ("evaluate", "train-aggregate") and name in r["metrics"]:
                    assert scalars[f"{tag}/{name}"][r["round"]] == pytest.approx(r["metrics"][name], rel=1e-6)
                    checked += 1
    assert checked >= 6  # per site and round: dice of both methods, the federation's epsilon
    for method in ("fedpir", "fedavg"):
        assert {r["site"] for r in MetricsLog(out / method / "metrics.jsonl").read() if r["kind"] == "train"} == \
            {"site-0", "site-1"}
    assert site_cpus(0, 8, available=2) == 1 and site_cpus(0, 2, available=16) == 8 and site_cpus(0, 1, 2) == 2
    assert site_cpus(3, 8, available=2) == 3
