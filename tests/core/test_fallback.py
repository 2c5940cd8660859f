"""P-09: an optimiser that raises or overruns never blocks dispatch, and the fallback is safe.

The fallback is `share_by_need`: head-room shared in proportion to what each car still needs,
within head-room by construction. A property test checks that construction on random fleets
with plain numpy; service tests check that a failing or hanging planner gives a fallback plan
(counted, flagged, within head-room) and that the next good plan replaces it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from redis.asyncio import Redis

from adapters.redis_store import RedisFleetStore
from controller.clock import SimClock
from controller.planning.plan import Plan
from controller.planning.planner import StatePlanner
from controller.planning.problem import FloatArray, PlanningProblem
from controller.planning.share import share_by_need
from controller.service import ControllerService
from controller.settings import Settings
from controller.state import FleetState
from tests.factories import PlanRecorder, flat_headroom, flat_prices, small_site, soc_reported
from tests.optimiser.checks import TOL, energy, violations
from tests.optimiser.test_properties import problems

EXAMPLES = 1_000
SAFE_BY_CONSTRUCTION = (
    "negative",
    "charge_above_bound",
    "charge_when_gone",
    "discharge_not_allowed",
    "site_above_headroom",
    "energy_above_capacity",
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(problems())
def test_the_fallback_keeps_every_slot_within_headroom_on_random_fleets(
    problem: PlanningProblem,
) -> None:
    """Whatever the fleet (too little or negative head-room, forced slots, V2G cars), the
    share never exceeds h_t, a bound or a battery, never discharges, and reports each car's
    shortfall as plain numpy computes it from the schedule."""
    schedule = share_by_need(problem)
    found = violations(problem, schedule, min_rate=False)
    assert {name: found[name] for name in SAFE_BY_CONSTRUCTION if found[name] > TOL} == {}
    assert float(schedule.discharge_kw.max(initial=0.0)) == 0.0
    content = energy(problem, schedule)
    at_departure = content[np.arange(problem.n_vehicles), problem.departure_slot]
    missing = np.maximum(problem.target_kwh - at_departure, 0.0)
    assert schedule.shortfall_kwh == pytest.approx(missing, abs=1e-6)


class _Failing:
    """A planner that raises on its first `fail` calls, then plans as the service's own."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls = 0
        self.inner = StatePlanner()

    def __call__(self, state: FleetState, now: datetime) -> Plan:
        self.calls += 1
        if self.calls <= self.fail:
            raise RuntimeError("solver crashed")
        return self.inner(state, now)


class _Hanging:
    """A planner that blocks (a solver past its budget) until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, state: FleetState, now: datetime) -> Plan:
        self.release.wait(timeout=30.0)
        raise RuntimeError("released")


async def _service(
    redis: Redis, clock: SimClock, planner: object, plan_timeout_s: float = 30.0
) -> AsyncIterator[tuple[ControllerService, PlanRecorder]]:
    plans = PlanRecorder()
    service = ControllerService(
        store=RedisFleetStore(redis, "depot"),
        clock=clock,
        planner=planner,  # type: ignore[arg-type]
        sink=plans,
        settings=Settings(site="depot", coalesce_window_s=0.2),
        plan_timeout_s=plan_timeout_s,
    )
    task = asyncio.create_task(service.run())
    try:
        yield service, plans
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _load_depot(service: ControllerService, clock: SimClock, headroom_kw: float) -> None:
    now = clock.now()
    for event in [*small_site(now, cars=3), flat_headroom(now, now, headroom_kw)]:
        await service.submit(event)  # type: ignore[arg-type]
    await service.submit(flat_prices(now, now))
    await service.applied()


def _site_kw(plan: Plan) -> FloatArray:
    site: FloatArray = np.sum([s.kw for s in plan.setpoints], axis=0)
    return site


async def test_a_planner_that_raises_gives_a_counted_fallback_within_headroom(
    redis: Redis, clock: SimClock
) -> None:
    """The solver crashes on the first plans: each gets the proportional share, flagged and
    counted, within the 15 kW of head-room; once the solver works again its plan replaces it."""
    planner = _Failing(fail=2)
    async for service, plans in _service(redis, clock, planner):
        await service.settled()
        await _load_depot(service, clock, 15.0)
        await clock.advance(timedelta(seconds=0.2))
        await service.settled()
        failed = [p for p in plans.plans if p.fallback]
        assert len(failed) == 2
        assert service.counters["plans_failed"] == 2
        assert "solver crashed" in failed[-1].note
        assert all(_site_kw(p).max(initial=0.0) <= 15.0 + 1e-9 for p in failed if p.setpoints)
        assert any(p.setpoints for p in failed)
        await clock.advance(timedelta(minutes=1))
        await service.submit(soc_reported("ev-1", 0.35, clock.now()))
        await service.applied()
        await clock.advance(timedelta(seconds=0.2))
        await service.settled()
        assert not plans.plans[-1].fallback
        assert service.counters["plans_failed"] == 2


async def test_a_planner_past_its_budget_does_not_hold_up_dispatch(
    redis: Redis, clock: SimClock
) -> None:
    """A solver that hangs is abandoned after `plan_timeout_s`: the proportional share goes
    out instead (counted), within head-room."""
    planner = _Hanging()
    try:
        async for service, plans in _service(redis, clock, planner, plan_timeout_s=0.2):
            await service.settled()
            await _load_depot(service, clock, 15.0)
            await clock.advance(timedelta(seconds=0.2))
            await service.settled()
            assert service.counters["plans_failed"] >= 1
            last = plans.plans[-1]
            assert last.fallback
            assert "TimeoutError" in last.note
            assert len(last.setpoints) == 3
            assert _site_kw(last).max() <= 15.0 + 1e-9
    finally:
        planner.release.set()
