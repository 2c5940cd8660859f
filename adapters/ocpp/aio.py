"""Small asyncio helpers for the OCPP adapter and the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
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
