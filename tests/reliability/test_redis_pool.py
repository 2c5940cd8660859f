"""The controller's Redis client keeps a bounded pool (`RedisEndpoint.client`): a burst of
concurrent commands (every handler at once after a Redis restart) waits for connections
instead of opening one each and keeping them for the life of the process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from adapters.embedded import MAX_CONNECTIONS, redis_endpoint


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
