"""The baselines do what real unmanaged and rule-based charging do."""

from __future__ import annotations

import pytest

from controller.optimiser.baselines import (
    earliest_deadline_first,
    least_laxity_first,
    unmanaged,
)
from controller.planning.problem import PlanningProblem
from tests.optimiser.checks import assert_valid, problem


def _two_cars() -> PlanningProblem:
    """Head-room for one car a slot. A leaves after 2 slots needing one full slot (2.75 kWh);
    B leaves after 4 needing three full slots (8.25 kWh). Both have one slot of slack."""
    return problem(
        dt_h=[0.25] * 4,
        upper_kw=[[11] * 4, [11] * 4],
        departure_slot=[2, 4],
        energy_kwh=[0, 0],
        capacity_kwh=[60, 60],
        target_kwh=[2.75, 8.25],
        price=[0.1] * 4,
        headroom_kw=[11] * 4,
        min_kw=[4.14, 4.14],
    )


def test_unmanaged_charges_at_full_power_and_reports_the_overload() -> None:
    """Both cars at 11 kW at once, until full or gone: 22 kW against 11 kW of head-room."""
    p = _two_cars()
    s = unmanaged(p)
    assert s.strategy == "unmanaged"
    assert s.charge_kw[:, 0] == pytest.approx([11, 11])
    assert s.details["headroom_violation_kw"] == pytest.approx(11.0)
    assert s.details["overload_kwh"] == pytest.approx(11 * 0.25 * 2)
    to_target = unmanaged(p, stop_at_target=True)
    assert to_target.energy_kwh[:, -1] == pytest.approx([2.75, 8.25])


def test_edf_serves_the_car_that_leaves_first() -> None:
    """EDF gives slot 0 to A (it leaves first); B still fits in the three slots after."""
    p = _two_cars()
    s = earliest_deadline_first(p)
    assert_valid(p, s)
    assert s.strategy == "edf"
    assert s.charge_kw[:, 0] == pytest.approx([11, 0])
    assert s.shortfall_kwh == pytest.approx([0.0, 0.0])


def test_llf_serves_the_car_with_the_least_slack_first() -> None:
    """Equal slack: both served. When B needs all four of its slots (no slack), LLF serves B
    first where EDF serves A."""
    p = _two_cars()
    s = least_laxity_first(p)
    assert_valid(p, s)
    assert s.strategy == "llf"
    assert s.shortfall_kwh == pytest.approx([0.0, 0.0])
    tight = problem(
        dt_h=[0.25] * 4,
        upper_kw=[[11] * 4, [11] * 4],
        departure_slot=[2, 4],
        energy_kwh=[0, 0],
        capacity_kwh=[60, 60],
        target_kwh=[2.75, 11.0],
        price=[0.1] * 4,
        headroom_kw=[11] * 4,
    )
    s = least_laxity_first(tight)
    assert s.charge_kw[:, 0] == pytest.approx([0, 11])
    edf = earliest_deadline_first(tight)
    assert edf.charge_kw[:, 0] == pytest.approx([11, 0])


def test_rule_based_setpoints_are_never_below_the_charger_minimum() -> None:
    """7 kW of head-room and a 4.14 kW minimum: one car gets 7 kW, never 3.5 kW each."""
    p = problem(
        dt_h=[0.25] * 2,
        upper_kw=[[11] * 2, [11] * 2],
        energy_kwh=[0, 0],
        capacity_kwh=[60, 60],
        target_kwh=[5, 5],
        price=[0.1] * 2,
        headroom_kw=[7, 7],
        min_kw=[4.14, 4.14],
    )
    for rule in (earliest_deadline_first, least_laxity_first):
        s = rule(p)
        assert_valid(p, s)
        assert sorted(s.charge_kw[:, 0].tolist()) == pytest.approx([0.0, 7.0])
