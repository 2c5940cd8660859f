"""What glibc malloc's tuning (`Settings.malloc_*`, `adapters.memory.tune_malloc`) costs.

Each applied event copies the fleet-state tables it changes; at 1,000 chargers the vehicles
table (~4,000 rows) is ~104 KB and the transactions table up to ~148 KB. With the mmap
threshold at 64 KiB every such copy is an `mmap`/`munmap` pair and its page faults instead of
a chunk from an arena. This script copies dicts of those sizes, as the reducer does, in a
fresh interpreter per configuration (malloc's parameters are the process's), and prints the
time per copy and the memory left behind, with the ratio to glibc's own parameters measured
in the same run.

    .venv/bin/python benchmarks/malloc_tuning.py [--rows 4000] [--copies 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

_CHILD = """
import sys, time
from adapters.memory import tune_malloc
from simulators.chaos import MEMORY_FIELDS, memory_breakdown

rows, copies, arena_max, threshold_kib = (int(a) for a in sys.argv[1:5])
tune_malloc(
    arena_max=arena_max or None,
    mmap_threshold_bytes=threshold_kib * 1024 or None,
)
table = {f"ev-{n}": (n, float(n)) for n in range(rows)}
small = {f"cp-{n}": n for n in range(rows // 4)}
keep = []
started = time.perf_counter()
for n in range(copies):
    # As the reducer: a new table with one row changed, the old one dropped; a smaller
    # table (the chargers) copied beside it, and now and then something that stays.
    copy = dict(table)
    copy[f"ev-{n % rows}"] = (n, 0.0)
    table = copy
    other = dict(small)
    if n % 50 == 0:
        keep.append(bytearray(2048))
elapsed = time.perf_counter() - started
mem = dict(zip(MEMORY_FIELDS, memory_breakdown(), strict=True))
print(elapsed / copies * 1e6, mem["rss"], mem["malloc_free"], len(keep), len(other))
"""


def _run(rows: int, copies: int, arena_max: int, threshold_kib: int) -> tuple[float, float, float]:
    args = [str(rows), str(copies), str(arena_max), str(threshold_kib)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True
    )
    us, rss, free, *_ = (float(x) for x in done.stdout.split())
    return us, rss, free


def main() -> None:
    """Print µs per copy, RSS and free-but-kept memory, tuned and not, with ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--copies", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configs = {"glibc's own": (0, 0), "arena_max 2, mmap 64 KiB": (2, 64)}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in configs}
    for _ in range(args.rounds):  # interleaved, so drift in the machine's load hits both
        for name, (arena_max, threshold) in configs.items():
            results[name].append(_run(args.rows, args.copies, arena_max, threshold))
    base = statistics.median(r[0] for r in results["glibc's own"])
    print(f"{args.rows} rows, {args.copies} copies, median of {args.rounds} rounds")
    print(f"{'':28} {'us/copy':>8} {'ratio':>6} {'RSS MiB':>8} {'free MiB':>9}")
    for name, runs in results.items():
        us = statistics.median(r[0] for r in runs)
        rss = statistics.median(r[1] for r in runs)
        free = statistics.median(r[2] for r in runs)
        print(f"{name:28} {us:8.1f} {us / base:6.2f} {rss:8.1f} {free:9.1f}")


if __name__ == "__main__":
    main()
