"""The MQTT link on a real (embedded amqtt) broker: events in, plans and results out."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import timedelta
from typing import Any

import aiomqtt
import pytest
from redis.asyncio import Redis

from adapters.codec import encode_event
from adapters.embedded import MqttEndpoint, embedded_broker, free_port
from adapters.mqtt import MqttLink
from controller.clock import SimClock
from controller.events import ForceCharge
from tests.core.conftest import PREFIX, TIMEOUT_S, Wired, running_link
from tests.factories import small_site, soc_reported


async def _publish(
    endpoint: MqttEndpoint, payloads: list[str | bytes], retain: bool = False
) -> None:
    async with aiomqtt.Client(endpoint.host, endpoint.port) as client:
        for payload in payloads:
            await client.publish(f"{PREFIX}/events", payload, qos=1, retain=retain)


async def _applied(wired: Wired, count: int) -> None:
    """Wait until the service has applied `count` events (each publish is one delivery)."""
    async with asyncio.timeout(TIMEOUT_S):
        await wired.service.counted("events_applied", count)


async def test_malformed_payloads_are_counted_and_dropped_and_the_next_one_applies(
    wired: Wired, clock: SimClock
) -> None:
    """Not JSON, an unknown kind, a missing field, a value out of range: each is counted; a
    valid event after them is applied."""
    events = small_site(clock.now(), cars=1)
    await _publish(wired.endpoint, [encode_event(e) for e in events])  # type: ignore[arg-type]
    await _applied(wired, len(events))
    bad: list[str | bytes] = [
        b"not json",
        json.dumps({"kind": "teleport", "event_id": "x"}),
        json.dumps({"kind": "soc_reported", "event_id": "x", "at": clock.now().isoformat()}),
        json.dumps(
            {
                "kind": "soc_reported",
                "event_id": "y",
                "at": clock.now().isoformat(),
                "vehicle_id": "ev-1",
                "soc": 7,
            }
        ),
    ]
    good = soc_reported("ev-1", 0.77, clock.now())
    await _publish(wired.endpoint, [*bad, encode_event(good)])
    await _applied(wired, len(events) + 1)
    assert wired.service.counters["payloads_rejected_mqtt"] == len(bad)
    assert wired.service.state.vehicles["ev-1"].soc == pytest.approx(0.77)


async def test_a_retained_event_is_refused_when_replayed_on_subscribe(
    wired: Wired, clock: SimClock
) -> None:
    """A retained input is delivered live once (MQTT clears the flag for live delivery) and
    applied; the copy the broker replays to the next subscriber is counted and dropped."""
    events = small_site(clock.now(), cars=1)
    await _publish(wired.endpoint, [encode_event(e) for e in events])  # type: ignore[arg-type]
    await _applied(wired, len(events))
    await _publish(wired.endpoint, [encode_event(soc_reported("ev-1", 0.9, clock.now()))], True)
    await _applied(wired, len(events) + 1)
    second = MqttLink(wired.endpoint, PREFIX, client_id="second-controller")
    second.attach(wired.service.submit, wired.service.reject_invalid)
    task = asyncio.create_task(second.run())
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await wired.service.counted("payloads_rejected_mqtt", 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert wired.service.counters["events_applied"] == len(events) + 1
    assert wired.service.state.vehicles["ev-1"].soc == pytest.approx(0.9)


async def _first_message(
    endpoint: MqttEndpoint, topic: str, subscribed: asyncio.Event | None = None
) -> dict[str, Any]:
    async with aiomqtt.Client(endpoint.host, endpoint.port) as client:
        await client.subscribe(topic, qos=1)  # returns once the broker sent SUBACK
        if subscribed is not None:
            subscribed.set()
        async with asyncio.timeout(TIMEOUT_S):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                payload: dict[str, Any] = json.loads(message.payload)
                return payload
    raise AssertionError("no message")


async def test_command_results_and_the_retained_schedule_are_published(
    wired: Wired, clock: SimClock
) -> None:
    """A refused command's result names the reason; the schedule is retained for late readers."""
    now = clock.now()
    command = ForceCharge(
        event_id="cmd-7", at=now, expires_at=now + timedelta(hours=1), vehicle_id="ev-404"
    )
    subscribed = asyncio.Event()
    result = asyncio.create_task(
        _first_message(wired.endpoint, f"{PREFIX}/operator/result/cmd-7", subscribed)
    )
    async with asyncio.timeout(TIMEOUT_S):
        await subscribed.wait()
    await _publish(wired.endpoint, [encode_event(command)])
    outcome = await result
    assert outcome["ok"] is False
    assert "ev-404" in outcome["reason"]
    schedule = await _first_message(wired.endpoint, f"{PREFIX}/schedule")
    assert "setpoints" in schedule
    assert schedule["made_at"].startswith(now.date().isoformat())


async def test_after_a_broker_restart_the_link_resubscribes_and_republishes_retained(
    redis: Redis, clock: SimClock
) -> None:
    """amqtt forgets retained messages and subscriptions when it restarts: the controller's
    link reconnects, subscribes again (an event sent after the restart is applied) and
    re-publishes the retained schedule (a new subscriber receives it)."""
    port = free_port()
    async with contextlib.AsyncExitStack() as first_broker:
        endpoint = await first_broker.enter_async_context(embedded_broker(port=port))
        async with running_link(endpoint, redis, clock) as wired:
            assert wired.link.connections == 1
            await first_broker.aclose()  # the broker goes away, the controller stays
            async with embedded_broker(port=port) as again:
                async with asyncio.timeout(TIMEOUT_S):
                    while wired.link.connections < 2:
                        await wired.link.connected.wait()
                        await asyncio.sleep(0.05)  # the link's reconnect back-off is wall time
                schedule = await _first_message(again, f"{PREFIX}/schedule")
                assert "setpoints" in schedule
                events = small_site(clock.now(), cars=1)
                await _publish(again, [encode_event(e) for e in events])  # type: ignore[arg-type]
                async with asyncio.timeout(TIMEOUT_S):
                    await wired.service.counted("events_applied", len(events))
