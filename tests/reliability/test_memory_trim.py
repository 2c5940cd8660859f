"""`adapters.memory`: free memory left inside glibc's malloc arenas (fragmentation: live
chunks above free ones keep the arena from shrinking) is given back by a trim."""

from __future__ import annotations

import asyncio

import pytest

from adapters.memory import malloc_trim, trim_every
from simulators.chaos import MEMORY_FIELDS, memory_breakdown


def _resident() -> dict[str, float]:
    return dict(zip(MEMORY_FIELDS, memory_breakdown(), strict=True))


def _fragment() -> list[bytearray]:
    """Allocate ~100 MiB of malloc chunks (above pymalloc's 512 bytes, below the mmap
    threshold) and free nine in ten: the survivors pin the arena's pages in between."""
    chunks = [bytearray(600 + (i * 7919) % 2000) for i in range(80_000)]
    return chunks[::10]


def test_a_trim_gives_back_the_free_memory_a_fragmented_heap_keeps() -> None:
    """The free chunks stay resident until `malloc_trim`, which releases most of them while
    the live ones stay."""
    if malloc_trim() is None:
        pytest.skip("not glibc: no malloc_trim")
    kept = _fragment()
    before = _resident()
    assert before["malloc_free"] > 40.0  # the freed 9/10 stayed inside the arena
    assert malloc_trim() is True
    after = _resident()
    assert before["rss"] - after["rss"] > 30.0
    assert after["malloc_used"] == pytest.approx(before["malloc_used"], abs=2.0)
    assert len(kept) == 8_000


async def test_the_periodic_trim_runs_until_cancelled() -> None:
    """`trim_every` releases a fragmented heap within its period and stops when cancelled;
    a period that is not positive is refused."""
    if malloc_trim() is None:
        pytest.skip("not glibc: no malloc_trim")
    with pytest.raises(ValueError, match="positive"):
        await trim_every(0.0)
    kept = _fragment()
    before = _resident()["rss"]
    task = asyncio.create_task(trim_every(0.05))
    await asyncio.sleep(0.5)
    assert before - _resident()["rss"] > 30.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(kept) == 8_000
