"""The controller's Redis client keeps a bounded pool (`RedisEndpoint.client`): a burst of
concurrent commands (every handler at once after a Redis restart) waits for connections
instead of opening one each and keeping them for the life of the process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from adapters import redis_keys as keys
from adapters.bootstrap import COMMIT_CONNECTIONS
from adapters.embedded import MAX_CONNECTIONS, redis_endpoint
from adapters.ocpp.transactions import TransactionBook
from adapters.redis_store import RedisFleetStore
from tests.conftest import T0
from tests.factories import soc_reported


def _pool_size(client: object) -> int:
    pool = client.connection_pool  # type: ignore[attr-defined]
    return len(pool._available_connections) + len(pool._in_use_connections)


async def test_a_burst_of_commands_shares_a_bounded_pool(tmp_path: Path) -> None:
    """Twice the pool's bound of concurrent commands all succeed, with text replies, and the
    pool never holds more than its bound; a smaller bound is kept too."""
    async with redis_endpoint(None, tmp_path) as endpoint:
        client = endpoint.client()
        try:
            await client.set("k", "v")
            replies = await asyncio.gather(*(client.get("k") for _ in range(2 * MAX_CONNECTIONS)))
            assert replies == ["v"] * (2 * MAX_CONNECTIONS)
            assert 1 <= _pool_size(client) <= MAX_CONNECTIONS
        finally:
            await client.aclose()
        small = endpoint.client(max_connections=4)
        try:

            async def increment() -> list[Any]:
                async with small.pipeline(transaction=True) as pipe:
                    pipe.incr("n")
                    pipe.get("n")
                    return list(await pipe.execute())

            results = await asyncio.gather(*(increment() for _ in range(50)))
            assert sorted(int(r[0]) for r in results) == list(range(1, 51))
            assert _pool_size(small) <= 4
        finally:
            await small.aclose()


async def test_the_group_commits_do_not_wait_for_a_connection_of_the_shared_pool(
    tmp_path: Path,
) -> None:
    """With every connection of the shared pool busy, an append to the event log and a
    MeterValues ledger write still go through on the group commits' own client (as bootstrap
    wires them); on the shared client alone the same append waits for a connection."""
    sample = [
        {
            "timestamp": "2024-03-04T16:00:00Z",
            "sampledValue": [{"value": "10", "measurand": "Energy.Active.Import.Register"}],
        }
    ]
    async with redis_endpoint(None, tmp_path) as endpoint:
        shared = endpoint.client(max_connections=1)
        commits = endpoint.client(max_connections=COMMIT_CONNECTIONS)
        store = RedisFleetStore(shared, "pool", commits=commits)
        alone = RedisFleetStore(shared, "alone")
        book = TransactionBook(shared, "pool", commits=commits)
        # The consumer groups are made and the ledger's script loaded once, on the shared
        # client, before its connection is taken.
        await store.append(soc_reported("ev-1", 0.5, T0))
        await alone.append(soc_reported("ev-1", 0.5, T0))
        assert await book.record_samples(7, 1, sample) is None  # no transaction 7
        held = await shared.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(5):
                await store.append(soc_reported("ev-1", 0.6, T0))
                assert await book.record_samples(7, 1, sample) is None
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await alone.append(soc_reported("ev-1", 0.6, T0))
        finally:
            await shared.connection_pool.release(held)
            await shared.aclose()
            await commits.aclose()
        check = endpoint.client()
        try:
            assert await check.xlen(keys.events("pool")) == 2
        finally:
            await check.aclose()
