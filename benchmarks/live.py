"""Live-controller benchmark: event-to-profile latency and sustained event rate, seed fleet.

Two measurements, both on real servers (embedded redis-server, amqtt broker, OCPP over
loopback WebSockets):

1. *Throughput*: the service alone (Redis store, optimiser planner, wall clock), the seed's
   278 cars plugged in; SoC events are submitted as fast as the service takes them. Prints
   events/s applied, plans made, and event -> plan-published latency percentiles; the
   proportional-share planner in the same run is the baseline.
2. *Through the protocols*: `simulators.scenario.run_day` with the seed's fleet on simulated
   chargers for a few simulated hours. Prints event -> plan latency, and per step the wall time
   from the step's events to the last SetChargingProfile answered (event -> profile sent).

    .venv/bin/python benchmarks/live.py [--events 5000] [--hours 3] [--cars 278]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from adapters.datasets.fleet import load_seed_fleet
from adapters.embedded import redis_endpoint
from adapters.redis_store import RedisFleetStore
from controller.clock import WallClock
from controller.domain import ChargePoint, Connector, Site
from controller.events import (
    ChargerRegistered,
    Event,
    HeadroomUpdated,
    PriceUpdated,
    SiteConfigured,
    SocReported,
    VehiclePluggedIn,
    VehicleRegistered,
)
from controller.forecast.fleet import synthetic_fleet
from controller.optimiser import solve
from controller.planning.planner import SolveFn, StatePlanner
from controller.planning.share import share_by_need
from controller.service import ControllerService
from controller.settings import Settings
from simulators.scenario import CarDay, DayInputs, run_day

ROOT = Path(__file__).resolve().parents[1]


def _percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ms = np.asarray(values) * 1000.0
    return (
        f"p50 {np.percentile(ms, 50):7.1f} ms  p95 {np.percentile(ms, 95):7.1f} ms  "
        f"p99 {np.percentile(ms, 99):7.1f} ms  max {ms.max():7.1f} ms  (n={len(ms)})"
    )


class _Sink:
    async def publish(self, plan: object, state: object) -> None:
        return None


async def throughput(cars: int, events: int, solver: SolveFn, label: str) -> None:
    """Submit `events` SoC reports for a plugged-in fleet; measure rate and latency."""
    rows = load_seed_fleet(ROOT / "data/fleet/seed_fleet.csv")
    fleet = synthetic_fleet(rows)[:cars]
    clock = WallClock()
    now = clock.now()
    with tempfile.TemporaryDirectory() as tmp:
        async with redis_endpoint(None, Path(tmp)) as endpoint:
            client = endpoint.client()
            service = ControllerService(
                store=RedisFleetStore(client, "bench"),
                clock=clock,
                planner=StatePlanner(solve=solver),
                sink=_Sink(),
                settings=Settings(site="bench", coalesce_window_s=0.05),
            )
            await service.start()
            task = asyncio.create_task(service.run())
            start = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
            setup: list[Event] = [
                SiteConfigured(
                    event_id="site", at=now, site=Site(site_id="bench", capacity_kw=1000.0)
                ),
                PriceUpdated(
                    event_id="price",
                    at=now,
                    start=start,
                    price_eur_per_kwh=tuple(0.1 + 0.1 * np.sin(np.arange(192) / 96 * 2 * np.pi)),
                ),
                HeadroomUpdated(event_id="hr", at=now, start=start, headroom_kw=(700.0,) * 192),
            ]
            for k, vehicle in enumerate(fleet):
                cid = f"CP-{k + 1:04d}"
                setup += [
                    ChargerRegistered(
                        event_id=f"cp-{cid}",
                        at=now,
                        charger=ChargePoint(
                            charger_id=cid,
                            max_power_kw=vehicle.max_charge_kw,
                            connectors=(Connector(connector_id=1, max_power_kw=11.0),),
                        ),
                    ),
                    VehicleRegistered(event_id=f"ev-{k}", at=now, vehicle=vehicle),
                    VehiclePluggedIn(
                        event_id=f"plug-{k}",
                        at=now,
                        vehicle_id=vehicle.vehicle_id,
                        charger_id=cid,
                        connector_id=1,
                    ),
                ]
            for event in setup:
                await service.submit(event)
            await service.counted("events_applied", len(setup))
            await service.settled()  # the first plan, for the fleet as set up
            service.latencies_s.clear()
            plans_before = service.plans_made
            rng = np.random.default_rng(1)
            started = time.perf_counter()
            for k in range(events):
                vehicle = fleet[k % len(fleet)]
                await service.submit(
                    SocReported(
                        event_id=f"soc-{k}",
                        at=clock.now(),
                        vehicle_id=vehicle.vehicle_id,
                        soc=float(rng.uniform(0.2, 0.6)),
                    )
                )
            await service.counted("events_applied", len(setup) + events)
            elapsed = time.perf_counter() - started
            await service.settled()  # a plan that includes the last event
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()
    print(
        f"  {label:<22} {events / elapsed:8.0f} events/s applied, "
        f"{service.plans_made - plans_before:5d} plans, last solve "
        f"{service.counters.get('last_solve_ms', 0)} ms"
    )
    print(f"  {'':<22} event -> plan published: {_percentiles(list(service.latencies_s))}")


def seed_day(cars: int, hours: float) -> DayInputs:
    """The seed fleet arriving over the evening at 3.6 kW chargers (1 MW in all)."""
    rows = load_seed_fleet(ROOT / "data/fleet/seed_fleet.csv")
    fleet = synthetic_fleet(rows)[:cars]
    start = datetime(2024, 3, 12, 16, 0, tzinfo=UTC)
    slots = int(hours * 4) + 96
    hour = (16 + np.arange(slots) / 4.0) % 24
    evening = np.exp(-((hour - 19.0) ** 2) / 6.0)
    price = 0.12 + 0.18 * evening - 0.07 * (hour < 6)
    load = 300.0 + 400.0 * evening
    rng = np.random.default_rng(3)
    days = tuple(
        CarDay(
            vehicle_id=v.vehicle_id,
            model=v.model,
            capacity_kwh=v.capacity_kwh,
            arrival=start + timedelta(minutes=int(rng.integers(0, 120))),
            departure=start + timedelta(hours=14 + float(rng.uniform(0, 2))),
            arrival_soc=float(rng.uniform(0.2, 0.5)),
            target_soc=0.8,
            max_charge_kw=v.max_charge_kw,
        )
        for v in fleet
    )
    return DayInputs(
        start=start,
        hours=hours,
        site_capacity_kw=1400.0,
        charger_kw=fleet[0].max_charge_kw,
        price_eur_per_kwh=price,
        headroom_forecast_kw=1400.0 - load,
        base_load_kw=load - 20.0,
        cars=days,
    )


async def through_protocols(cars: int, hours: float) -> None:
    """The seed fleet for `hours` through OCPP, MQTT and Redis."""
    inputs = seed_day(cars, hours)
    started = time.perf_counter()
    result = await run_day(inputs, step_s=60, meter_interval_s=300)
    wall = time.perf_counter() - started
    applied = result.counters.get("events_applied", 0)
    print(
        f"  {cars} cars, {hours:.0f} simulated h in {wall:.0f} s wall: {applied} events applied "
        f"({applied / wall:.0f}/s), {result.counters.get('plans', 0)} plans, "
        f"{result.dispatch.get('profiles_sent', 0)} profiles sent"
    )
    print(f"  event -> plan published: {_percentiles(result.latency_s)}")
    print(f"  step events -> last profile answered: {_percentiles(result.step_latency_s)}")


def main() -> None:
    """Run both measurements and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cars", type=int, default=278)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--hours", type=float, default=3.0)
    args = parser.parse_args()
    print(f"Throughput, service alone, {args.cars} cars plugged in:")
    asyncio.run(throughput(args.cars, args.events, share_by_need, "proportional share"))
    asyncio.run(throughput(args.cars, args.events, solve, "optimiser (fast path)"))
    print("Through the protocols:")
    asyncio.run(through_protocols(args.cars, args.hours))


if __name__ == "__main__":
    main()
