"""Fixtures for the OCPP tests: a real central system on 127.0.0.1 port 0, real Redis, a
recorder as the event sink, simulated time. Every `recv()` is bounded by `RECV_TIMEOUT_S`."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from adapters.ocpp.aio import stop_task
from adapters.ocpp.central import CentralSystem
from adapters.ocpp.config import OcppConfig
from controller.clock import SimClock
from controller.domain import SLOT, ChargePoint, Connector, Site, Vehicle, slot_floor
from controller.errors import Refused
from controller.events import Event
from controller.planning.plan import Plan, Setpoint
from controller.planning.problem import Schedule
from controller.state import FleetState, apply_event

RECV_TIMEOUT_S = 5.0
SITE = "depot"
BOOT = {"chargePointVendor": "acme", "chargePointModel": "wallbox"}


def frame(unique_id: str, action: str, payload: dict[str, Any]) -> str:
    """A CALL frame as text."""
    return json.dumps([2, unique_id, action, payload])


async def recv(ws: ClientConnection) -> Any:
    """The next frame, parsed; fails the test after `RECV_TIMEOUT_S`."""
    return json.loads(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))


async def ask(ws: ClientConnection, text: str) -> Any:
    """Send a frame and return the next frame received."""
    await ws.send(text)
    return await recv(ws)


class Recorder:
    """The event sink of these tests: keeps every event and applies each new event id to a
    `FleetState` with the real reducer (refusals are kept with their reason)."""

    def __init__(self, state: FleetState) -> None:
        self.state = state
        self.events: list[Event] = []
        self.refused: list[tuple[Event, str]] = []
        self.fail_with: Exception | None = None
        self._seen: set[str] = set()
        self._changed = asyncio.Condition()

    async def submit(self, event: Event) -> None:
        """Record (and apply) an event."""
        if self.fail_with is not None:
            raise self.fail_with
        self.events.append(event)
        if event.event_id not in self._seen:
            self._seen.add(event.event_id)
            try:
                self.state = apply_event(self.state, event).state
            except Refused as refusal:
                self.refused.append((event, refusal.reason))
        async with self._changed:
            self._changed.notify_all()

    def of(self, kind: str) -> list[Any]:
        """The recorded events of one kind, in order."""
        return [e for e in self.events if e.kind == kind]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Until `predicate()` holds; fails after `timeout_s`."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)


def charger(
    charger_id: str,
    *,
    max_power_kw: float = 22.0,
    rate_unit: str = "W",
    phases: int = 3,
    connectors: int = 1,
    v2g_mode: str = "none",
) -> ChargePoint:
    """A charge point record for the fleet state."""
    return ChargePoint(
        charger_id=charger_id,
        max_power_kw=max_power_kw,
        rate_unit=rate_unit,  # type: ignore[arg-type]
        phases=phases,
        v2g_mode=v2g_mode,  # type: ignore[arg-type]
        connectors=tuple(
            Connector(connector_id=i, max_power_kw=max_power_kw) for i in range(1, connectors + 1)
        ),
    )


def fleet(
    chargers: Sequence[ChargePoint], *, safe_limit_kw: float = 0.0, vehicles: Sequence[Vehicle] = ()
) -> FleetState:
    """A fleet state with a site, these chargers and vehicles."""
    return FleetState(
        site=Site(site_id=SITE, capacity_kw=10_000.0, safe_limit_kw=safe_limit_kw),
        chargers={c.charger_id: c for c in chargers},
        vehicles={v.vehicle_id: v for v in vehicles},
    )


@dataclass
class Harness:
    """A running central system and what the tests need around it."""

    central: CentralSystem
    recorder: Recorder
    clock: SimClock
    redis: Redis
    password: str
    tags: dict[str, str] = field(default_factory=dict)

    def auth(self, user: str, password: str | None = None) -> dict[str, str]:
        """A Basic Authorization header."""
        token = base64.b64encode(f"{user}:{password or self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    @asynccontextmanager
    async def connect(
        self,
        charger_id: str,
        *,
        headers: dict[str, str] | None = None,
        subprotocols: Sequence[str] | None = ("ocpp1.6",),
        boot: bool = True,
    ) -> AsyncIterator[ClientConnection]:
        """A raw WebSocket to the central system as `charger_id` (booted unless told not to)."""
        async with connect(
            self.central.url(charger_id),
            subprotocols=list(subprotocols) if subprotocols else None,  # type: ignore[arg-type]
            additional_headers=headers if headers is not None else self.auth(charger_id),
            open_timeout=RECV_TIMEOUT_S,
        ) as ws:
            if boot:
                answer = await ask(ws, frame("boot-1", "BootNotification", BOOT))
                assert answer[2]["status"] == "Accepted"
            yield ws


@asynccontextmanager
async def running_central(
    redis: Redis,
    clock: SimClock,
    state: FleetState,
    *,
    config: OcppConfig | None = None,
    tags: dict[str, str] | None = None,
    passwords: bool = True,
) -> AsyncIterator[Harness]:
    """A central system for `state`'s chargers, each with the same test password."""
    recorder = Recorder(state)
    tags = tags or {}
    central = CentralSystem(
        redis=redis,
        site=SITE,
        sink=recorder,
        clock=clock,
        config=config or OcppConfig(bcrypt_rounds=4, call_timeout_s=5.0),
        chargers=lambda cid: recorder.state.chargers.get(cid),
        vehicle_for_tag=tags.get,
    )
    password = secrets.token_hex(16)
    if passwords:
        for charger_id in state.chargers:
            await central.credentials.set_password(charger_id, password)
    await central.start()
    try:
        yield Harness(central, recorder, clock, redis, password, tags)
    finally:
        await central.stop()


@pytest.fixture
async def harness(redis: Redis, clock: SimClock) -> AsyncIterator[Harness]:
    """A central system with chargers CP-1..CP-3 (22 kW, W, one connector) and vehicle ev-1
    (idTag TAG-1)."""
    vehicle = Vehicle(vehicle_id="ev-1", model="leaf", capacity_kwh=40.0, energy_kwh=10.0)
    state = fleet([charger(f"CP-{i}") for i in (1, 2, 3)], vehicles=[vehicle])
    async with running_central(redis, clock, state, tags={"TAG-1": "ev-1"}) as h:
        yield h


def absolute_profile(
    profile_id: int,
    purpose: str,
    periods: Sequence[tuple[int, float]],
    *,
    start: str = "2024-03-04T16:00:00Z",
    unit: str = "W",
    stack: int = 0,
    duration_s: int | None = None,
    transaction_id: int | None = None,
) -> dict[str, Any]:
    """A `csChargingProfiles` object of kind Absolute."""
    schedule: dict[str, Any] = {
        "startSchedule": start,
        "chargingRateUnit": unit,
        "chargingSchedulePeriod": [{"startPeriod": s, "limit": lim} for s, lim in periods],
    }
    if duration_s is not None:
        schedule["duration"] = duration_s
    profile: dict[str, Any] = {
        "chargingProfileId": profile_id,
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Absolute",
        "chargingSchedule": schedule,
    }
    if transaction_id is not None:
        profile["transactionId"] = transaction_id
    return profile


@asynccontextmanager
async def simulated(
    harness: Harness,
    charger_id: str,
    *,
    faults: Any = None,
    **spec: Any,
) -> AsyncIterator[Any]:
    """A simulated charger connected (and booted) to the harness's central system."""
    from simulators.chargepoints.chargepoint import ChargerSpec, SimChargePoint

    sim = SimChargePoint(ChargerSpec(charger_id=charger_id, **spec), harness.clock, faults=faults)
    async with connected(harness, sim):
        yield sim


@asynccontextmanager
async def connected(harness: Harness, sim: Any) -> AsyncIterator[Any]:
    """`sim` (a simulated charger of any kind) connected and booted to the harness's central
    system, stopped at the end."""
    task = asyncio.ensure_future(sim.run(harness.central.url(), harness.password))
    try:
        await asyncio.wait_for(sim.wait_online(), RECV_TIMEOUT_S)
        yield sim
    finally:
        await stop_task(task)


def plan_for(
    now: datetime,
    setpoints: Mapping[tuple[str, int], Sequence[float]],
    *,
    slots: int = 8,
    headroom_kw: float = 0.0,
) -> Plan:
    """A plan made at `now` with these per-connector setpoints (kW per slot), made under a
    head-room of `headroom_kw` in every slot (0 by default: nothing fits the dispatcher's
    budget, so increases wait for every decrease, as before it had one)."""
    starts = tuple([now] + [slot_floor(now) + SLOT * k for k in range(1, slots)])
    dt_h = np.full(slots, 0.25)
    empty = np.zeros((0, slots))
    schedule = Schedule(
        strategy="test",
        start=now,
        dt_h=dt_h,
        vehicle_ids=(),
        charge_kw=empty,
        discharge_kw=empty,
        energy_kwh=np.zeros((0, slots + 1)),
        shortfall_kwh=np.zeros(0),
        shortfall_reason=(),
        energy_cost_eur=0.0,
    )
    return Plan(
        made_at=now,
        schedule=schedule,
        setpoints=tuple(
            Setpoint(
                charger_id=cid,
                connector_id=connector,
                vehicle_id=f"{cid}-ev",
                kw=tuple(float(x) for x in (list(kw) + [kw[-1]] * slots)[:slots]),
            )
            for (cid, connector), kw in setpoints.items()
        ),
        slot_starts=starts,
        headroom_kw=(headroom_kw,) * slots,
        price_eur_per_kwh=(0.0,) * slots,
    )
