"""`run_chargers`, the entry of `voltpool simulate-chargers`, on simulated time."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from redis.asyncio import Redis

from controller.clock import SimClock
from simulators.chargepoints.fleet import derived_password, run_chargers
from tests.ocpp.conftest import charger, fleet, running_central

SECRET = "a-fleet-secret"  # pragma: allowlist secret (test-only)


def charging(events: list[Any]) -> list[Any]:
    """The Charging status reports (a charger sends one once it knows its transaction id)."""
    return [
        e for e in events if e.kind == "connector_status_changed" and e.status.value == "Charging"
    ]


def password(charger_id: str) -> str:
    """Each simulated charger's password, derived from the fleet secret."""
    return derived_password(SECRET, charger_id)


async def test_run_chargers_connects_the_fleet_plugs_in_cars_and_reports(
    redis: Redis, clock: SimClock
) -> None:
    """Five chargers with derived passwords: all online, a transaction each, MeterValues every
    30 s of simulated time, and a report of what they sent."""
    state = fleet([charger(f"SIM-{i}") for i in range(1, 6)])
    async with running_central(redis, clock, state, passwords=False) as h:
        for charger_id in state.chargers:
            await h.central.credentials.set_password(charger_id, password(charger_id))
        run = asyncio.ensure_future(
            run_chargers(
                h.central.url(),
                5,
                id_prefix="SIM-",
                first=1,
                password_for=password,
                meter_interval_s=30,
                duration_s=60,
                clock=clock,
                connects_per_s=0,
            )
        )
        await h.recorder.wait_for(lambda: len(charging(h.recorder.events)) == 5)
        await clock.advance(timedelta(seconds=30))  # in steps: the sockets need real time
        await h.recorder.wait_for(lambda: len(h.recorder.of("meter_sampled")) == 5)
        await clock.advance(timedelta(seconds=30))
        report = await asyncio.wait_for(run, 10)
    assert report.chargers == 5
    assert report.online == 5
    assert report.sent["BootNotification"] == 5
    assert report.answered["StartTransaction"] == 5
    assert report.sent["MeterValues"] >= 5
    assert report.errors == {}
    assert set(report.rtt_ms) == {"p50", "p95", "p99", "max"}
    assert {e.charger_id for e in h.recorder.of("meter_sampled")} == set(state.chargers)


def test_derived_passwords_are_40_hex_digits_and_differ_per_charger() -> None:
    """They fit the 16-40 character rule and no two chargers share one."""
    first, second = password("SIM-1"), password("SIM-2")
    assert len(first) == 40
    assert int(first, 16) >= 0
    assert first != second
