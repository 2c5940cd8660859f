"""Many simulated charge points in one process: `run_chargers`, the entry of
`voltpool simulate-chargers`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np

from adapters.ocpp.aio import stop_task
from controller.clock import WallClock
from controller.domain import RateUnit, V2gMode
from controller.ports import Clock
from simulators.chargepoints.car import SimCar
from simulators.chargepoints.chargepoint import ChargerSpec, FleetStats, SimChargePoint


def derived_password(secret: str, charger_id: str) -> str:
    """A charger's 40-hex-character password derived from one fleet secret (HMAC-SHA256).

    Lets an operator provision N simulated chargers from one secret without a password list.
    """
    return hmac.new(secret.encode(), charger_id.encode(), hashlib.sha256).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class FleetReport:
    """What a run of simulated chargers did."""

    chargers: int
    online: int
    connects: int
    sent: dict[str, int]
    answered: dict[str, int]
    errors: dict[str, int]
    rtt_ms: dict[str, float] = field(default_factory=dict)  # p50, p95, p99, max

    @property
    def messages_answered(self) -> int:
        """CALLs that got an answer."""
        return sum(self.answered.values())


def report(chargers: list[SimChargePoint], stats: FleetStats) -> FleetReport:
    """Summarise a fleet's counters and round-trip times."""
    rtt: dict[str, float] = {}
    if stats.rtt_s:
        values = np.array(stats.rtt_s) * 1000.0
        for name, q in (("p50", 50), ("p95", 95), ("p99", 99)):
            rtt[name] = float(np.percentile(values, q))
        rtt["max"] = float(values.max())
    return FleetReport(
        chargers=len(chargers),
        online=sum(1 for c in chargers if c.online.is_set()),
        connects=stats.connects,
        sent=dict(stats.sent),
        answered=dict(stats.answered),
        errors=dict(stats.errors),
        rtt_ms=rtt,
    )


def make_chargers(
    count: int,
    clock: Clock,
    *,
    id_prefix: str = "CP-",
    first: int = 1,
    connectors: int = 1,
    max_power_kw: float = 11.0,
    phases: int = 3,
    voltage_v: float = 230.0,
    rate_unit: RateUnit = "W",
    v2g_mode: V2gMode = "none",
    meter_interval_s: float = 60.0,
    validate: bool = True,
    stats: FleetStats | None = None,
    seed: int = 0,
) -> list[SimChargePoint]:
    """`count` chargers named `{id_prefix}{first}` ... sharing one `FleetStats`."""
    stats = stats or FleetStats()
    rng = random.Random(seed)
    return [
        SimChargePoint(
            ChargerSpec(
                charger_id=f"{id_prefix}{first + i}",
                connectors=connectors,
                max_power_kw=max_power_kw,
                phases=phases,
                voltage_v=voltage_v,
                rate_unit=rate_unit,
                v2g_mode=v2g_mode,
                meter_interval_s=meter_interval_s,
            ),
            clock,
            stats=stats,
            validate=validate,
            rng=random.Random(rng.random()),
        )
        for i in range(count)
    ]


def random_car(rng: random.Random, charger: SimChargePoint, index: int) -> SimCar:
    """A car with a 40-80 kWh battery at 20-60 % SoC, accepting up to the charger's power."""
    capacity = rng.uniform(40.0, 80.0)
    return SimCar(
        vehicle_id=f"{charger.spec.charger_id}-car-{index}",
        id_tag=f"T{rng.randrange(10**12):012d}",
        capacity_kwh=capacity,
        energy_kwh=capacity * rng.uniform(0.2, 0.6),
        max_charge_kw=charger.spec.max_power_kw,
        max_discharge_kw=charger.spec.max_power_kw if charger.spec.v2g_mode != "none" else 0.0,
    )


async def plug_in_when_online(
    charger: SimChargePoint, rng: random.Random, online_timeout_s: float = 600.0
) -> None:
    """Plug a random car into each empty connector once the charger is online."""
    await asyncio.wait_for(charger.wait_online(), online_timeout_s)
    for connector in charger.connectors:
        if connector.car is None:
            await charger.plug_in(connector.connector_id, random_car(rng, charger, 1))


async def run_chargers(
    url: str,
    count: int,
    *,
    password: str | None = None,
    password_for: Callable[[str], str] | None = None,
    id_prefix: str = "CP-",
    first: int = 1,
    connectors: int = 1,
    max_power_kw: float = 11.0,
    phases: int = 3,
    rate_unit: RateUnit = "W",
    v2g_mode: V2gMode = "none",
    meter_interval_s: float = 60.0,
    duration_s: float | None = None,
    clock: Clock | None = None,
    ssl_context: ssl.SSLContext | None = None,
    cars: bool = True,
    connects_per_s: float = 200.0,
    validate: bool = True,
    seed: int = 0,
    stats: FleetStats | None = None,
) -> FleetReport:
    """Run `count` simulated charge points against the central system at `url`
    (`ws://host:port/ocpp`) for `duration_s` on `clock` (until cancelled when None).

    Connections open at `connects_per_s` (so a thousand chargers do not all handshake at
    once); each charger plugs in a car when `cars`. Each credential comes from
    `password_for(charger_id)`, or one shared `password`, or none (security profile 0).
    """
    clock = clock or WallClock()
    stats = stats or FleetStats()
    chargers = make_chargers(
        count,
        clock,
        id_prefix=id_prefix,
        first=first,
        connectors=connectors,
        max_power_kw=max_power_kw,
        phases=phases,
        rate_unit=rate_unit,
        v2g_mode=v2g_mode,
        meter_interval_s=meter_interval_s,
        validate=validate,
        stats=stats,
        seed=seed,
    )
    rng = random.Random(seed)
    tasks: list[asyncio.Task[None]] = []
    started = clock.now()
    try:
        for i, charger in enumerate(chargers):
            secret = password_for(charger.spec.charger_id) if password_for else password
            tasks.append(asyncio.ensure_future(charger.run(url, secret, ssl_context=ssl_context)))
            if cars:
                tasks.append(
                    asyncio.ensure_future(plug_in_when_online(charger, random.Random(rng.random())))
                )
            if connects_per_s > 0:
                await clock.sleep_until(started + timedelta(seconds=(i + 1) / connects_per_s))
        if duration_s is None:
            await asyncio.Event().wait()
        await clock.sleep_until(started + timedelta(seconds=duration_s or 0.0))
        result = report(chargers, stats)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            await stop_task(task)
    return result
