"""An operator command's result is published only once the service's state holds it.

An operator (or a test) that reads the state when "accepted" arrives must find the override
in force. The one-at-a-time consumer set its state before publishing; the batch consumer
published each result before moving its state past that entry (the MQTT command test then
failed about one run in three under load). Checked for both consumers, on a real Redis.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta

import pytest
from redis.asyncio import Redis

from adapters.redis_store import RedisFleetStore
from controller.clock import SimClock
from controller.events import PauseVehicle
from controller.planning.planner import StatePlanner
from controller.service import ControllerService
from controller.settings import Settings
from tests.conftest import T0
from tests.factories import PlanRecorder, consume_until_applied, small_site

_sites = itertools.count(1)


class StateAtResult:
    """Results port that notes, for each command, whether the service's state already held
    its pause when the result was published."""

    def __init__(self, clock: SimClock, targets: dict[str, str]) -> None:
        self.clock = clock
        self.targets = targets  # command id -> the car it pauses
        self.service: ControllerService | None = None
        self.seen: dict[str, bool] = {}

    async def command_result(self, command_id: str, ok: bool, reason: str) -> None:
        """Note what the state holds now, then yield as a real publish does."""
        assert self.service is not None
        active = self.service.state.active_overrides(self.clock.now())
        target = self.targets[command_id]
        self.seen[command_id] = ok and any(
            o.kind == "pause_vehicle" and o.target_id == target for o in active
        )
        await asyncio.sleep(0)


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "one-at-a-time"])
async def test_a_commands_result_finds_it_in_the_state(redis: Redis, batch: bool) -> None:
    """Site events and two pauses in one taken batch: at each result the pause is in force."""
    site = f"order-{next(_sites)}"
    clock = SimClock(T0)
    results = StateAtResult(clock, {"p-1": "ev-1", "p-2": "ev-2"})
    service = ControllerService(
        store=RedisFleetStore(redis, site),
        clock=clock,
        planner=StatePlanner(),
        sink=PlanRecorder(),
        settings=Settings(site=site),
        results=results,
        batch_commit=batch,
    )
    results.service = service
    expiry = T0 + timedelta(hours=1)
    events = [
        *small_site(T0, cars=2),
        PauseVehicle(event_id="p-1", at=T0, expires_at=expiry, vehicle_id="ev-1"),
        PauseVehicle(event_id="p-2", at=T0, expires_at=expiry, vehicle_id="ev-2"),
    ]
    store = RedisFleetStore(redis, site)
    for event in events:
        await store.append(event)  # type: ignore[arg-type]
    await service.start()
    await consume_until_applied(service)
    assert results.seen == {"p-1": True, "p-2": True}
