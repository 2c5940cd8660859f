"""Clocks: wall time in production, simulated time in tests and scenarios.

Both implement `controller.ports.Clock`. `SimClock` is a real clock whose time only moves when
told to: `advance()` wakes every sleeper whose deadline has come, in deadline order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta


class WallClock:
    """The system's clock, in UTC."""

    def now(self) -> datetime:
        """The current time."""
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        """Sleep until `when` (returns at once if it has passed)."""
        delay = (when - self.now()).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)


class SimClock:
    """A clock that moves only when `advance` (or `run_until`) is called."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError(f"SimClock start {start} has no time zone")
        self._now = start.astimezone(UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        """The simulated time."""
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        """Wait until simulated time reaches `when`."""
        if when <= self._now:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (when, next(self._seq), future))
        await future

    @property
    def next_deadline(self) -> datetime | None:
        """The earliest time a sleeper waits for, if any."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, delta: timedelta) -> None:
        """Move time forward by `delta`, waking sleepers in order and letting them run."""
        await self.run_until(self._now + delta)

    async def run_until(self, when: datetime) -> None:
        """Move time forward to `when`, stopping at every sleeper's deadline on the way."""
        await _settle()
        while True:
            deadline = self.next_deadline
            if deadline is None or deadline > when:
                break
            self._now = max(self._now, deadline)
            while self._sleepers and self._sleepers[0][0] <= self._now:
                _, _, future = heapq.heappop(self._sleepers)
                if not future.done():
                    future.set_result(None)
            await _settle()
        self._now = max(self._now, when)
        await _settle()


async def _settle(rounds: int = 20) -> None:
    """Let woken tasks run until they block again (a bounded number of loop turns)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def to_utc(at: datetime) -> datetime:
    """`at` in UTC; refuses naive datetimes."""
    if at.tzinfo is None:
        raise ValueError(f"{at} has no time zone")
    return at.astimezone(UTC)


__all__ = ["SimClock", "WallClock", "timedelta", "to_utc"]
