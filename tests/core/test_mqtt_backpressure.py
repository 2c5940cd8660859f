"""The MQTT link under pressure: a bounded inbox (M-11) and a spool while Redis is down (R-07)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest

from adapters.embedded import MqttEndpoint, RedisEndpoint, embedded_broker
from adapters.mqtt import MqttLink
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.clock import SimClock
from controller.events import Event
from controller.planning.planner import StatePlanner
from controller.service import ControllerService
from controller.settings import Settings
from tests.core.conftest import TIMEOUT_S
from tests.factories import PlanRecorder, small_site
from tests.reliability.redis_process import RedisProcess

PREFIX = "bp"


async def _until(condition: Callable[[], bool]) -> None:
    """Poll a counter of the link: deliveries by the broker take wall time, and the link has
    no event to wait on for each counter (the caller bounds this with a timeout)."""
    while not condition():  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def _soc_burst(endpoint: MqttEndpoint, clock: SimClock, count: int) -> None:
    async with aiomqtt.Client(endpoint.host, endpoint.port) as client:
        for k in range(count):
            at = clock.now() - timedelta(seconds=count - k)
            payload = json.dumps({"at": at.isoformat(), "soc": 0.3 + k / (2 * count)})
            await client.publish(f"{PREFIX}/vehicle/ev-1/soc", payload, qos=1)


async def test_a_full_inbox_drops_telemetry_counts_it_and_still_queues_commands(
    clock: SimClock,
) -> None:
    """M-11 in small: the service is stalled, 60 readings and one command arrive at an inbox
    of 5. Every message is either handled or counted as dropped; the command is handled;
    the backlog never grew past the bound (plus the command)."""
    handled: list[Event] = []
    gate = asyncio.Event()

    async def submit(event: Event) -> None:
        await gate.wait()  # a service that is busy planning
        handled.append(event)

    async def reject(source: str, error: ValueError) -> None:
        raise AssertionError(f"unexpected rejection from {source}: {error}")

    async with embedded_broker() as endpoint:
        link = MqttLink(endpoint, PREFIX, client_id="bp-inbox", inbox_size=5)
        link.attach(submit, reject)
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await link.connected.wait()
                await _soc_burst(endpoint, clock, 60)
                command = {
                    "command_id": "op-1",
                    "command": "cap_site",
                    "at": clock.now().isoformat(),
                    "duration_s": 600,
                    "limit_kw": 50,
                }
                async with aiomqtt.Client(endpoint.host, endpoint.port) as client:
                    await client.publish(f"{PREFIX}/operator/command", json.dumps(command), qos=1)
                await _until(lambda: link.counters["received"] >= 61)
                gate.set()
                await _until(lambda: len(handled) + link.counters["dropped"] >= 61)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert link.counters["dropped"] >= 60 - 5 - 1
    assert len(handled) + link.counters["dropped"] == 61
    assert any(e.event_id == "op-1" for e in handled)
    assert link.counters["inbox_max"] <= 5 + 1


async def test_events_arriving_while_redis_is_down_are_spooled_and_applied_once_it_is_back(
    tmp_path: Path, clock: SimClock
) -> None:
    """R-07 on the MQTT side: QoS 1 readings acknowledged by the client while Redis is stopped
    are kept, resubmitted in order when it returns, and applied: 0 lost."""
    server = RedisProcess(tmp_path, aof=True)
    server.start()
    redis = RedisEndpoint(unix_socket=server.socket).client()
    service = ControllerService(
        store=RedisFleetStore(redis, "depot", policy=LogPolicy(trim_every=0)),
        clock=clock,
        planner=StatePlanner(),
        sink=PlanRecorder(),
        settings=Settings(site="depot"),
        store_retry_s=0.05,
    )
    try:
        async with embedded_broker() as endpoint:
            link = MqttLink(endpoint, PREFIX, client_id="bp-spool", retry_s=0.05)
            link.attach(service.submit, service.reject_invalid)
            tasks = [asyncio.create_task(service.run()), asyncio.create_task(link.run())]
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    await link.connected.wait()
                    for event in small_site(clock.now() - timedelta(minutes=5), cars=1):
                        await service.submit(event)  # type: ignore[arg-type]
                    await service.applied()
                    applied = service.counters["events_applied"]
                    server.stop()
                    await _soc_burst(endpoint, clock, 5)
                    await _until(lambda: link.counters["spooled"] >= 5)
                    assert service.counters["events_applied"] == applied
                    server.start()
                    await service.counted("events_applied", applied + 5)
                    await service.applied()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        assert link.spooled == 0
        assert link.counters["spool_resubmitted"] == 5
        assert link.counters["spool_dropped"] == 0
        assert service.state.vehicles["ev-1"].soc == pytest.approx(0.3 + 4 / 10)
    finally:
        await redis.aclose()
        server.stop()
