"""`adapters.memory`: free memory left inside glibc's malloc arenas (fragmentation: live
chunks above free ones keep the arena from shrinking) is given back by a trim, and is not
left there by large chunks once the mmap threshold is fixed (`tune_malloc`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from adapters.bootstrap import malloc_tuned
from adapters.memory import malloc_trim, trim_every, tune_malloc
from controller.settings import Settings
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


_CHURN = """
import sys
from adapters.memory import tune_malloc
from simulators.chaos import MEMORY_FIELDS, memory_breakdown

if sys.argv[1] == "tuned":
    assert tune_malloc(mmap_threshold_bytes=64 * 1024) == {"mmap_threshold_bytes": True}
if sys.argv[1] == "settings":  # as `voltpool serve` starts
    from adapters.bootstrap import malloc_tuned
    from controller.settings import Settings

    done = malloc_tuned(Settings(malloc_mmap_threshold_kib=64, malloc_arena_max=2))
    assert done == {"arena_max": True, "mmap_threshold_bytes": True}, done
now = lambda: dict(zip(MEMORY_FIELDS, memory_breakdown(), strict=True))
one = bytearray(200 * 1024)  # above the default threshold (128 KiB): mapped alone
del one  # freed: glibc raises its threshold to 200 KiB, unless it was set
before = now()
tables = [bytearray(200 * 1024) for _ in range(150)]  # 30 MiB of 200 KiB copies
after = now()
print(after["rss_heap"] - before["rss_heap"], after["rss_anon"] - before["rss_anon"], len(tables))
"""


def _where_large_chunks_go(mode: str) -> tuple[float, float]:
    """In a fresh interpreter (malloc's parameters are the process's): MiB by which the
    `[heap]` and the other anonymous mappings grew for 30 MiB of 200 KiB chunks, allocated
    after one such chunk was freed."""
    done = subprocess.run(
        [sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True, timeout=60
    )
    heap, anon, count = done.stdout.split()
    assert count == "150"
    return float(heap), float(anon)


def test_a_fixed_mmap_threshold_keeps_large_chunks_out_of_the_arena() -> None:
    """By default glibc raises its mmap threshold to the size of a mapped chunk freed, so
    later chunks of that size (a copied 148 KB table) come from the arena, where their free
    space stays; with the threshold set (by hand, or from the settings as the composition
    root sets it) each is mapped alone (and unmapped when freed)."""
    if tune_malloc() is None:
        pytest.skip("not glibc: no mallopt")
    heap, anon = _where_large_chunks_go("default")
    assert heap > 25.0
    assert anon < 5.0
    for mode in ("tuned", "settings"):
        heap, anon = _where_large_chunks_go(mode)
        assert heap < 5.0
        assert anon > 25.0


def test_tune_malloc_refuses_values_mallopt_cannot_take() -> None:
    """Zero, negative and too large values are refused before reaching glibc."""
    for bad in (0, -1, 2**31):
        with pytest.raises(ValueError, match="arena_max"):
            tune_malloc(arena_max=bad)
    assert tune_malloc() in ({}, None)  # nothing asked, nothing set


def test_the_settings_default_to_two_arenas_and_a_64_kib_threshold_and_0_keeps_glibcs() -> None:
    """`voltpool serve` tunes malloc unless told not to: 0 leaves a parameter to glibc."""
    settings = Settings()
    assert (settings.malloc_arena_max, settings.malloc_mmap_threshold_kib) == (2, 64)
    assert malloc_tuned(Settings(malloc_arena_max=0, malloc_mmap_threshold_kib=0)) in ({}, None)
