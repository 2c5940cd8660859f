"""The household GAM on the panel built from the shipped real profiles."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
from scipy.stats import norm

from adapters.datasets.panel import HouseholdSources, PanelSpec, build_panel, panel_sample
from controller.forecast.calendar import calendar, slot_times
from controller.forecast.evaluation import interval_coverage, pinball_loss
from controller.forecast.headroom import forecast_headroom
from controller.forecast.household import (
    BaseLoadModel,
    GroupLoadAccumulator,
    HouseholdModel,
    common_residuals,
)
from tests.forecast.conftest import FittedPanel


def test_both_groups_fit_and_statsmodels_reports_convergence(fitted_panel: FittedPanel) -> None:
    """PIRLS converged and the GCV penalty search stopped on its tolerances, not its budget."""
    for model in fitted_panel.models.values():
        report = model.report
        assert report.pirls_converged
        assert report.penalty_search_converged
        assert report.penalty_evaluations < model.spec.max_penalty_evaluations
        assert all(a > 0 for a in report.alpha)
        assert 10 < report.edf < model.params.shape[0]


def test_the_market_groups_price_response_is_recovered(fitted_panel: FittedPanel) -> None:
    """The GAM recovers the beta built into the market group within 3 standard errors and 10 %."""
    model = fitted_panel.models["market"]
    truth = fitted_panel.panel.beta_kw_per_eur_per_kwh
    beta = model.beta_kw_per_eur_per_kwh
    se = model.report.beta_se
    assert beta is not None
    assert se is not None
    assert abs(beta - truth) < 3 * se
    assert abs(beta - truth) < 0.1 * abs(truth)
    assert fitted_panel.models["fixed"].beta_kw_per_eur_per_kwh is None


@pytest.mark.parametrize("group", ["fixed", "market"])
def test_the_gam_beats_seasonal_naive_on_held_out_weeks(
    fitted_panel: FittedPanel, group: str
) -> None:
    """Lower mean pinball loss and absolute error than 'same slot last week'."""
    gam, naive = fitted_panel.scores[group]
    assert gam.slots == naive.slots > 0
    assert gam.pinball_kw < naive.pinball_kw
    assert gam.mae_kw < naive.mae_kw


@pytest.mark.parametrize("group", ["fixed", "market"])
def test_the_90_percent_interval_covers_85_to_95_percent(
    fitted_panel: FittedPanel, group: str
) -> None:
    """Held-out coverage of the GAM's central 90 % interval is within 85-95 %."""
    gam, _ = fitted_panel.scores[group]
    assert 0.85 <= gam.coverage_90 <= 0.95


def test_independent_households_alone_would_give_far_too_narrow_intervals(
    fitted_panel: FittedPanel,
) -> None:
    """Why the shared term exists: the seed's variance alone covers well under 90 %."""
    model = fitted_panel.models["fixed"]
    load = fitted_panel.panel.loads["fixed"]
    held = fitted_panel.held_out
    hour = np.floor(calendar(load.times_s, model.tz).hour).astype(np.int64)
    mu = load.mean_kw - common_residuals(model, load)
    sd_independent = model.sigma_ind_kw[hour] / np.sqrt(load.households)
    z = float(norm.ppf(0.95))
    coverage = interval_coverage(
        load.mean_kw[held], (mu - z * sd_independent)[held], (mu + z * sd_independent)[held]
    )
    assert coverage < 0.75


def test_a_model_survives_its_json_form(fitted_panel: FittedPanel) -> None:
    """Rebuilt from JSON, the model predicts exactly what the fitted one does."""
    model = fitted_panel.models["market"]
    again = HouseholdModel.from_dict(json.loads(json.dumps(model.to_dict())))
    times = slot_times(datetime(2016, 6, 6, tzinfo=UTC), 96 * 3)
    prices = np.linspace(-0.02, 0.12, times.shape[0])
    assert np.array_equal(again.mean_kw(times, prices), model.mean_kw(times, prices))
    assert np.array_equal(again.sigma_common_kw, model.sigma_common_kw)


def test_group_load_for_n_households_follows_the_documented_variance(
    fitted_panel: FittedPanel,
) -> None:
    """Mean N * mu and variance N sigma_ind^2 + N^2 sigma_common^2 (one group)."""
    model = fitted_panel.models["fixed"]
    base = BaseLoadModel(groups=(model,), common_correlation=np.ones((1, 1)))
    start = datetime(2016, 11, 7, 12, tzinfo=UTC)
    forecast = forecast_headroom(base, start, 96, 2000.0, {"fixed": 1500})
    times = slot_times(start, 96)
    hour = np.floor(calendar(times, model.tz).hour).astype(np.int64)
    expected_var = 1500 * model.sigma_ind_kw[hour] ** 2 + 1500**2 * model.sigma_common_kw[hour] ** 2
    assert np.allclose(forecast.base.mean_kw, 1500 * model.mean_kw(times))
    assert np.allclose(forecast.sd_kw**2, expected_var)
    assert np.allclose(forecast.mean_kw, 2000.0 - forecast.base.mean_kw)


def test_headroom_quantiles_order_and_sample_paths_match_them(fitted_panel: FittedPanel) -> None:
    """assured(0.99) < assured(0.95) < assured(0.9) < median, and paths reproduce the marginals."""
    start = datetime(2016, 2, 1, 16, tzinfo=UTC)
    slots = 96
    prices = np.full(slots, 0.03)
    forecast = forecast_headroom(
        fitted_panel.base, start, slots, 1500.0, {"fixed": 1000, "market": 1000}, prices
    )
    a99, a95, a90, a50 = (forecast.assured_kw(q) for q in (0.99, 0.95, 0.9, 0.5))
    assert np.all(a99 < a95)
    assert np.all(a95 < a90)
    assert np.all(a90 < a50)
    assert np.allclose(a50, forecast.mean_kw)
    paths = forecast.sample_paths(np.random.default_rng(3), 4000)
    assert paths.shape == (4000, slots)
    assert np.allclose(paths.mean(axis=0), forecast.mean_kw, atol=4 * forecast.sd_kw.max() / 60)
    assert np.allclose(paths.std(axis=0), forecast.sd_kw, rtol=0.08)
    share_below = np.mean(paths < a95[None, :])
    assert share_below == pytest.approx(0.05, abs=0.015)


def test_pinball_loss_of_the_true_median_is_half_the_mean_absolute_error() -> None:
    """For level 0.5 the pinball loss is MAE / 2, whatever the data."""
    actual = np.array([1.0, 3.0, -2.0, 5.0])
    predicted = np.array([0.0, 3.5, -1.0, 1.0])
    assert pinball_loss(actual, predicted, 0.5) == pytest.approx(
        np.mean(np.abs(actual - predicted)) / 2
    )


def test_the_accumulator_matches_numpy_over_chunks() -> None:
    """Chunked sums give the same mean, variance and lag covariance as the whole array."""
    rng = np.random.default_rng(5)
    loads = rng.gamma(2.0, 0.3, size=(57, 40))
    times = 1451862000 + 900 * np.arange(40, dtype=np.int64)
    acc = GroupLoadAccumulator("fixed", times, 900)
    for part in np.array_split(loads, 4):
        acc.add(part)
    load = acc.result()
    dev = loads - loads.mean(axis=0)
    assert np.allclose(load.mean_kw, loads.mean(axis=0))
    assert np.allclose(load.within_var_kw2, loads.var(axis=0, ddof=1))
    assert np.allclose(load.within_lag_cov_kw2, (dev[:, :-1] * dev[:, 1:]).sum(axis=0) / 56)


def test_the_built_panel_is_the_sum_of_its_households(household_sources: HouseholdSources) -> None:
    """Every household regenerated on its own adds up to the groups the builder summed."""
    spec = PanelSpec(households=30, days=14, first_day=100, seed=5)
    built = build_panel(household_sources, spec)
    sample = panel_sample(household_sources, spec, range(30))
    groups = sample.group_loads(built.loads["market"].price_eur_per_kwh)
    for g in ("fixed", "market"):
        assert groups[g].households == built.loads[g].households
        assert np.allclose(groups[g].mean_kw, built.loads[g].mean_kw)
    assert sample.load_kw.min() >= 0.0
    assert 0.05 < sample.load_kw.mean() < 1.5


def test_tabulated_terms_equal_the_spline_design(fitted_panel: FittedPanel) -> None:
    """The fast table lookup gives what statsmodels' spline bases give, across DST changes."""
    from controller.forecast.household import _design, _full_matrix

    model = fitted_panel.models["market"]
    times = slot_times(datetime(2016, 3, 20, tzinfo=UTC), 96 * 14)  # spans the March change
    prices = np.linspace(0.0, 0.1, times.shape[0])
    dev = prices - model.price_mean_eur_per_kwh
    exact = _full_matrix(_design(model.spec, calendar(times, model.tz), dev)) @ model.params
    assert np.allclose(model.mean_kw(times, prices), exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("zone", ["Europe/Berlin", "Europe/Riga", "America/New_York", "UTC"])
def test_the_calendar_matches_pandas_time_zone_conversion(zone: str) -> None:
    """Local hour, weekday, day of year and local date agree with pandas over four years."""
    import pandas as pd

    t = np.arange(1451602800, 1451602800 + 4 * 366 * 86400, 900 * 7, dtype=np.int64)
    cal = calendar(t, zone)
    local = pd.DatetimeIndex(pd.to_datetime(t, unit="s", utc=True)).tz_convert(zone)
    assert np.array_equal(cal.hour, local.hour + local.minute / 60)
    assert np.array_equal(cal.weekday, local.day_of_week)
    assert np.array_equal(cal.day_of_year, local.day_of_year + cal.hour / 24)


def test_the_built_panel_looks_like_the_bdew_h25_standard_profile(
    fitted_panel: FittedPanel,
) -> None:
    """An independent real reference: the panel's daily and yearly shapes follow BDEW H25."""
    import warnings

    import pandas as pd
    from demandlib import bdew

    index = pd.date_range("2016-01-01", periods=366 * 96, freq="15min")
    with warnings.catch_warnings():
        # demandlib 0.2.2 calls DataFrame.rename(inplace=True), deprecated in pandas 3.1.
        warnings.simplefilter("ignore", category=pd.errors.Pandas4Warning)
        h25 = np.asarray(bdew.H25(index), dtype=float)
    load = fitted_panel.panel.loads["fixed"]
    cal = calendar(load.times_s, "Europe/Berlin")
    slot = np.round(cal.hour * 4).astype(np.int64)
    panel_day = np.bincount(slot, weights=load.mean_kw, minlength=96) / np.bincount(
        slot, minlength=96
    )
    h25_slot = np.arange(h25.shape[0]) % 96
    h25_day = np.bincount(h25_slot, weights=h25) / np.bincount(h25_slot)
    assert np.corrcoef(panel_day, h25_day)[0, 1] > 0.85
    month = (cal.day_of_year * 12 / 367).astype(np.int64)
    h25_month = (np.arange(h25.shape[0]) // 96 * 12 / 366).astype(np.int64)
    panel_year = np.bincount(month, weights=load.mean_kw) / np.bincount(month)
    h25_year = np.bincount(h25_month, weights=h25) / np.bincount(h25_month)
    assert np.corrcoef(panel_year, h25_year)[0, 1] > 0.9
