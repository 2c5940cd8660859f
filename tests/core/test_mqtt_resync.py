"""Telemetry published while the controller is disconnected (RELIABILITY.md M-09).

The same telemetry goes to a controller that never disconnects and to one that is away while
it is published. With amqtt (no queue for offline clients) the away controller re-syncs from
the retained last value of each topic; with Mosquitto (persistent session, clean_session false)
every queued message is delivered once. Either way its fleet state ends equal to the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest
from redis.asyncio import Redis

from adapters.codec import encode_event
from adapters.embedded import MqttEndpoint
from adapters.mqtt import MqttLink, MqttPlanPublisher
from adapters.redis_store import RedisFleetStore
from controller.clock import SimClock
from controller.planning.planner import StatePlanner
from controller.service import ControllerService
from controller.settings import Settings
from controller.state import FleetState
from tests.core.conftest import TIMEOUT_S, broker
from tests.factories import small_site

CARS = 3
READINGS = 4  # SoC values per car published while the controller is away


@dataclass
class Controller:
    """A service and its MQTT link (which can be stopped and started again)."""

    service: ControllerService
    endpoint: MqttEndpoint
    prefix: str
    link: MqttLink | None = None
    task: asyncio.Task[None] | None = None

    def connect(self) -> MqttLink:
        """Start a link with the controller's fixed client id and a persistent session."""
        link = MqttLink(
            self.endpoint,
            self.prefix,
            client_id=f"voltpool-{self.prefix}",
            persistent_session=True,
        )
        link.attach(self.service.submit, self.service.reject_invalid)
        self.link, self.task = link, asyncio.create_task(link.run())
        return link

    async def disconnect(self) -> None:
        """Stop the link: the client goes away without cleaning its session."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.task = None


@contextlib.asynccontextmanager
async def _controller(
    endpoint: MqttEndpoint, redis: Redis, clock: SimClock, prefix: str
) -> AsyncIterator[Controller]:
    sink_link = MqttLink(endpoint, prefix, client_id=f"publisher-{prefix}")
    service = ControllerService(
        store=RedisFleetStore(redis, prefix),
        clock=clock,
        planner=StatePlanner(),
        sink=MqttPlanPublisher(sink_link),
        settings=Settings(site=prefix),
    )
    controller = Controller(service, endpoint, prefix)
    task = asyncio.create_task(service.run())
    try:
        link = controller.connect()
        async with asyncio.timeout(TIMEOUT_S):
            await link.connected.wait()
        yield controller
    finally:
        if controller.task is not None:
            await controller.disconnect()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _publish_site(endpoint: MqttEndpoint, prefix: str, clock: SimClock) -> int:
    events = small_site(clock.now() - timedelta(minutes=5), cars=CARS)
    async with aiomqtt.Client(endpoint.host, endpoint.port) as client:
        for event in events:
            await client.publish(f"{prefix}/events", encode_event(event), qos=1)  # type: ignore[arg-type]
    return len(events)


async def _publish_telemetry(endpoint: MqttEndpoint, prefix: str, clock: SimClock) -> int:
    """READINGS SoC values per car, oldest first, retained (last-value topics), QoS 1."""
    sent = 0
    async with aiomqtt.Client(endpoint.host, endpoint.port) as client:
        for k in range(READINGS):
            at = clock.now() - timedelta(seconds=10 * (READINGS - k))
            for car in range(1, CARS + 1):
                payload = json.dumps({"at": at.isoformat(), "soc": 0.2 + 0.1 * k + 0.01 * car})
                await client.publish(f"{prefix}/vehicle/ev-{car}/soc", payload, qos=1, retain=True)
                sent += 1
    return sent


async def _applied(controller: Controller, count: int) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        await controller.service.counted("events_applied", count)


def _vehicles(state: FleetState) -> dict[str, object]:
    return dict(state.vehicles)


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
async def test_telemetry_sent_while_the_controller_was_away_ends_in_the_same_state(
    kind: str, redis: Redis, clock: SimClock, tmp_path: Path
) -> None:
    """M-09: the away controller's vehicles equal the never-disconnected controller's; with
    Mosquitto each queued reading is applied once (none lost, none doubled); with amqtt the
    retained last values are taken on reconnect."""
    async with broker(kind, tmp_path) as endpoint:
        async with _controller(endpoint, redis, clock, "ref") as reference:
            base = await _publish_site(endpoint, "ref", clock)
            await _applied(reference, base)
            sent = await _publish_telemetry(endpoint, "ref", clock)
            await _applied(reference, base + sent)
            expected = _vehicles(reference.service.state)

        async with _controller(endpoint, redis, clock, "away") as away:
            await _publish_site(endpoint, "away", clock)
            await _applied(away, base)
            await away.disconnect()
            await _publish_telemetry(endpoint, "away", clock)
            link = away.connect()
            assert link.counters["resynced"] == 0
            if kind == "mosquitto":
                await _applied(away, base + sent)  # every queued reading, once
            else:
                await _applied(away, base + CARS)  # the last value of each car's topic
                assert link.counters["resynced"] >= CARS  # amqtt may replay a value twice
            async with asyncio.timeout(TIMEOUT_S):
                await away.service.applied()
            assert _vehicles(away.service.state) == expected
            assert away.service.counters["events_applied"] == (
                base + (sent if kind == "mosquitto" else CARS)
            )
