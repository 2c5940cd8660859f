"""Session fixtures: the shipped real data, a built panel on it and the GAMs fitted once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.datasets.chargers import build_charger_logs, load_connection_times
from adapters.datasets.fleet import load_seed_fleet
from adapters.datasets.panel import (
    BuiltPanel,
    HouseholdSources,
    PanelSpec,
    build_panel,
    load_household_sources,
)
from adapters.datasets.tables import load_profile_table
from controller.forecast.calendar import BoolArray
from controller.forecast.evaluation import Score, evaluate_holdout, holdout_weeks
from controller.forecast.household import (
    BaseLoadModel,
    HouseholdModel,
    correlate_groups,
    fit_household_model,
)
from controller.forecast.trips import TripModel, daily_energy, fit_trip_model, sessions_from_log

DATA = Path(__file__).resolve().parents[2] / "data"
ZONE = "Europe/Berlin"

# A full profile year (so every season is in training and hold-out) but a few hundred
# households: the build takes a second, the two GAM fits most of this suite's time.
TEST_PANEL = PanelSpec(households=400, seed=11)


@dataclass(frozen=True)
class FittedPanel:
    """The built panel, its held-out weeks, the fitted groups and their held-out scores."""

    panel: BuiltPanel
    held_out: BoolArray
    models: dict[str, HouseholdModel]
    scores: dict[str, tuple[Score, Score]]
    base: BaseLoadModel


@pytest.fixture(scope="session")
def household_sources() -> HouseholdSources:
    """The shipped SimBench, UCI and price extracts."""
    return load_household_sources(DATA)


@pytest.fixture(scope="session")
def fitted_panel(household_sources: HouseholdSources) -> FittedPanel:
    """Both tariff groups of the test panel fitted on all but every fifth week."""
    panel = build_panel(household_sources, TEST_PANEL)
    held = holdout_weeks(panel.loads["fixed"].times_s)
    models: dict[str, HouseholdModel] = {
        g: fit_household_model(panel.loads[g], ZONE, ~held) for g in ("fixed", "market")
    }
    scores = {g: evaluate_holdout(models[g], panel.loads[g], held) for g in ("fixed", "market")}
    ordered = (models["fixed"], models["market"])
    corr = correlate_groups(ordered, (panel.loads["fixed"], panel.loads["market"]), ~held)
    return FittedPanel(
        panel=panel,
        held_out=held,
        models=models,
        scores=scores,
        base=BaseLoadModel(groups=ordered, common_correlation=corr),
    )


@pytest.fixture(scope="session")
def shipped_trip_model() -> TripModel:
    """Laws fitted on the ten cars built from the shipped SimBench and ElaadNL data."""
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
    return fit_trip_model(days, sessions, ZONE)
