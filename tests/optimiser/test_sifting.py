"""Sifting (HiGHS on a working set of the charge columns) gives the full model's optimum."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings

from controller.optimiser import FastSolver, OptimiserOptions
from controller.optimiser.instances import DayShape, parse_fleet_table, seed_fleet_day
from controller.planning.problem import PlanningProblem, Schedule
from tests.optimiser.checks import assert_valid, close
from tests.optimiser.test_properties import problems

FLEET = parse_fleet_table(
    (Path(__file__).resolve().parents[2] / "data" / "fleet" / "seed_fleet.csv").read_text()
)
SIFTED = OptimiserOptions(time_limit_s=60.0, sifting_min_columns=0)
WHOLE = OptimiserOptions(time_limit_s=60.0, sifting_min_columns=10**9)
STAGES = ("stage_shortfall_kwh", "stage_cost_eur")
# Stages that sit on an earlier stage's slack (1e-7 of its optimum) may differ by about that.
SLACK_STAGES = ("stage_max_relative_shortfall", "stage_peak_kw", "stage_ramp_kw")


def _same_optimum(sifted: Schedule, whole: Schedule) -> None:
    assert sifted.status == whole.status
    for stage in STAGES:
        assert close(sifted.details[stage], whole.details[stage], rel=1e-9), stage
    for stage in SLACK_STAGES:
        assert close(sifted.details[stage], whole.details[stage], rel=1e-5), stage


def _events(day: PlanningProblem) -> list[PlanningProblem]:
    """A day's re-plans: SoC reports, a price update, a squeezed site, a changed departure."""
    out = [day]
    for i in (3, 17, 40):
        energy = day.energy_kwh.copy()
        energy[i] = min(energy[i] + 4.0, day.capacity_kwh[i])
        out.append(dataclasses.replace(day, energy_kwh=energy))
    prices = np.round(day.price_eur_per_kwh * (1.0 + 0.03 * np.sin(np.arange(day.n_slots))), 5)
    out.append(dataclasses.replace(day, price_eur_per_kwh=prices))
    out.append(day)
    squeezed = dataclasses.replace(day, headroom_kw=day.headroom_kw * 0.4)  # targets turn soft
    target = squeezed.target_kwh.copy()
    target[5] = squeezed.capacity_kwh[5]
    out += [squeezed, dataclasses.replace(squeezed, target_kwh=target), day]
    departure = day.departure_slot.copy()
    departure[8] = max(1, departure[8] - 12)  # a new layout: the old basis is carried over
    out.append(dataclasses.replace(day, departure_slot=departure))
    return out


def test_a_day_of_re_plans_has_the_full_models_optimum_with_a_small_working_set() -> None:
    """Same verdict and stage optima as HiGHS on the whole model, every plan valid, and after
    the first solve only a part of the charge columns is loaded."""
    day = seed_fleet_day(FLEET, np.random.default_rng(3), DayShape(vehicles=120))
    sifted, whole = FastSolver(), FastSolver()
    charge_columns = int((np.arange(day.n_slots)[None, :] < day.departure_slot[:, None]).sum())
    working = []
    for p in _events(day):
        a, b = sifted.solve(p, SIFTED), whole.solve(p, WHOLE)
        _same_optimum(a, b)
        assert_valid(p, a)
        assert "sifting_working_columns" in a.details
        assert "sifting_working_columns" not in b.details
        working.append(a.details["sifting_working_columns"])
    assert min(working[1:4]) < 0.5 * charge_columns  # re-plans after SoC reports
    assert max(working) <= charge_columns


SOLVERS = (FastSolver(), FastSolver())  # kept across examples: warm starts, remapped bases


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(p=problems())
def test_random_fleets_have_the_same_optimum_sifted_or_whole(p: PlanningProblem) -> None:
    """The property test's fleets (V2G, forced slots, impossible targets, negative prices)."""
    sifted, whole = SOLVERS[0].solve(p, SIFTED), SOLVERS[1].solve(p, WHOLE)
    _same_optimum(sifted, whole)
    assert_valid(p, sifted, min_rate=False)
