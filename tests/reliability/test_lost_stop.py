"""An acknowledged StopTransaction lost under load (soak of 2026-11-27, "book: stopped, state:
open"): the consumer's read of new log entries answered on a connection that dropped.

redis-py re-sends a command whose connection failed (3 retries, `RedisEndpoint.client`). For
XREADGROUP `>` that is not harmless: the first one may have run (the entries are then pending
with this consumer and the group's last-delivered id is past them) and the second one hands
over the entries after them. The first ones waited in the pending list until a claim took them
over (60 s idle), or until the consumer read its pending list for another reason (the restart
check, an error it saw): applied out of order, a TransactionStarted after its own
TransactionStopped. The stop was refused ("no transaction to stop"), the start then applied:
the transaction stays open in the fleet state while the book has it stopped.

The lost reply is a real one (`tests.reliability.lost_reply.LostReplyProxy`: the server runs the
command, the proxy drops its answer and cuts the connection, as a kill -9 between the AOF write
and the reply does), on a real redis-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from adapters.embedded import RedisEndpoint
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.clock import SimClock
from controller.events import Event, TransactionStarted, TransactionStopped
from controller.planning.planner import StatePlanner
from controller.ports import LogEntry, Settlement
from controller.service import ControllerService
from controller.settings import Settings
from tests.conftest import T0
from tests.factories import PlanRecorder, small_site
from tests.reliability.lost_reply import LostReplyProxy
from tests.reliability.redis_process import RedisProcess

SITE = "depot"
TIMEOUT_S = 20.0


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[tuple[RedisProcess, LostReplyProxy]]:
    """A redis-server of its own (AOF, the embedded policy) behind a `LostReplyProxy`."""
    server = RedisProcess(tmp_path)
    server.start()
    proxy = LostReplyProxy(server.socket)
    await proxy.start()
    try:
        yield server, proxy
    finally:
        await proxy.close()
        server.stop()


def _events() -> list[Event]:
    """A depot of one car plugged in, then a transaction started on its charger."""
    site: list[Event] = small_site(T0, cars=1)  # type: ignore[assignment]
    start = TransactionStarted(
        event_id="cp-1:tx:7:start",
        at=T0 + timedelta(minutes=1),
        transaction_id=7,
        charger_id="cp-1",
        connector_id=1,
        id_tag="tag",
        meter_start_wh=1000.0,
    )
    return [*site, start]


async def _taken(store: RedisFleetStore) -> list[str]:
    """Take one batch and settle it (committed, no changes) as the consumer does; its event
    ids in the order taken."""
    batch: list[LogEntry] = list(await store.take(100))
    settled = await store.settle([Settlement(e, e.event.event_id) for e in batch if e.event])
    assert settled.error is None
    return [e.event.event_id for e in batch if e.event]


STOP = TransactionStopped(
    event_id="cp-1:tx:7:stop",
    at=T0 + timedelta(minutes=4),
    transaction_id=7,
    meter_stop_wh=12000.0,
    reason="EVDisconnected",
)


async def test_a_read_whose_reply_was_lost_hands_its_entries_over_on_the_retry(
    proxied: tuple[RedisProcess, LostReplyProxy],
) -> None:
    """The consumer's read of new entries runs, its reply is lost, the client re-sends it: the
    take still returns those entries, in order, and a later take the ones after them (on the
    old code the retry found nothing new and the entries stayed pending for a claim)."""
    _, proxy = proxied
    client = RedisEndpoint(url=proxy.url).client()
    try:
        store = RedisFleetStore(client, SITE, policy=LogPolicy(trim_every=0))
        await store.load()
        events = _events()
        await store.append_many(events)
        proxy.lose_reply_containing(events[0].event_id.encode())
        taken = await _taken(store)
        assert proxy.lost == 1
        assert taken == [e.event_id for e in events]
        await store.append(STOP)
        assert await _taken(store) == [STOP.event_id]
        assert await _taken(store) == []
    finally:
        await client.aclose()


async def test_a_read_lost_to_a_server_restart_is_handed_over_after_the_reload(
    proxied: tuple[RedisProcess, LostReplyProxy],
) -> None:
    """The soak's sequence: the read runs on the server (its AOF has the delivery), the server
    is killed -9 before the reply reaches the client and restarted, the client's retry reads
    the restarted server. The service had seen the outage elsewhere (an append refused while
    the server loaded) and reloaded its state, which noted the new server: the restart check
    had nothing left to see. The next takes must still hand over the lost read's entries
    before anything after them (on the old code: nothing, then only the stop)."""
    server, proxy = proxied
    client = RedisEndpoint(url=proxy.url).client()

    def restart() -> None:
        server.kill9()
        server.start()

    try:
        store = RedisFleetStore(client, SITE, policy=LogPolicy(trim_every=0), restart_check_s=0.0)
        await store.load()
        events = _events()
        await store.append_many(events)
        proxy.lose_reply_containing(events[0].event_id.encode(), then=restart)
        taken = await _taken(store)
        assert proxy.lost == 1
        await store.load()  # the service's reconcile after an outage it saw elsewhere
        await store.append(STOP)
        while batch := await _taken(store):
            taken += batch
        assert taken == [*(e.event_id for e in events), STOP.event_id]
    finally:
        await client.aclose()


async def test_the_service_records_a_stop_whose_start_was_read_in_a_lost_reply(
    proxied: tuple[RedisProcess, LostReplyProxy], clock: SimClock
) -> None:
    """End to end in the service: the start's delivery is lost, the stop follows; the fleet
    state stored in Redis has the transaction stopped and nothing was refused (on the old code
    the stop was refused, "no transaction 7 to stop", and the start waited for a claim)."""
    server, proxy = proxied
    client = RedisEndpoint(url=proxy.url).client()
    service = ControllerService(
        store=RedisFleetStore(client, SITE, policy=LogPolicy(trim_every=0)),
        clock=clock,
        planner=StatePlanner(),
        sink=PlanRecorder(),
        settings=Settings(site=SITE, coalesce_window_s=0.2),
        store_retry_s=0.05,
    )
    task = asyncio.create_task(service.run())
    try:
        *site, start = _events()
        for event in site:
            await service.submit(event)
        async with asyncio.timeout(TIMEOUT_S):
            await service.applied()
        proxy.lose_reply_containing(start.event_id.encode())
        await service.submit(start)
        async with asyncio.timeout(TIMEOUT_S):
            await service.applied()
        assert proxy.lost == 1
        await service.submit(STOP)
        async with asyncio.timeout(TIMEOUT_S):
            await service.applied()
        reader = RedisEndpoint(unix_socket=server.socket).client()
        try:
            stored = await RedisFleetStore(reader, SITE, consumer="reader").load()
        finally:
            await reader.aclose()
        transaction = stored.transactions.get(7)
        assert transaction is not None, "the start never reached the stored state"
        assert transaction.stopped_at == STOP.at
        assert service.counters.get("events_refused", 0) == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


async def test_entries_come_in_log_order_when_the_pending_list_is_longer_than_a_take(
    proxied: tuple[RedisProcess, LostReplyProxy],
) -> None:
    """Ten entries delivered and never settled (a lost read's, say), five more appended: takes
    of four hand them over in the log's order, the pending ones first, each once settled (the
    new ones read beside a full page of pending ones wait in the pending list)."""
    server, _ = proxied
    client = RedisEndpoint(unix_socket=server.socket).client()
    try:
        store = RedisFleetStore(client, SITE, policy=LogPolicy(trim_every=0))
        await store.load()
        first = small_site(T0, cars=3)[:10]
        await store.append_many(first)  # type: ignore[arg-type]
        assert len(await store.take(10)) == 10  # delivered, not settled
        more = small_site(T0, cars=2)[:5]
        await store.append_many(more)  # type: ignore[arg-type]
        taken: list[str] = []
        while True:
            batch: list[LogEntry] = list(await store.take(4))
            if not batch:
                break
            assert len(batch) <= 8
            settled = await store.settle(
                [Settlement(e, e.event.event_id) for e in batch if e.event]
            )
            assert settled.error is None
            taken += [e.event.event_id for e in batch if e.event]
        assert taken == [e.event_id for e in [*first, *more]]  # type: ignore[attr-defined]
    finally:
        await client.aclose()
