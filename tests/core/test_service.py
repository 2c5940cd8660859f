"""The service loop on a real Redis and a simulated clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pytest
from redis.asyncio import Redis

from adapters.redis_store import RedisFleetStore
from controller.clock import SimClock
from controller.errors import RefusalCode, Refused, StoreUnavailable
from controller.events import CapSite, ForceCharge, SiteLoadReported
from controller.planning.planner import StatePlanner
from controller.service import ControllerService
from controller.settings import Settings
from tests.conftest import T0
from tests.factories import (
    PlanRecorder,
    ResultRecorder,
    flat_headroom,
    flat_prices,
    next_id,
    small_site,
    soc_reported,
)

WINDOW = timedelta(seconds=0.2)


@dataclass
class Running:
    service: ControllerService
    plans: PlanRecorder
    results: ResultRecorder
    store: RedisFleetStore

    async def submit_all(self, events: list[object]) -> None:
        for event in events:
            await self.service.submit(event)  # type: ignore[arg-type]


@pytest.fixture
async def running(redis: Redis, clock: SimClock) -> AsyncIterator[Running]:
    store = RedisFleetStore(redis, "depot")
    plans, results = PlanRecorder(), ResultRecorder()
    service = ControllerService(
        store=store,
        clock=clock,
        planner=StatePlanner(),
        sink=plans,
        settings=Settings(site="depot", coalesce_window_s=WINDOW.total_seconds()),
        results=results,
    )
    task = asyncio.create_task(service.run())
    await service.settled()
    yield Running(service, plans, results, store)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _settle(running: Running, clock: SimClock) -> None:
    await running.service.applied()
    await clock.advance(WINDOW)
    await running.service.settled()


async def _next_plan(running: Running, made: int) -> None:
    """Wait (at most 30 s of wall) for the plan after the first `made`, and its settling.

    After `clock.advance` the planning task may not have woken yet (its previous plan's Redis
    writes can still be in flight), so `settled()` alone can return before the plan that the
    advance makes due has started."""
    published = len(running.plans.plans) - (running.service.plans_made - made)
    await asyncio.wait_for(running.plans.more_than(published), timeout=30.0)
    await running.service.settled()


async def test_a_burst_of_updates_is_planned_once(running: Running, clock: SimClock) -> None:
    """Events inside one coalescing window give one plan, which reflects the last of them."""
    await running.submit_all(small_site(clock.now(), cars=2))
    await _settle(running, clock)
    before = running.service.plans_made
    for soc in (0.40, 0.41, 0.42):
        await running.service.submit(soc_reported("ev-1", soc, clock.now()))
    await _settle(running, clock)
    assert running.service.plans_made == before + 1
    assert running.service.state.vehicles["ev-1"].soc == pytest.approx(0.42)


async def test_the_plan_keeps_the_chargers_within_head_room(
    running: Running, clock: SimClock
) -> None:
    """With 3 cars of 11 kW and 15 kW of head-room, no slot is planned above 15 kW."""
    now = clock.now()
    await running.submit_all(small_site(now, cars=3))
    await running.submit_all([flat_headroom(now, now, 15.0), flat_prices(now, now)])
    await _settle(running, clock)
    plan = running.plans.plans[-1]
    assert len(plan.setpoints) == 3
    site_kw = np.sum([s.kw for s in plan.setpoints], axis=0)
    assert site_kw.max() <= 15.0 + 1e-9
    assert site_kw[1] == pytest.approx(15.0)  # the cars need more than 15 kW: all of it is used


async def test_an_event_for_an_unknown_vehicle_is_refused_counted_and_the_loop_goes_on(
    running: Running, clock: SimClock
) -> None:
    """A refusal does not stop the consumer: the next valid event is applied."""
    await running.submit_all(small_site(clock.now(), cars=1))
    await running.service.submit(soc_reported("ev-404", 0.5, clock.now()))
    await running.service.submit(soc_reported("ev-1", 0.9, clock.now()))
    await _settle(running, clock)
    assert running.service.counters["events_refused"] == 1
    assert running.service.state.vehicles["ev-1"].soc == pytest.approx(0.9)
    rejected = await running.store.rejected()
    assert "no vehicle 'ev-404'" in rejected[0]["reason"]


async def test_an_event_from_the_future_is_refused_at_the_door(
    running: Running, clock: SimClock
) -> None:
    """A timestamp further ahead than clock skew explains never enters the log."""
    event = soc_reported("ev-1", 0.5, clock.now() + timedelta(hours=1))
    with pytest.raises(Refused) as refused:
        await running.service.submit(event)
    assert refused.value.code is RefusalCode.FROM_THE_FUTURE
    assert await running.store.redis.xlen("vp:{depot}:events") == 0


async def test_stale_telemetry_is_dropped_and_counted(running: Running, clock: SimClock) -> None:
    """An SoC older than the stored one does not overwrite it."""
    now = clock.now()
    await running.submit_all(small_site(now, cars=1))
    await running.service.submit(soc_reported("ev-1", 0.6, now))
    await running.service.submit(soc_reported("ev-1", 0.1, now - timedelta(minutes=5)))
    await _settle(running, clock)
    assert running.service.state.vehicles["ev-1"].soc == pytest.approx(0.6)
    assert running.service.counters["events_stale"] == 1


async def test_commands_get_a_result_accepted_or_refused_with_the_reason(
    running: Running, clock: SimClock
) -> None:
    """An accepted command says so; one naming an unknown car says which car."""
    now = clock.now()
    await running.submit_all(small_site(now, cars=1))
    good = ForceCharge(
        event_id="cmd-1", at=now, expires_at=now + timedelta(hours=1), vehicle_id="ev-1"
    )
    bad = ForceCharge(
        event_id="cmd-2", at=now, expires_at=now + timedelta(hours=1), vehicle_id="ev-9"
    )
    expired = CapSite(
        event_id="cmd-3",
        at=now - timedelta(hours=2),
        expires_at=now - timedelta(hours=1),
        limit_kw=5.0,
    )
    await running.service.submit(good)
    await running.service.submit(bad)
    with pytest.raises(Refused):
        await running.service.submit(expired)
    await _settle(running, clock)
    assert running.results.results["cmd-1"] == (True, "accepted")
    assert running.results.results["cmd-2"][0] is False
    assert "ev-9" in running.results.results["cmd-2"][1]
    assert running.results.results["cmd-3"][0] is False
    assert "expired" in running.results.results["cmd-3"][1]


async def test_a_site_cap_command_lowers_the_plan(running: Running, clock: SimClock) -> None:
    """Capping the site at 5 kW for an hour keeps the plan's next hour at or below 5 kW."""
    now = clock.now()
    await running.submit_all(small_site(now, cars=3))
    await running.submit_all([flat_headroom(now, now, 30.0)])
    await running.service.submit(
        CapSite(event_id=next_id("cap"), at=now, expires_at=now + timedelta(hours=1), limit_kw=5.0)
    )
    await _settle(running, clock)
    site_kw = np.sum([s.kw for s in running.plans.plans[-1].setpoints], axis=0)
    assert site_kw[:4].max() <= 5.0 + 1e-9
    assert site_kw[4] > 5.0  # after the hour the cap has expired


async def test_a_new_slot_is_planned_without_any_event(running: Running, clock: SimClock) -> None:
    """Time alone re-plans at each slot boundary: the new plan starts at the boundary."""
    before = running.service.plans_made
    await clock.advance(timedelta(minutes=15))
    await _next_plan(running, before)
    assert running.service.plans_made == before + 1
    assert running.plans.plans[-1].made_at == T0 + timedelta(minutes=15)


async def test_a_site_meter_falling_silent_replans_on_the_safe_limit_without_an_event(
    running: Running, clock: SimClock
) -> None:
    """P-03. The meter says the households draw 20 kW of 100 kW: the current slot may use 80
    kW, and 3 cars of 11 kW take 33. Nothing more arrives; 61 s later, with no event, the
    service re-plans and the first slot is held to the safe limit (20 kW)."""
    now = clock.now()
    await running.submit_all(small_site(now, cars=3))
    meter = SiteLoadReported(event_id=next_id("load"), at=now, load_kw=20.0)
    await running.submit_all([flat_headroom(now, now, 90.0), flat_prices(now, now), meter])
    await _settle(running, clock)
    first = running.plans.plans[-1]
    assert sum(s.kw[0] for s in first.setpoints) == pytest.approx(33.0)
    made = running.service.plans_made
    await clock.advance(timedelta(seconds=61))
    await _next_plan(running, made)
    assert running.service.plans_made == made + 1
    after = running.plans.plans[-1]
    assert sum(s.kw[0] for s in after.setpoints) <= 20.0 + 1e-9


async def test_applied_events_are_counted_in_redis_once_per_batch_not_once_per_event(
    redis: Redis, clock: SimClock
) -> None:
    """60 events waiting in the log are applied in one batch: the stored `events_applied`
    counter ends equal to the service's own count (and to the events), written with a handful
    of HINCRBY (the server's own command statistics), not one round trip per event."""
    store = RedisFleetStore(redis, "depot")
    events = [*small_site(clock.now(), cars=2)]
    events += [soc_reported("ev-1", 0.3 + i / 1000, clock.now()) for i in range(60 - len(events))]
    for event in events:
        await store.append(event)  # type: ignore[arg-type]
    stats = await redis.info("commandstats")
    before = int(stats.get("cmdstat_hincrby", {}).get("calls", 0))
    service = ControllerService(
        store=store,
        clock=clock,
        planner=StatePlanner(),
        sink=PlanRecorder(),
        settings=Settings(site="depot", coalesce_window_s=WINDOW.total_seconds()),
    )
    task = asyncio.create_task(service.run())
    try:
        await service.settled()
        stats = await redis.info("commandstats")
        hincrby = int(stats["cmdstat_hincrby"]["calls"]) - before
        stored = await store.counters()
        assert service.counters["events_applied"] == len(events) == 60
        assert stored["events_applied"] == len(events)
        # events_applied once for the batch, plans once per plan: far below one per event.
        assert hincrby <= 1 + service.plans_made
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_an_outage_seen_by_an_append_ends_before_the_log_drains(
    redis: Redis, clock: SimClock
) -> None:
    """An append refused (the outage begins: decreases only) while the consumer's own commands
    go through: the service reconciles at the consumer's next batch, while 2,000 events still
    wait in the log, not once the log has drained (under a steady load that was minutes of
    decreases-only plans after the store was back)."""
    store = RedisFleetStore(redis, "depot")
    events = [*small_site(clock.now(), cars=2)]
    events += [soc_reported("ev-1", 0.3 + i / 10**5, clock.now()) for i in range(2000)]
    for event in events:
        await store.append(event)  # type: ignore[arg-type]
    service = ControllerService(
        store=store,
        clock=clock,
        planner=StatePlanner(),
        sink=PlanRecorder(),
        settings=Settings(site="depot", coalesce_window_s=WINDOW.total_seconds()),
    )
    task = asyncio.create_task(service.run())
    try:
        await service.counted("events_applied", 1)
        # What `submit` does when Redis refuses an append.
        service._store_failed(StoreUnavailable("append refused"), "appending an event")
        assert service.store_down_since is not None
        await service.counted("store_recoveries", 1)
        assert service.store_down_since is None
        assert service.counters["events_applied"] < len(events) // 2
        await service.settled()
        assert service.counters["events_applied"] == len(events)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
