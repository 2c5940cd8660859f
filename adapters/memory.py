"""Give the allocator's free memory back to the operating system, periodically.

The controller's Python objects stop growing once the fleet is up (the soak's census: the
allocated blocks flat from 20 % of the run to its end), yet its resident set kept growing: the
memory was free inside glibc's malloc arenas (`mallinfo2().fordblks`, +30 MiB in a 240 s soak)
and never returned, because glibc gives memory back only from the top of an arena, and the
churn of per-event copies leaves free chunks below live ones (docs/reliability.md, "RSS").
`malloc_trim(0)` releases every free page inside the arenas too (`madvise(MADV_DONTNEED)`), so
what the process holds resident is what it uses.

`tune_malloc` sets glibc's allocator parameters at start-up (`mallopt`): how many arenas
threads may spread over, and from which size a chunk gets a mapping of its own (given back to
the system when freed, instead of staying inside an arena as free memory).

Linux with glibc only; elsewhere `malloc_trim` and `tune_malloc` do nothing and say so.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)


def _libc_function(name: str, argtypes: list[type], restype: type) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's `name` with its C signature, or None where the C library lacks it (musl, macOS)."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function


_TRIM = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
_MALLOPT = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)

# glibc's <malloc.h> parameter numbers for mallopt.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def tune_malloc(
    *,
    arena_max: int | None = None,
    mmap_threshold_bytes: int | None = None,
    trim_threshold_bytes: int | None = None,
) -> dict[str, bool] | None:
    """Set glibc malloc's parameters for this process (None: leave one as it is); returns,
    per parameter set, whether glibc took it, or None when the C library has no `mallopt`.

    - `arena_max`: the most arenas threads spread over (glibc's default: 8 per core; each
      thread arena reserves 64 MiB and keeps what it freed).
    - `mmap_threshold_bytes`: chunks from this size on are mapped on their own and unmapped
      when freed. Setting it also stops glibc from raising it on its own (by default it rises
      to the size of every mapped chunk freed, up to 32 MiB, after which such chunks come from
      the arenas and their free space stays there).
    - `trim_threshold_bytes`: free memory at an arena's top above this is given back.

    Call it at start-up, before the threads that allocate are started: an arena made
    earlier is not undone by a lower `arena_max`.
    """
    wanted = {
        "arena_max": (M_ARENA_MAX, arena_max),
        "mmap_threshold_bytes": (M_MMAP_THRESHOLD, mmap_threshold_bytes),
        "trim_threshold_bytes": (M_TRIM_THRESHOLD, trim_threshold_bytes),
    }
    for name, (_, value) in wanted.items():
        if value is not None and not 0 < value < 2**31:
            raise ValueError(f"{name} must be a positive int below 2**31, not {value}")
    if _MALLOPT is None:
        if any(value is not None for _, value in wanted.values()):
            log.info("no mallopt in this C library: malloc parameters left as they are")
        return None
    done: dict[str, bool] = {}
    for name, (param, value) in wanted.items():
        if value is not None:
            done[name] = bool(_MALLOPT(param, value))
    if done:
        log.info("malloc tuned: %s", {k: wanted[k][1] for k in done})
    return done


def malloc_trim() -> bool | None:
    """Return the free memory of every malloc arena to the system now: True if some was
    released, False if none, None when the C library has no `malloc_trim` (not glibc)."""
    if _TRIM is None:
        return None
    return bool(_TRIM(0))


async def trim_every(period_s: float) -> None:
    """`malloc_trim` every `period_s` wall seconds until cancelled (returns at once without
    glibc). A trim walks the arenas' free chunks (about 0.3 ms per MiB free, measured: 113 ms
    for 397 MiB), so it runs in a worker thread: ctypes releases the interpreter lock for the
    call and the event loop goes on (an allocation from an arena being trimmed waits)."""
    if period_s <= 0:
        raise ValueError(f"period_s must be positive, not {period_s}")
    if _TRIM is None:
        log.info("no malloc_trim in this C library: free heap memory is not given back")
        return
    while True:
        await asyncio.sleep(period_s)
        await asyncio.to_thread(malloc_trim)
