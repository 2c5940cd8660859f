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

Messages missed while disconnected (RELIABILITY.md M-09): with `persistent_session` (MQTT
clean_session false, a fixed client id) a broker that queues for offline clients, like
Mosquitto, delivers them once on reconnect; amqtt does not. Either way the broker replays the
retained last value of each *telemetry* topic (SoC, departure, price, head-room, site load) on
subscribe, and the link accepts those replays: telemetry ids come from topic and `at`, so a
value already applied is a duplicate and an older one is stale. Retained messages on `events`
and `operator/command` are refused (a command must never re-fire, M-06).

Back-pressure (M-11): received messages wait in a bounded inbox (`inbox_size`, the time each
waited in `inbox_waits_s`); a telemetry
message arriving at a full inbox is dropped and counted (`counters["dropped"]`), operator
commands are always queued. An event the store could not take (Redis down, R-07) waits in a
bounded spool and is resubmitted, in order, every `retry_s` until the store takes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from adapters.codec import decode_event
from adapters.embedded import MqttEndpoint
from adapters.mqtt_payloads import command_id_of, event_for
from adapters.redis_store import plan_summary_json
from controller.errors import InvalidEvent, Refused, StoreUnavailable
from controller.events import Event
from controller.planning.plan import Plan
from controller.state import FleetState

log = logging.getLogger(__name__)

RECONNECT_DELAYS_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # the back-off starts again after a good session
# Keep-alive: the client pings after this long without traffic and gives the connection up when
# no answer came within as long again, so a half-open connection is left within ~2x this
# (aiomqtt's default, 60 s, let one linger for up to two minutes).
KEEPALIVE_S = 10
# The connect (TCP, CONNACK) and the set-up after it (subscriptions, retained re-publishes) each
# have this long; one that takes longer is given up and retried. (aiomqtt's own time-out, 10 s,
# still bounds each wait for CONNACK, SUBACK or PUBACK.) Generous: on an event loop that lags by
# seconds a tighter bound gave up connects that would have succeeded.
CONNECT_TIMEOUT_S = 30.0
# Received messages waiting for the service. At the few hundred events per second the service
# applies on a small machine, 1,000 is a few seconds of waiting: fresher than a longer queue.
INBOX_SIZE = 1_000
SPOOL_SIZE = 10_000  # parsed events waiting for the store to come back
DROP_LOG_EVERY_S = 10.0  # at most one log line per this many seconds about drops


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
        # Last-value telemetry: a retained copy replayed on subscribe re-syncs a reconnected
        # controller (idempotent ids, stale values refused); events and commands never.
        self.last_value = (
            f"{self.prefix}/vehicle/+/soc",
            f"{self.prefix}/vehicle/+/departure",
            f"{self.prefix}/price",
            f"{self.prefix}/site/headroom",
            f"{self.prefix}/site/load",
        )

    def is_last_value(self, topic: str) -> bool:
        """Whether `topic` is a telemetry topic whose retained value may be replayed."""
        return any(aiomqtt.Topic(topic).matches(pattern) for pattern in self.last_value)

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

    `counters`: `received`, `dropped` (inbox full), `inbox_max` (largest backlog seen),
    `resynced` (retained telemetry accepted on subscribe), `spooled` (events kept while the
    store was down), `spool_resubmitted`, `spool_dropped` (spool full: lost, logged at ERROR),
    `connection_lost` (a session or a connect attempt ended by the broker or the network),
    `connect_timeouts` (a connect or its set-up took longer than `connect_timeout_s`),
    `subscriptions_refused` (a topic the broker would not subscribe the link to, logged),
    `session_errors` (a session ended by any other exception, logged with its traceback: the
    link reconnects all the same; it only ends when cancelled).
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        prefix: str,
        *,
        client_id: str = "voltpool-controller",
        persistent_session: bool = False,
        inbox_size: int = INBOX_SIZE,
        spool_size: int = SPOOL_SIZE,
        retry_s: float = 0.5,
        keepalive_s: int = KEEPALIVE_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        if inbox_size < 1 or spool_size < 1:
            raise ValueError(f"inbox_size and spool_size must be >= 1: {inbox_size}, {spool_size}")
        if retry_s <= 0:
            raise ValueError(f"retry_s must be > 0, got {retry_s}")
        if keepalive_s < 1 or connect_timeout_s <= 0:
            raise ValueError(
                f"keepalive_s must be >= 1 and connect_timeout_s > 0: {keepalive_s}, "
                f"{connect_timeout_s}"
            )
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._late: set[asyncio.Future[aiomqtt.Client]] = set()  # connects given up
        self._closing: set[asyncio.Future[None]] = set()  # ... and their connections closing
        self._endpoint = endpoint
        self.topics = Topics(prefix)
        self._submit: Callable[[Event], Awaitable[None]] | None = None
        self._reject: Callable[[str, ValueError], Awaitable[None]] | None = None
        self._client_id = client_id
        self._persistent = persistent_session
        self._client: aiomqtt.Client | None = None
        self._retained: dict[str, str] = {}
        self._inbox: asyncio.Queue[tuple[float, aiomqtt.Message]] = asyncio.Queue()
        self.inbox_waits_s: deque[float] = deque(maxlen=10_000)  # arrival -> handling
        self._inbox_size = inbox_size
        self._spool: deque[Event] = deque()
        self._spool_size = spool_size
        self._retry_s = retry_s
        self._flushed_at = float("-inf")  # monotonic time of the last attempt to flush
        self._drop_logged_at = -DROP_LOG_EVERY_S
        self.counters: Counter[str] = Counter()
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

    @property
    def backlog(self) -> int:
        """Messages received and not yet handled."""
        return self._inbox.qsize()

    @property
    def spooled(self) -> int:
        """Events waiting for the store to come back."""
        return len(self._spool)

    async def run(self) -> None:
        """Connect, subscribe, re-publish retained topics and consume, reconnecting on loss."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._work())
            tasks.create_task(self._connect_forever())

    async def _connect_forever(self) -> None:
        """Run sessions until cancelled: whatever ends one, wait and connect again.

        The wait grows along `RECONNECT_DELAYS_S` while attempts fail and starts again from
        the first after a session that was up (subscribed and re-published)."""
        attempt = 0
        while True:
            was_up = self.connections
            try:
                await self._session()
                reason = "the broker ended the session"
            except aiomqtt.MqttError as exc:
                self.counters["connection_lost"] += 1
                reason = str(exc) or type(exc).__name__
                if exc.__cause__ is not None:  # e.g. paho's keep-alive time-out
                    reason += f": {exc.__cause__}"
            except TimeoutError:
                self.counters["connect_timeouts"] += 1
                reason = f"connect or set-up took over {self._connect_timeout_s:.0f} s"
            except Exception as exc:  # never let the link die: log, count, reconnect
                self.counters["session_errors"] += 1
                reason = f"unexpected {type(exc).__name__}: {exc}"
                log.error("MQTT session ended by an unexpected error", exc_info=exc)
            finally:
                self.connected.clear()
                self._client = None
            if self.connections > was_up:
                attempt = 0
            delay = RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)]
            attempt += 1
            log.warning("MQTT connection lost (%s); reconnecting in %.1f s", reason, delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection: connect, subscribe, re-publish the retained topics, then queue what
        arrives until the connection ends (by raising)."""
        will = aiomqtt.Will(
            self.topics.status, json.dumps({"state": "offline"}), qos=1, retain=True
        )
        client = aiomqtt.Client(
            self._endpoint.host,
            self._endpoint.port,
            username=self._endpoint.username,
            password=self._endpoint.password,
            identifier=self._client_id,
            will=will,
            clean_session=not self._persistent,
            tls_context=self._endpoint.tls_context,
            keepalive=self._keepalive_s,
        )
        await self._open(client)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                # One SUBSCRIBE for every topic and the retained re-publishes side by side: on
                # a lagging event loop each round trip costs the lag.
                granted = await client.subscribe([(topic, 1) for topic in self.topics.inputs])
                self._check_granted(granted)
                await asyncio.gather(
                    *(
                        client.publish(topic, payload, qos=1, retain=True)
                        for topic, payload in list(self._retained.items())
                    )
                )
            self._client = client
            self.connections += 1
            self.connected.set()
            async for message in client.messages:
                self._enqueue(message)
        finally:
            self._client = None
            await _leave(client)

    def _check_granted(self, granted: Sequence[int | ReasonCode]) -> None:
        """Log (ERROR) and count each subscription the broker refused (an ACL, say): the
        controller would not hear that topic."""
        for topic, code in zip(self.topics.inputs, granted, strict=False):
            value = code.value if isinstance(code, ReasonCode) else int(code)
            if value >= 0x80:
                self.counters["subscriptions_refused"] += 1
                log.error("the MQTT broker refused the subscription to %s (code %#x)", topic, value)

    async def _open(self, client: aiomqtt.Client) -> None:
        """Connect `client` within `connect_timeout_s`.

        aiomqtt bounds the wait for CONNACK but not the TCP connect, which it runs in the
        loop's default executor (busy threads there delay it). A connect given up is left to
        finish in the background and closed as soon as it does, so that no connection the
        link forgot stays open (its last will would later say `offline`)."""
        entering = asyncio.ensure_future(client.__aenter__())
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await asyncio.shield(entering)
        except BaseException:
            if not entering.done():
                self._late.add(entering)
                entering.add_done_callback(self._close_late)
            raise

    def _close_late(self, entering: asyncio.Future[aiomqtt.Client]) -> None:
        """A connect given up has finished: close the connection it may have opened."""
        self._late.discard(entering)
        if entering.cancelled() or entering.exception() is not None:
            return
        closing = asyncio.ensure_future(_leave(entering.result()))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def _enqueue(self, message: aiomqtt.Message) -> None:
        """Queue a received message; drop (and count) telemetry when the inbox is full."""
        self.counters["received"] += 1
        if self._inbox.qsize() >= self._inbox_size and str(message.topic) != self.topics.command:
            self.counters["dropped"] += 1
            now = time.monotonic()
            if now - self._drop_logged_at >= DROP_LOG_EVERY_S:
                self._drop_logged_at = now
                log.warning(
                    "MQTT inbox full (%d): dropping telemetry, %d dropped so far",
                    self._inbox_size,
                    self.counters["dropped"],
                )
            return
        self._inbox.put_nowait((time.perf_counter(), message))
        self.counters["inbox_max"] = max(self.counters["inbox_max"], self._inbox.qsize())

    async def _work(self) -> None:
        """Handle queued messages in order; while events are spooled, retry them every
        `retry_s` even when nothing arrives."""
        while True:
            if self._spool:
                try:
                    async with asyncio.timeout(self._retry_s):
                        arrived, message = await self._inbox.get()
                except TimeoutError:
                    await self._flush_spool()
                    continue
            else:
                arrived, message = await self._inbox.get()
            self.inbox_waits_s.append(time.perf_counter() - arrived)
            await self._handle(message)

    async def _handle(self, message: aiomqtt.Message) -> None:
        if self._submit is None or self._reject is None:
            raise RuntimeError("MqttLink.attach() was not called before run()")
        if message.retain:
            if not self.topics.is_last_value(str(message.topic)):
                # A retained event or command would be replayed at every reconnect.
                await self._reject("mqtt", ValueError(f"retained message on {message.topic}"))
                return
            self.counters["resynced"] += 1
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
        await self._deliver(event)

    async def _deliver(self, event: Event) -> None:
        """Submit the event after any spooled ones; spool it when the store is down.

        While events are spooled the store is tried at most once per `retry_s` (each try may
        wait out the client's reconnect attempts), so arrivals are not held up meanwhile."""
        if self._spool and time.monotonic() - self._flushed_at >= self._retry_s:
            await self._flush_spool()
        if self._spool:
            self._keep(event)
            return
        try:
            await self._submit_one(event)
        except StoreUnavailable:
            self._keep(event)

    async def _submit_one(self, event: Event) -> None:
        assert self._submit is not None
        try:
            await self._submit(event)
        except Refused as refusal:
            log.info("refused %s from MQTT: %s", event.event_id, refusal.reason)

    def _keep(self, event: Event) -> None:
        if not self._spool:
            self._flushed_at = time.monotonic()  # the store just failed: wait before retrying
        if len(self._spool) >= self._spool_size:
            lost = self._spool.popleft()
            self.counters["spool_dropped"] += 1
            log.error(
                "MQTT spool full (%d) while the store is down: %s is lost",
                self._spool_size,
                lost.event_id,
            )
        self._spool.append(event)
        self.counters["spooled"] += 1

    async def _flush_spool(self) -> None:
        """Resubmit spooled events in order; stop at the first the store still cannot take."""
        self._flushed_at = time.monotonic()
        while self._spool:
            try:
                await self._submit_one(self._spool[0])
            except StoreUnavailable:
                return
            self._spool.popleft()
            self.counters["spool_resubmitted"] += 1

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
        text = await asyncio.to_thread(plan_summary_json, plan)  # built once, off the loop
        await self._link.publish(self._link.topics.schedule, text, retain=True)


async def _leave(client: aiomqtt.Client) -> None:
    """Disconnect `client`; a connection already lost, or lost while disconnecting, is fine."""
    try:
        await client.__aexit__(None, None, None)
    except Exception as exc:  # the connection is being dropped either way
        log.debug("MQTT disconnect: %s", exc)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
