"""Small fitted models for the evidence tests: a 150-household panel's GAMs, the shipped trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.datasets.chargers import build_charger_logs, load_connection_times
from adapters.datasets.fleet import load_seed_fleet
from adapters.datasets.panel import PanelSpec, build_panel, load_household_sources
from adapters.datasets.tables import load_day_ahead_prices, load_profile_table
from controller.forecast.household import (
    BaseLoadModel,
    GamSpec,
    correlate_groups,
    fit_household_model,
)
from controller.forecast.models import ForecastModels
from controller.forecast.prices import DayAheadPriceSource
from controller.forecast.trips import daily_energy, fit_trip_model, sessions_from_log

DATA = Path(__file__).resolve().parents[2] / "data"
ZONE = "Europe/Berlin"


@pytest.fixture(scope="session")
def evidence_models() -> ForecastModels:
    """GAMs of a small built panel (a short penalty search), shipped trip laws, NL prices."""
    sources = load_household_sources(DATA)
    panel = build_panel(sources, PanelSpec(households=150, seed=5))
    times = panel.loads["fixed"].times_s
    train = ((times - times[0]) // (7 * 86_400)) % 2 == 0  # every other week: a faster fit
    quick = GamSpec(max_penalty_evaluations=5)
    groups = tuple(
        fit_household_model(panel.loads[g], ZONE, train, quick) for g in ("fixed", "market")
    )
    corr = correlate_groups(groups, (panel.loads["fixed"], panel.loads["market"]), train)
    fleet = load_seed_fleet(DATA / "fleet" / "seed_fleet.csv")
    logs = build_charger_logs(
        load_profile_table(DATA / "chargers" / "simbench_chargers_2016.csv.gz"),
        load_connection_times(DATA / "elaad" / "distribution-of-connection-time.csv"),
        fleet,
    )
    sessions = [sessions_from_log(log) for log in logs]
    days = [
        daily_energy(s, log.model, log.consumption_kwh_per_km, ZONE)
        for s, log in zip(sessions, logs, strict=True)
    ]
    history = load_day_ahead_prices(DATA / "prices" / "nl_dayahead_2015_2024.csv.gz")
    return ForecastModels(
        base_load=BaseLoadModel(groups=groups, common_correlation=corr),
        trips=fit_trip_model(days, sessions, ZONE),
        prices=DayAheadPriceSource(history),
        households={"fixed": 1000, "market": 1000},
    )
