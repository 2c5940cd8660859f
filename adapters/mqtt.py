"""MQTT adapter: typed events in, plan and status out, on a real broker through aiomqtt.

Topics under a configurable prefix:

- `{prefix}/vehicle/{id}/soc`, `{prefix}/vehicle/{id}/departure`, `{prefix}/price`,
  `{prefix}/site/headroom`, `{prefix}/site/load`, `{prefix}/operator/command` (in, QoS 1):
  telemetry and commands, schemas in `adapters.mqtt_payloads` and `docs/schemas/mqtt/`.
- `{prefix}/events` (in, QoS 1): any typed event or operator command as JSON
  (`docs/schemas/events.json`), for integrations and simulators.
- `{prefix}/schedule` (out, retained): the latest plan's summary.
- `{prefix}/status` (out, retained): `online` with counters; the last will says `offline`.
- `{prefix}/operator/result/{command_id}` (out): the outcome of an operator command.

A payload that does not parse is logged, counted and dropped; the loop never sees it. The
embedded broker keeps neither queued messages for an offline client nor retained messages across
its restart, so on every (re)connect the adapter subscribes again and re-publishes its retained
topics.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiomqtt

from adapters.codec import decode_event
from adapters.embedded import MqttEndpoint
from adapters.mqtt_payloads import command_id_of, event_for
from adapters.redis_store import plan_summary
from controller.errors import InvalidEvent, Refused, StoreUnavailable
from controller.events import Event
from controller.planning.plan import Plan
from controller.state import FleetState

log = logging.getLogger(__name__)

RECONNECT_DELAYS_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class Topics:
    """Topic names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.events = f"{self.prefix}/events"
        self.schedule = f"{self.prefix}/schedule"
        self.status = f"{self.prefix}/status"
        self.command = f"{self.prefix}/operator/command"
        self.inputs = (
            self.events,
            f"{self.prefix}/vehicle/+/soc",
            f"{self.prefix}/vehicle/+/departure",
            f"{self.prefix}/price",
            f"{self.prefix}/site/headroom",
            f"{self.prefix}/site/load",
            self.command,
        )

    def vehicle(self, vehicle_id: str, what: str) -> str:
        """`{prefix}/vehicle/{vehicle_id}/{what}` (what: soc, departure)."""
        return f"{self.prefix}/vehicle/{vehicle_id}/{what}"

    def tail(self, topic: str) -> list[str]:
        """The levels of `topic` below the prefix."""
        return topic[len(self.prefix) + 1 :].split("/")

    def command_result(self, command_id: str) -> str:
        """Where the result of one operator command goes."""
        return f"{self.prefix}/operator/result/{command_id}"


class MqttLink:
    """One connection to the broker, re-established until cancelled.

    Parsed events go to the `submit` given to `attach` (the service's `submit`); bad payloads go
    to its `reject` (counted there). Publishing while disconnected keeps only the latest
    retained payloads, which are sent again on reconnect.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        prefix: str,
        *,
        client_id: str = "voltpool-controller",
    ) -> None:
        self._endpoint = endpoint
        self.topics = Topics(prefix)
        self._submit: Callable[[Event], Awaitable[None]] | None = None
        self._reject: Callable[[str, ValueError], Awaitable[None]] | None = None
        self._client_id = client_id
        self._client: aiomqtt.Client | None = None
        self._retained: dict[str, str] = {}
        self.connected = asyncio.Event()
        self.connections = 0

    def attach(
        self,
        submit: Callable[[Event], Awaitable[None]],
        reject: Callable[[str, ValueError], Awaitable[None]],
    ) -> None:
        """Say where parsed events and rejected payloads go; call before `run`."""
        self._submit = submit
        self._reject = reject

    async def run(self) -> None:
        """Connect, subscribe, re-publish retained topics and consume, reconnecting on loss."""
        attempt = 0
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self._client = None
                delay = RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)]
                attempt += 1
                log.warning("MQTT connection lost (%s); reconnecting in %.1f s", exc, delay)
                await asyncio.sleep(delay)
            else:
                attempt = 0

    async def _session(self) -> None:
        will = aiomqtt.Will(
            self.topics.status, json.dumps({"state": "offline"}), qos=1, retain=True
        )
        async with aiomqtt.Client(
            self._endpoint.host,
            self._endpoint.port,
            username=self._endpoint.username,
            password=self._endpoint.password,
            identifier=self._client_id,
            will=will,
            clean_session=True,
        ) as client:
            self._client = client
            for topic in self.topics.inputs:
                await client.subscribe(topic, qos=1)
            for topic, payload in list(self._retained.items()):
                await client.publish(topic, payload, qos=1, retain=True)
            self.connections += 1
            self.connected.set()
            async for message in client.messages:
                await self._handle(message)

    async def _handle(self, message: aiomqtt.Message) -> None:
        if self._submit is None or self._reject is None:
            raise RuntimeError("MqttLink.attach() was not called before run()")
        if message.retain:
            # A retained event would be replayed at every reconnect: events must be sent live.
            await self._reject("mqtt", ValueError(f"retained message on {message.topic}"))
            return
        payload = message.payload
        if not isinstance(payload, bytes | str):
            await self._reject("mqtt", ValueError(f"payload of type {type(payload).__name__}"))
            return
        topic = str(message.topic)
        try:
            if topic == self.topics.events:
                event = decode_event(payload)
            else:
                event = event_for(self.topics.tail(topic), payload)
        except InvalidEvent as exc:
            await self._reject("mqtt", exc)
            command_id = command_id_of(payload) if topic == self.topics.command else None
            if command_id is not None:
                await self.command_result(command_id, False, f"invalid command: {exc}")
            return
        try:
            await self._submit(event)
        except Refused as refusal:
            log.info("refused %s from MQTT: %s", event.event_id, refusal.reason)
        except StoreUnavailable:
            log.exception("could not log %s; it is lost unless resent", event.event_id)

    async def publish(self, topic: str, payload: Any, *, retain: bool = False) -> None:
        """Publish JSON; a retained payload is remembered and re-sent after reconnects."""
        text = payload if isinstance(payload, str) else json.dumps(payload, default=_json_default)
        if retain:
            self._retained[topic] = text
        client = self._client
        if client is None:
            return
        try:
            await client.publish(topic, text, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            log.warning("could not publish on %s: %s", topic, exc)

    async def command_result(self, command_id: str, ok: bool, reason: str) -> None:
        """`controller.ports.CommandResults`: publish the outcome of an operator command."""
        await self.publish(
            self.topics.command_result(command_id),
            {"command_id": command_id, "ok": ok, "reason": reason},
        )


class MqttPlanPublisher:
    """`controller.ports.PlanSink` that publishes each plan's summary, retained."""

    def __init__(self, link: MqttLink) -> None:
        self._link = link

    async def publish(self, plan: Plan, state: FleetState) -> None:
        """Publish the plan on `{prefix}/schedule`."""
        await self._link.publish(self._link.topics.schedule, plan_summary(plan), retain=True)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
