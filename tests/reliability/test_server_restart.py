"""A Redis server restarted between two of the consumer's calls (Guarantee 1, R-02).

The client reconnects on its own, so no call fails and nothing tells the service. Under the
embedded server's `appendfsync no` a kill -9 loses nothing acknowledged; an external server at
`everysec` can lose its last second, and the consumer's state in memory would then hold writes
the server no longer has. The store notices the new server (its INFO run_id) at the next take
and the service reloads the committed state, as after any outage. The lost write is made here
by deleting the record after the restart: the same state a lost AOF tail leaves.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from adapters import redis_keys as keys
from adapters.embedded import RedisEndpoint
from adapters.ocpp.aio import redis_call
from adapters.redis_store import RedisFleetStore
from controller.clock import SimClock
from controller.errors import StoreUnavailable
from tests.conftest import T0
from tests.factories import soc_reported
from tests.reliability.redis_process import RedisProcess, service_on_server

SITE = "depot"
WINDOW = timedelta(seconds=0.2)
TIMEOUT_S = 20.0


async def test_the_store_tells_a_restarted_server_from_the_one_it_loaded_from(
    tmp_path: Path,
) -> None:
    """A take after kill -9 and restart raises StoreUnavailable naming the restart (counted);
    the reload notes the new server and the next take goes through. Without the check (None)
    the same take goes through at once, as before."""
    server = RedisProcess(tmp_path)
    server.start()
    client = RedisEndpoint(unix_socket=server.socket).client()
    try:
        store = RedisFleetStore(client, SITE, restart_check_s=0.0)
        unchecked = RedisFleetStore(client, SITE, consumer="other", restart_check_s=None)
        await store.load()
        await unchecked.load()
        assert await store.take(10) == []
        server.kill9()
        server.start()
        assert await unchecked.take(10) == []  # reconnects; nothing seen
        with pytest.raises(StoreUnavailable, match="redis server changed"):
            await store.take(10)
        assert (await store.counters()).get("store_server_restarts") == 1
        await store.load()
        assert await store.take(10) == []
    finally:
        await client.aclose()
        server.stop()


async def test_the_service_reloads_its_state_when_the_server_restarted_unseen(
    tmp_path: Path, clock: SimClock
) -> None:
    """Three cars applied; the server restarts without a failed call and comes back without
    ev-1's record. The next event makes the service reload: its state no longer has ev-1 (it
    had it in memory), the event is applied on the reloaded state, a recovery is counted."""
    async with service_on_server(
        tmp_path,
        clock,
        SITE,
        cars=3,
        coalesce_window_s=WINDOW.total_seconds(),
        timeout_s=TIMEOUT_S,
        restart_check_s=0.0,
    ) as run:
        service, server, client = run.service, run.server, run.client
        async with asyncio.timeout(TIMEOUT_S):
            assert {"ev-1", "ev-2", "ev-3"} <= set(service.state.vehicles)
            recoveries = service.counters.get("store_recoveries", 0)
            server.kill9()
            server.start()
            # What an everysec server's lost AOF tail looks like: a record it acknowledged.
            assert await redis_call(client.hdel(keys.table(SITE, "vehicle"), "ev-1")) == 1
            await service.submit(soc_reported("ev-2", 0.5, clock.now()))
            await service.applied()
        assert "ev-1" not in service.state.vehicles
        assert service.state.vehicles["ev-2"].soc == pytest.approx(0.5)
        assert service.counters.get("store_recoveries", 0) == recoveries + 1


async def test_a_batch_taken_before_the_server_died_is_taken_again_first(
    tmp_path: Path,
) -> None:
    """The batch consumer takes entries (they are pending for it), then the server dies before
    it reads which of them were applied. After the restart the next take hands the same
    entries over at once: read as our own pending ones, not left for a claim minutes later
    (the soak lost 89 records that way: applied after the run, or stale by then)."""
    server = RedisProcess(tmp_path)
    server.start()
    client = Redis(unix_socket_path=server.socket, retry=Retry(NoBackoff(), 0))
    try:
        store = RedisFleetStore(client, SITE, restart_check_s=None)
        await store.load()
        for n in range(3):
            await store.append(soc_reported("ev-1", 0.1 * (n + 1), T0))
        taken = await store.take(10)
        assert len(taken) == 3
        server.kill9()
        with pytest.raises(StoreUnavailable):
            await store.applied_among([e.event.event_id for e in taken if e.event is not None])
        server.start()
        again = await store.take(10)
        assert [e.entry_id for e in again] == [e.entry_id for e in taken]
    finally:
        await client.aclose()
        server.stop()
