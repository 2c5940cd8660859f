"""A week of the study for a small fleet: constraints, managed <= baselines, totals = per car."""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from controller.forecast.models import ForecastModels
from controller.planning.problem import PlanningProblem, Schedule
from simulators.dayinputs import DayFactory, FleetDay, SiteSpec, seed_fleet
from simulators.study import (
    STRATEGIES,
    CostBasis,
    DayResult,
    SolvePolicy,
    StudyOptions,
    run_study,
    scaled_site,
    sensitivity,
    strategy_table,
    write_report,
)
from tests.evidence.conftest import DATA

TOL_KW = 1e-6
TOL_KWH = 1e-5
TOL_EUR = 1e-6
CARS = 30


def check_schedule(name: str, p: PlanningProblem, s: Schedule) -> None:
    """The schedule's powers, energies and site total obey the problem (numpy, independent)."""
    assert s.charge_kw.shape == p.upper_kw.shape, name
    assert np.all(s.charge_kw >= -TOL_KW), name
    assert np.all(s.charge_kw <= p.upper_kw + TOL_KW), f"{name}: above the charger or unplugged"
    assert np.all(s.discharge_kw >= -TOL_KW), name
    allowed = np.where(p.v2g[:, None] & (p.upper_kw > 0), p.max_discharge_kw[:, None], 0.0)
    assert np.all(s.discharge_kw <= allowed + TOL_KW), f"{name}: discharges where it may not"
    delta = (p.eta_ch[:, None] * s.charge_kw - s.discharge_kw / p.eta_dis[:, None]) * p.dt_h
    energy = np.concatenate([p.energy_kwh[:, None], p.energy_kwh[:, None] + delta.cumsum(1)], 1)
    assert np.allclose(energy, s.energy_kwh, atol=1e-6), f"{name}: energy balance broken"
    assert np.all(energy <= p.capacity_kwh[:, None] + TOL_KWH), f"{name}: above capacity"
    assert np.all(energy >= -TOL_KWH), f"{name}: below empty"
    if p.v2g.any():
        floor = np.minimum(p.floor_kwh, p.energy_kwh)[:, None]
        assert np.all(energy[p.v2g] >= floor[p.v2g] - TOL_KWH), f"{name}: below the V2G floor"
    if name not in ("unmanaged", "unmanaged_full"):  # the baseline that ignores h_t
        site = s.charge_kw.sum(0) - s.discharge_kw.sum(0)
        assert np.all(site <= p.headroom_kw + 1e-4), f"{name}: above the head-room it was told"


@pytest.fixture(scope="module")
def week(evidence_models: ForecastModels) -> tuple[list[DayResult], list[str]]:
    """Seven consecutive days of March 2024, every schedule checked as it is made."""
    checked: list[str] = []

    def check(day: FleetDay, plans: dict[str, tuple[PlanningProblem, Schedule]]) -> None:
        for name, (problem, schedule) in plans.items():
            check_schedule(name, problem, schedule)
        checked.append(day.day.isoformat())

    results = run_study(evidence_models, seed_fleet(DATA, CARS, 1000.0), WEEK_OPTIONS, check=check)
    return results, checked


# A tight site so that the head-room binds in the evening and the rules matter.
WEEK_OPTIONS = StudyOptions(
    cars=CARS,
    year=2024,
    site=SiteSpec(capacity_kw=760.0),
    v2g_share=0.5,
    dates=tuple(date(2024, 3, 4 + k) for k in range(7)),
)


def test_days_planned_in_worker_processes_equal_the_days_planned_here(
    evidence_models: ForecastModels, week: tuple[list[DayResult], list[str]]
) -> None:
    """Two days of the week in two spawned processes: same inputs, same costs and peaks."""
    options = dataclasses.replace(WEEK_OPTIONS, dates=WEEK_OPTIONS.dates[:2], workers=2)
    ticks: list[int] = []
    parallel = run_study(
        evidence_models,
        seed_fleet(DATA, CARS, 1000.0),
        options,
        progress=lambda k, n, r: ticks.append(k),
    )
    assert ticks == [1, 2]
    for here, there in zip(week[0][:2], parallel, strict=True):
        assert here.day == there.day
        assert here.need_kwh == pytest.approx(there.need_kwh, abs=1e-9)
        assert here.price_spread_eur_per_kwh == there.price_spread_eur_per_kwh
        for name, outcome in here.outcomes.items():
            other = there.outcomes[name]
            for basis in ("spot", "allin"):  # optima are unique in value, not in schedule
                assert other.cost_eur[basis] == pytest.approx(outcome.cost_eur[basis], abs=1e-4)
            assert other.shortfall_kwh == pytest.approx(outcome.shortfall_kwh, abs=1e-4)
            if name in ("unmanaged", "unmanaged_full", "edf", "llf"):  # deterministic rules
                assert other.peak_kw == outcome.peak_kw


def test_every_schedule_of_every_day_respects_the_constraints(
    week: tuple[list[DayResult], list[str]],
) -> None:
    """The check ran on all seven days, for every strategy."""
    results, checked = week
    assert len(checked) == 7 == len(results)
    assert all(set(STRATEGIES) <= set(r.outcomes) for r in results)


def test_managed_costs_no_more_than_any_baseline_when_it_delivers_no_less(
    week: tuple[list[DayResult], list[str]],
) -> None:
    """Day by day: managed shortfall <= each baseline's, and then its spot cost <= theirs."""
    for r in week[0]:
        managed = r.outcomes["managed"]
        for name in ("unmanaged", "edf", "llf"):
            other = r.outcomes[name]
            if name != "unmanaged":  # unmanaged may break the head-room to deliver more
                assert managed.shortfall_kwh <= other.shortfall_kwh + 1e-4, (r.day, name)
            if managed.shortfall_kwh <= other.shortfall_kwh + 1e-6:
                assert managed.cost_eur["spot"] <= other.cost_eur["spot"] + TOL_EUR, (r.day, name)
                assert managed.cost_eur["allin"] <= other.cost_eur["allin"] + TOL_EUR, (r.day, name)
        for basis in ("spot", "allin"):
            # V2G may deliver more (discharging frees head-room): compare cost at equal delivery.
            v2g = r.outcome("managed_v2g", basis)
            assert v2g.shortfall_kwh <= managed.shortfall_kwh + 1e-4, (r.day, basis)
            if v2g.shortfall_kwh >= managed.shortfall_kwh - 1e-6:
                assert v2g.cost_eur[basis] <= managed.cost_eur[basis] + TOL_EUR, (r.day, basis)


def test_the_report_totals_are_the_sums_of_the_per_car_figures(
    week: tuple[list[DayResult], list[str]], tmp_path: Path
) -> None:
    """study.json's totals: shortfall = sum over days and cars; import = energy gained / eta."""
    results = week[0]
    options = StudyOptions(cars=CARS, days=7, basis=CostBasis())
    write_report(tmp_path, results, options, [], wall_s=1.0, sens_days=0)
    assert (tmp_path / "report.md").is_file()
    for png in ("study_daily_cost.png", "study_saving_vs_spread.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((tmp_path / "study.json").read_text())
    for basis in ("spot", "allin"):
        rows = {row["strategy"]: row for row in written["tables"][basis]}
        assert rows == {
            row["strategy"]: row for row in json.loads(json.dumps(strategy_table(results, basis)))
        }
        for name in ("unmanaged", "edf", "llf", "managed"):
            per_car_short = sum(
                float(r.outcomes[name].shortfall_per_car_kwh.sum()) for r in results
            )
            per_car_gain = sum(float(r.outcomes[name].delivered_kwh.sum()) for r in results)
            assert rows[name]["shortfall_kwh"] == pytest.approx(per_car_short, abs=1e-6)
            assert rows[name]["import_kwh"] * 0.92 == pytest.approx(per_car_gain, rel=1e-9)
            assert rows[name]["cost_eur"] == pytest.approx(
                sum(r.outcomes[name].cost_eur[basis] for r in results), abs=1e-9
            )


def test_a_scaled_site_scales_the_head_room_with_the_fleet(evidence_models: ForecastModels) -> None:
    """`scaled_site` multiplies the connection and the households, so the chargers' assured
    head-room grows with them (the households' noise grows more slowly than their mean)."""
    base = SiteSpec(capacity_kw=760.0)
    big = scaled_site(base, 3.0)
    assert big.capacity_kw == pytest.approx(3 * base.capacity_kw)
    assert big.household_counts == {g: 3 * n for g, n in base.household_counts.items()}
    vehicles = seed_fleet(DATA, CARS, 1000.0)
    day = date(2024, 3, 5)
    small = DayFactory(evidence_models, vehicles, base, first_day=day, days=3).day(day)
    large = DayFactory(evidence_models, vehicles, big, first_day=day, days=3).day(day)
    ratio = large.headroom_forecast_kw.mean() / small.headroom_forecast_kw.mean()
    assert 2.8 < ratio < 3.3
    with pytest.raises(ValueError, match="positive"):
        scaled_site(base, 0.0)


def test_sensitivity_rows_for_big_fleets_say_how_they_were_solved(
    evidence_models: ForecastModels,
) -> None:
    """Fleet-size rows on the base site and on a scaled site: above `fair_share_until` the
    fairness stage is off and the row says so, and the scaled row names its connection."""
    rows = sensitivity(
        evidence_models,
        lambda n: seed_fleet(DATA, n, 1000.0),
        dataclasses.replace(WEEK_OPTIONS, v2g_share=0.0, workers=1, dates=(date(2024, 3, 5),)),
        days=1,
        fleet_sizes=(12,),
        scaled_fleet_sizes=(24,),
        quantiles=(),
        years=(),
        v2g_shares=(),
        big_fleet_from=10,
        fair_share_until=20,
    )
    assert [(r.factor, r.cars, r.days) for r in rows] == [
        ("fleet size (cars)", 12, 1),
        ("fleet size, site scaled (cars)", 24, 1),
    ]
    assert "not shared fairly" not in rows[0].note
    assert "connection" not in rows[0].note
    assert "not shared fairly" in rows[1].note
    assert f"connection {760.0 * 24 / CARS:,.0f} kW" in rows[1].note
    assert SolvePolicy(fairness=False).options(v2g=False).fairness is False
    assert SolvePolicy().options(v2g=True).fairness is True
