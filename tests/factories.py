"""Small builders of events and records for tests (real domain objects, no test doubles)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime, timedelta

from controller.domain import ChargePoint, Connector, Site, Vehicle
from controller.events import (
    ChargerRegistered,
    HeadroomUpdated,
    PriceUpdated,
    SiteConfigured,
    SocReported,
    VehiclePluggedIn,
    VehicleRegistered,
)
from controller.planning.plan import Plan
from controller.service import ControllerService
from controller.state import FleetState

_ids = itertools.count(1)


def next_id(prefix: str = "e") -> str:
    """A unique event id."""
    return f"{prefix}-{next(_ids)}"


def site_configured(
    at: datetime, capacity_kw: float = 100.0, site_id: str = "depot"
) -> SiteConfigured:
    """The site with a grid connection of `capacity_kw` and a safe limit of a fifth of it."""
    return SiteConfigured(
        event_id=next_id("site"),
        at=at,
        site=Site(site_id=site_id, capacity_kw=capacity_kw, safe_limit_kw=capacity_kw / 5),
    )


def vehicle_registered(
    vehicle_id: str, at: datetime, *, capacity_kwh: float = 60.0, soc: float = 0.3
) -> VehicleRegistered:
    """A car with an 11 kW on-board charger."""
    return VehicleRegistered(
        event_id=next_id("veh"),
        at=at,
        vehicle=Vehicle(
            vehicle_id=vehicle_id,
            model="TESLA MODEL 3",
            capacity_kwh=capacity_kwh,
            energy_kwh=soc * capacity_kwh,
            energy_at=at,
        ),
    )


def charger_registered(
    charger_id: str, at: datetime, max_power_kw: float = 11.0
) -> ChargerRegistered:
    """A three-phase charge point with one connector."""
    return ChargerRegistered(
        event_id=next_id("cp"),
        at=at,
        charger=ChargePoint(
            charger_id=charger_id,
            max_power_kw=max_power_kw,
            connectors=(Connector(connector_id=1, max_power_kw=max_power_kw),),
        ),
    )


def plugged_in(vehicle_id: str, charger_id: str, at: datetime) -> VehiclePluggedIn:
    """The car plugs into connector 1 of the charger."""
    return VehiclePluggedIn(
        event_id=next_id("plug"),
        at=at,
        vehicle_id=vehicle_id,
        charger_id=charger_id,
        connector_id=1,
    )


def soc_reported(vehicle_id: str, soc: float, at: datetime) -> SocReported:
    """The car reports its state of charge."""
    return SocReported(event_id=next_id("soc"), at=at, vehicle_id=vehicle_id, soc=soc)


def flat_prices(at: datetime, start: datetime, price: float = 0.2, slots: int = 96) -> PriceUpdated:
    """The same price in every slot."""
    return PriceUpdated(
        event_id=next_id("price"), at=at, start=start, price_eur_per_kwh=(price,) * slots
    )


def flat_headroom(at: datetime, start: datetime, kw: float, slots: int = 96) -> HeadroomUpdated:
    """The same head-room in every slot."""
    return HeadroomUpdated(event_id=next_id("hr"), at=at, start=start, headroom_kw=(kw,) * slots)


def small_site(at: datetime, cars: int = 3, capacity_kw: float = 100.0) -> list[object]:
    """Site, chargers and cars, every car plugged in: the events that build a small depot."""
    events: list[object] = [site_configured(at, capacity_kw)]
    for k in range(1, cars + 1):
        events += [
            charger_registered(f"cp-{k}", at),
            vehicle_registered(f"ev-{k}", at),
            plugged_in(f"ev-{k}", f"cp-{k}", at),
        ]
    return events


class PlanRecorder:
    """A `PlanSink` that keeps every plan it is given (an in-process sink, not a stand-in for a
    server)."""

    def __init__(self) -> None:
        self.plans: list[Plan] = []
        self.published = asyncio.Event()  # set at every plan kept

    async def publish(self, plan: Plan, state: FleetState) -> None:
        """Keep the plan."""
        self.plans.append(plan)
        self.published.set()

    async def more_than(self, count: int) -> None:
        """Wait until more than `count` plans have been kept."""
        while len(self.plans) <= count:
            self.published.clear()
            await self.published.wait()


class ResultRecorder:
    """A `CommandResults` that keeps every command outcome."""

    def __init__(self) -> None:
        self.results: dict[str, tuple[bool, str]] = {}

    async def command_result(self, command_id: str, ok: bool, reason: str) -> None:
        """Keep the outcome."""
        self.results[command_id] = (ok, reason)


def later(at: datetime, minutes: float) -> datetime:
    """`at` plus some minutes."""
    return at + timedelta(minutes=minutes)


async def consume_until_applied(service: ControllerService, timeout_s: float = 30.0) -> None:
    """Run a started service's log consumer (not its planner) until the log is drained."""
    task = asyncio.create_task(service._consume_forever())
    try:
        await asyncio.wait_for(service.applied(), timeout_s)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
