"""Small asyncio helpers for the OCPP adapter and the simulator."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")


async def stop_task(
    task: asyncio.Future[object] | asyncio.Task[object] | asyncio.Future[None],
) -> None:
    """Cancel a task and wait until it is done.

    Python 3.11's `asyncio.wait_for` (which the `ocpp` library awaits replies with) can swallow a
    cancellation that arrives together with the reply; the task then runs on to its next await.
    So the cancellation is repeated until the task has really finished.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


def redis_call(value: Awaitable[T] | T) -> Awaitable[T]:
    """redis-py types its commands as sync-or-async; on an asyncio client they are awaitable."""
    return cast(Awaitable[T], value)


class Metrics(Counter[str]):
    """Named counters that can be waited on (tests, benchmarks, health checks)."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(key, value)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Until `predicate()` holds, checked after every change.

        Raises:
            TimeoutError: not within `timeout_s`.
        """
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
