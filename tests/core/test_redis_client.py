"""The Redis client library must let a cancelled task end (redis-py 8.1 swallowed the cancel)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import cast

import pytest
from redis.asyncio import Redis


async def test_a_task_cancelled_inside_redis_commands_ends(redis: Redis) -> None:
    """Cancelled at arbitrary points of a stream of commands, the task always ends cancelled.

    With redis-py 8.1.0 the cancellation was sometimes swallowed inside `execute_command`, and
    a service loop cancelled at shutdown ran on forever; pyproject.toml pins below 8 for that.
    """

    async def busy(started: asyncio.Event, after: int) -> None:
        calls = 0
        while True:
            await cast(Awaitable[int], redis.hincrby("counters", "n", 1))
            calls += 1
            if calls == after:
                started.set()

    for round_ in range(30):
        started = asyncio.Event()
        task = asyncio.create_task(busy(started, 1 + round_ % 5))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await task
