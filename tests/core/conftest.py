"""Fixtures of the core tests: the service wired to a real embedded MQTT broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from adapters.embedded import MqttEndpoint, embedded_broker
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


@pytest.fixture
async def wired(redis: Redis, clock: SimClock) -> AsyncIterator[Wired]:
    async with embedded_broker() as endpoint:
        link = MqttLink(endpoint, PREFIX)
        service = ControllerService(
            store=RedisFleetStore(redis, "depot"),
            clock=clock,
            planner=StatePlanner(),
            sink=MqttPlanPublisher(link),
            settings=Settings(site="depot"),
            results=link,
        )
        link.attach(service.submit, service.reject_invalid)
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(link.run())]
        async with asyncio.timeout(TIMEOUT_S):
            await link.connected.wait()
            await service.settled()
        yield Wired(service, link, endpoint)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
