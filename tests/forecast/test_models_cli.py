"""Model files, the service's interface functions, and the `fit` / `forecast` commands."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest

from adapters.datasets.fleet import load_seed_fleet
from adapters.datasets.model_files import (
    ModelFileError,
    data_hash,
    load_models,
    read_manifest,
    save_models,
)
from adapters.datasets.tables import load_day_ahead_prices
from adapters.forecast_cli import fit, forecast
from controller.forecast.fleet import synthetic_fleet
from controller.forecast.models import (
    ForecastModels,
    headroom_forecast,
    headroom_outlook,
    next_day_needs,
    price_series,
)
from controller.forecast.prices import DayAheadPriceSource
from controller.forecast.trips import TripModel
from tests.forecast.conftest import DATA, FittedPanel

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(fitted_panel: FittedPanel, shipped_trip_model: TripModel) -> ForecastModels:
    """The test panel's GAMs, the shipped trip laws and the NL price history."""
    history = load_day_ahead_prices(DATA / "prices" / "nl_dayahead_2015_2024.csv.gz")
    return ForecastModels(
        base_load=fitted_panel.base,
        trips=shipped_trip_model,
        prices=DayAheadPriceSource(history),
        households={"fixed": 400, "market": 600},
    )


def test_models_survive_their_files(models: ForecastModels, tmp_path: Path) -> None:
    """Saved and loaded back (through LATEST), the models forecast exactly the same."""
    version = save_models(
        models, tmp_path, data_sha256="ab" * 32, data_files={}, inputs={}, metrics={"x": 1.0}
    )
    loaded = load_models(tmp_path)
    assert loaded.version == version.name
    start = datetime(2024, 3, 5, 12, tzinfo=UTC)
    for a, b in ((models, loaded),):
        assert np.array_equal(
            headroom_forecast(a, start, 96, 900.0, 0.95),
            headroom_forecast(b, start, 96, 900.0, 0.95),
        )
    assert loaded.households == {"fixed": 400, "market": 600}
    assert not any(p.suffix == ".pkl" for p in version.iterdir())


def test_a_tampered_model_file_is_refused(models: ForecastModels, tmp_path: Path) -> None:
    """A model file that no longer matches its manifest hash is not loaded."""
    version = save_models(
        models, tmp_path, data_sha256="cd" * 32, data_files={}, inputs={}, metrics={}
    )
    trips = version / "trips.json"
    trips.write_text(trips.read_text().replace('"k":', '"k" :', 1))
    with pytest.raises(ModelFileError, match="does not match the manifest"):
        load_models(version)


def test_a_directory_without_models_says_to_fit(tmp_path: Path) -> None:
    """No manifest and no LATEST: the error names the command that makes them."""
    with pytest.raises(ModelFileError, match="voltpool fit"):
        load_models(tmp_path)


def test_headroom_forecast_is_capacity_minus_the_base_load_quantile(models: ForecastModels) -> None:
    """The planner's array: (slots,), at least 0, and capacity - q-quantile of base load."""
    start = datetime(2024, 1, 15, 16, tzinfo=UTC)
    h = headroom_forecast(models, start, 96, 700.0, 0.95)
    outlook = headroom_outlook(models, start, 96, 700.0)
    assert h.shape == (96,)
    assert np.all(h >= 0)
    assert np.allclose(h, np.maximum(700.0 - outlook.base.quantile_kw(0.95), 0.0))
    assert np.all(headroom_forecast(models, start, 96, 700.0, 0.99) <= h)


def test_the_market_group_reacts_to_the_price_it_is_given(models: ForecastModels) -> None:
    """Dearer energy lowers the market group's load (beta < 0), raising head-room."""
    start = datetime(2024, 1, 15, 16, tzinfo=UTC)
    cheap = headroom_outlook(models, start, 8, 700.0, price_eur_per_kwh=np.full(8, 0.0))
    dear = headroom_outlook(models, start, 8, 700.0, price_eur_per_kwh=np.full(8, 0.3))
    beta = models.base_load.group("market").beta_kw_per_eur_per_kwh
    assert beta is not None
    assert np.allclose(dear.mean_kw - cheap.mean_kw, -600 * beta * 0.3)


def test_interface_gives_prices_and_needs(models: ForecastModels) -> None:
    """price_series flags the forecast part; next_day_needs covers every vehicle."""
    now = datetime(2024, 3, 5, 10, tzinfo=UTC)
    outlook = price_series(models, now, now, 96)
    assert outlook.forecast_from is not None
    vehicles = synthetic_fleet(load_seed_fleet(DATA / "fleet" / "seed_fleet.csv"))
    needs = next_day_needs(models, vehicles, date(2024, 3, 6))
    assert needs.vehicle_ids == tuple(v.vehicle_id for v in vehicles)
    assert np.all(needs.mean_kwh > 0)


def test_fit_and_forecast_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fit` writes a hashed version with metrics; `forecast` prints tables and writes PNGs."""
    out = tmp_path / "models"
    fit(data_dir=DATA, out_dir=out, panel_households=300)
    version, manifest = read_manifest(out)
    listed = [DATA / name for name in manifest["data_files"]]
    assert manifest["data_sha256"] == data_hash(listed, DATA)[0]
    assert {"households", "trips", "prices"} <= set(manifest["metrics"])
    assert manifest["inputs"]["households"]["kind"] == "built panel"
    assert (version / "fitted_week_market.png").read_bytes().startswith(PNG)
    printed = capsys.readouterr().out
    assert "seasonal_naive" in printed
    assert "market beta" in printed

    plots = tmp_path / "plots"
    forecast(date="2024-03-05", model_dir=out, out_dir=plots, capacity_kw=900.0, hours=48)
    printed = capsys.readouterr().out
    assert "forecast" in printed  # the second day's prices are not yet published
    assert "Next-day needs" in printed
    for name in ("headroom.png", "prices.png", "needs.png"):
        assert (plots / "2024-03-05" / name).read_bytes().startswith(PNG)
    json.loads((version / "households.json").read_text())
