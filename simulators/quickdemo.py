"""The foundation demo: the real service on embedded servers, fed a few events over MQTT.

It starts voltpool (embedded Redis and broker, a throw-away data directory), publishes a site,
chargers, cars, prices and head-room as MQTT messages, waits for the retained schedule the
controller publishes, and prints it. The full simulated day replaces it as `make demo` later.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import numpy as np
from rich.console import Console
from rich.table import Table

from adapters import bootstrap
from adapters.codec import encode_event
from controller.domain import ChargePoint, Connector, Site, Vehicle, slot_floor
from controller.events import (
    ChargerRegistered,
    DepartureSet,
    Event,
    HeadroomUpdated,
    PriceUpdated,
    SiteConfigured,
    VehiclePluggedIn,
    VehicleRegistered,
)
from controller.settings import Settings


def demo_events(now: datetime, cars: int, rng: np.random.Generator) -> list[Event]:
    """A small depot: 11 kW chargers, cars arriving with 20-50 % SoC, a price curve with a
    cheap night, and head-room that is tight in the evening peak."""
    start = slot_floor(now)
    hours = np.array([(start + timedelta(minutes=15 * k)).hour for k in range(96)])
    price = 0.10 + 0.12 * np.exp(-((hours - 19) ** 2) / 8.0) - 0.05 * ((hours >= 1) & (hours < 5))
    headroom = np.where((hours >= 17) & (hours < 21), 4.0 * cars, 11.0 * cars)
    events: list[Event] = [
        SiteConfigured(
            event_id="demo-site",
            at=now,
            site=Site(site_id="demo", capacity_kw=11.0 * cars, safe_limit_kw=3.7 * cars),
        ),
        PriceUpdated(
            event_id="demo-price",
            at=now,
            start=start,
            price_eur_per_kwh=tuple(float(p) for p in price),
        ),
        HeadroomUpdated(
            event_id="demo-headroom",
            at=now,
            start=start,
            headroom_kw=tuple(float(h) for h in headroom),
        ),
    ]
    for k in range(1, cars + 1):
        capacity = float(rng.choice([39.0, 57.5, 77.0]))
        soc = float(rng.uniform(0.2, 0.5))
        events += [
            ChargerRegistered(
                event_id=f"demo-cp-{k}",
                at=now,
                charger=ChargePoint(
                    charger_id=f"cp-{k}",
                    max_power_kw=11.0,
                    connectors=(Connector(connector_id=1, max_power_kw=11.0),),
                ),
            ),
            VehicleRegistered(
                event_id=f"demo-ev-{k}",
                at=now,
                vehicle=Vehicle(
                    vehicle_id=f"ev-{k}",
                    model="demo",
                    capacity_kwh=capacity,
                    energy_kwh=soc * capacity,
                    energy_at=now,
                ),
            ),
            VehiclePluggedIn(
                event_id=f"demo-plug-{k}",
                at=now,
                vehicle_id=f"ev-{k}",
                charger_id=f"cp-{k}",
                connector_id=1,
            ),
            DepartureSet(
                event_id=f"demo-dep-{k}",
                at=now,
                vehicle_id=f"ev-{k}",
                departure=now + timedelta(hours=float(rng.uniform(10, 16))),
                target_kwh=0.9 * capacity,
            ),
        ]
    return events


async def run_quick_demo(cars: int, console: Console) -> None:
    """Run the service, feed the demo events over MQTT, print the first plan covering them all."""
    done = asyncio.Event()

    async def drive(runtime: bootstrap.Runtime) -> None:
        now = datetime.now(UTC)
        events = demo_events(now, cars, np.random.default_rng(7))
        topics = runtime.link.topics
        async with aiomqtt.Client(runtime.mqtt.host, runtime.mqtt.port) as client:
            await client.subscribe(topics.schedule, qos=1)
            for event in events:
                await client.publish(topics.events, encode_event(event), qos=1)
            console.print(f"published {len(events)} events on {topics.events}")
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes | bytearray)
                plan = json.loads(bytes(payload).decode())
                if len(plan["setpoints"]) == cars:
                    _print_plan(console, plan)
                    break
        done.set()

    with tempfile.TemporaryDirectory(prefix="voltpool-demo-") as data_dir:
        settings = Settings(site="demo", data_dir=data_dir, redis_url=None, mqtt_url=None)
        service = asyncio.create_task(bootstrap.run(settings, on_ready=drive))
        waiter = asyncio.create_task(done.wait())
        finished, _ = await asyncio.wait({service, waiter}, return_when=asyncio.FIRST_COMPLETED)
        service.cancel()
        await asyncio.gather(service, return_exceptions=True)
        waiter.cancel()
        error = service.exception() if service in finished else None
        if error is not None:
            raise error


def _print_plan(console: Console, plan: dict[str, Any]) -> None:
    console.print(
        f"\n[bold]Plan[/bold] made {plan['made_at']} by {plan['solver']}: "
        f"cost {plan['cost_eur']:.2f} EUR, peak {plan['peak_kw']:.1f} kW, "
        f"shortfall {plan['shortfall_kwh']:.1f} kWh"
    )
    table = Table(title="Hourly power per car (kW), next 24 h")
    table.add_column("hour (UTC)")
    table.add_column("price EUR/kWh", justify="right")
    table.add_column("head-room kW", justify="right")
    for setpoint in plan["setpoints"]:
        table.add_column(setpoint["vehicle_id"], justify="right")
    starts = plan["slot_starts"]
    for t in range(0, len(starts), 4):
        row = [
            starts[t][11:16],
            f"{plan['price_eur_per_kwh'][t]:.3f}",
            f"{plan['headroom_kw'][t]:.0f}",
        ]
        row += [f"{np.mean(s['kw'][t : t + 4]):.1f}" for s in plan["setpoints"]]
        table.add_row(*row)
    console.print(table)
