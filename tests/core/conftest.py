"""Fixtures of the core tests: the service wired to a real embedded MQTT broker."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from adapters.embedded import MqttEndpoint, embedded_broker, free_port, until_listening
from adapters.mqtt import MqttLink, MqttPlanPublisher
from adapters.redis_store import RedisFleetStore
from controller.clock import SimClock
from controller.planning.planner import StatePlanner
from controller.service import ControllerService
from controller.settings import Settings

TIMEOUT_S = 10.0
PREFIX = "vp-test"


@dataclass
class Wired:
    service: ControllerService
    link: MqttLink
    endpoint: MqttEndpoint


MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)


@contextlib.asynccontextmanager
async def mosquitto_broker(workdir: Path) -> AsyncIterator[MqttEndpoint]:
    """A real Mosquitto on a free loopback port, for as long as the context lasts."""
    assert MOSQUITTO is not None
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = await asyncio.create_subprocess_exec(
        MOSQUITTO,
        "-c",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await until_listening(port, timeout_s=TIMEOUT_S)
        yield MqttEndpoint("127.0.0.1", port)
    finally:
        process.terminate()
        await process.wait()


@contextlib.asynccontextmanager
async def broker(kind: str, workdir: Path) -> AsyncIterator[MqttEndpoint]:
    """The embedded amqtt broker, or Mosquitto where its binary is installed."""
    if kind == "mosquitto":
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (Debian package mosquitto): amqtt only")
        async with mosquitto_broker(workdir) as endpoint:
            yield endpoint
    else:
        async with embedded_broker() as endpoint:
            yield endpoint


def service_with_link(link: MqttLink, redis: Redis, clock: SimClock) -> ControllerService:
    """The "depot" service publishing its plans and command results on `link`, which feeds it
    (attached, neither running yet)."""
    service = ControllerService(
        store=RedisFleetStore(redis, "depot"),
        clock=clock,
        planner=StatePlanner(),
        sink=MqttPlanPublisher(link),
        settings=Settings(site="depot"),
        results=link,
    )
    link.attach(service.submit, service.reject_invalid)
    return service


@contextlib.asynccontextmanager
async def running_link(
    endpoint: MqttEndpoint, redis: Redis, clock: SimClock
) -> AsyncIterator[Wired]:
    """The service and its MQTT link on `endpoint`, running until the context exits."""
    link = MqttLink(endpoint, PREFIX)
    service = service_with_link(link, redis, clock)
    tasks = [asyncio.create_task(service.run()), asyncio.create_task(link.run())]
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await link.connected.wait()
            await service.settled()
        yield Wired(service, link, endpoint)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture(params=["amqtt", "mosquitto"])
async def wired(
    request: pytest.FixtureRequest, redis: Redis, clock: SimClock, tmp_path: Path
) -> AsyncIterator[Wired]:
    async with (
        broker(request.param, tmp_path) as endpoint,
        running_link(endpoint, redis, clock) as wired,
    ):
        yield wired
