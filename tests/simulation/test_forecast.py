"""The DP forecast of a simulation: measured coherence, the three ratios, and the report's table and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedpir.privacy.dp import DPConfig, forecast, plan_round
from fedpir.run_config import RunSettings
from fedpir.simulation.forecast import clipped_gradient_sum, site_forecasts
from fedpir.simulation.presets import PRIVATE_PHASE
from fedpir.simulation.report import forecast_gains, forecast_table, plot_forecast


def test_coherence_divides_the_forecast() -> None:
    plan = plan_round(DPConfig(target_epsilon=8.0, planned_rounds=16), n_patients=10, batch_size=10, epochs=1, delta=1e-5)
    full = forecast(plan, trained_parameters=44, n_patients=10, total_steps=16)
    assert forecast(plan, trained_parameters=44, n_patients=10, total_steps=16, coherence=0.25).ratio == pytest.approx(
        4 * full.ratio)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="coherence"):
            forecast(plan, trained_parameters=44, n_patients=10, total_steps=16, coherence=bad)


def test_site_forecasts_pool_the_patients_as_each_method_does(small_federation: Path, tmp_path: Path) -> None:
    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    settings = RunSettings(volume_size=16, federation_dir=str(small_federation), run_dir=str(tmp_path),
                           modalities=",".join(vocab), **PRIVATE_PHASE)
    forecasts = site_forecasts(settings)
    assert [f.site for f in forecasts] == ["site-0", "site-1", "site-2", "site-3"]
    for f in forecasts:
        assert 0 < f.rho <= 1 and f.patients >= 1
        # fedpir's sites each add their noise: sqrt(K) times the noise of fedpir-dn's single draw
        assert f.fedpir == pytest.approx(2 * f.distributed)
    # one full-site step per round: sigma, d and T are the sites' own, so R * rho * n is one constant
    noise = [f.alone * f.rho * f.patients for f in forecasts]
    assert noise == pytest.approx([noise[0]] * len(noise))
    sums = [clipped_gradient_sum(settings, f.site) for f in forecasts]
    patients = sum(n for _, n in sums)
    rho_pool = float(sum(total for total, _ in sums).norm()) / (patients * settings.max_grad_norm)
    assert forecasts[0].distributed == pytest.approx(noise[0] / (rho_pool * patients), rel=1e-4)
    summary = {"public-only": {f.site: {"dice": 0.1} for f in forecasts},
               "local": {f.site: {"dice": 0.2} for f in forecasts},
               "fedpir": {f.site: {"dice": 0.4} for f in forecasts[:2]} | {"site-2": {"dice": math.nan}}}
    rows = forecast_gains(forecasts, summary)
    assert rows[0]["gain"] == pytest.approx({"local": 0.1, "fedpir": 0.3})
    assert "fedpir" not in rows[2]["gain"] and "fedpir" not in rows[3]["gain"]  # NaN and missing left out
    table = forecast_table(rows)
    assert table.count("\n") == 1 + len(forecasts) and "| site-2 |" in table and "n/a" in table
    assert plot_forecast(rows, tmp_path / "forecast.png").stat().st_size > 0

