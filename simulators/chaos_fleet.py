"""The simulated chargers of the full-stack soak, in a process of their own.

    python -m simulators.chaos_fleet JOB.json RESULT.json   (started by `StackSoak.run`)

`StackSoak.run` (simulators/chaos.py) starts one such process per share of the fleet, so the
controller's process runs the controller alone and a round trip no longer waits behind the
simulator's own work. The job file gives the soak's `SoakConfig`, the charger indices of this
share, the central system's URL, the broker and the first `Pace` (simulated time at the wall's
speed while the fleet connects). The two sides speak in JSON lines, those of this process on
its stdout prefixed with `@fleet `:

1. this process connects its chargers and prints `{"online": n}`;
2. the soak sends `{"go": pace}` on stdin: from `pace.wall0` on both sides' `PacedClock`s
   read `sim0 + (time.time() - wall0) * speed`, so they agree on the time without talking
   again;
3. this process drives its cars (arrival: the departure time published over MQTT, then
   StartTransaction; departure: StopTransaction), drops `drop_fraction_per_min` of its
   sockets each `minute_s` without a close frame, and samples its own event-loop lag
   (`LoopLag`), CPU and RSS;
4. at `wall0 + wall_s` (and once its dropped chargers are back) it writes RESULT.json (its
   ledger, counters, socket-drop records, loop lag, the chargers' loop lag during each round
   trip) and prints `{"done": true}`, then closes its connections and ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from adapters.ocpp.aio import stop_task
from simulators.chaos import (
    FLEET_LINE,
    PACE_SHARE,
    FaultRecord,
    Ledger,
    LedgerChargePoint,
    LoopLag,
    Pace,
    PacedClock,
    Publisher,
    SoakConfig,
    Visit,
    connect_chargers,
    cpu_s,
    fleet_visits,
    ledger_chargers,
    rss_mib,
    sim_car,
    until,
)
from simulators.chargepoints.chargepoint import FleetStats


def emit(message: dict[str, Any]) -> None:
    """One protocol line to the soak (stdout)."""
    sys.stdout.write(FLEET_LINE + json.dumps(message) + "\n")
    sys.stdout.flush()


class ChargerFleetProcess:
    """One share of the soak's chargers, driven on a simulated clock paced by the wall."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.config = SoakConfig.from_json(job["config"])
        self.url = str(job["url"])
        self.broker_host, self.broker_port = job["broker"]
        self.topic_prefix = str(job["topic_prefix"])
        self.shard = int(job["shard"])
        first, count = int(job["first"]), int(job["count"])
        self.indices = range(first, first + count)
        self.clock = PacedClock(Pace.from_json(job["connect"]))
        self.ledger = Ledger()
        self.stats = FleetStats()
        self.lag = LoopLag()
        self.chargers: list[LedgerChargePoint] = []
        self.faults: list[FaultRecord] = []
        self.visits: dict[int, list[Visit]] = defaultdict(list)
        for visit in fleet_visits(
            self.config.chargers,
            self.config.start,
            self.config.sim_hours,
            self.config.seed,
            self.config.visits,
        ):
            if visit.charger_index in self.indices:
                self.visits[visit.charger_index].append(visit)
        self.publisher: Publisher | None = None
        self._t0 = 0.0

    def _wall(self) -> float:
        return time.time() - self._t0

    async def _drive(self, charger: LedgerChargePoint, visits: Sequence[Visit]) -> None:
        """One charger's day: its cars arrive and leave on the simulated clock."""
        assert self.publisher is not None
        for visit in visits:
            await self.clock.sleep_until(visit.arrival)
            now = self.clock.now().isoformat()
            await self.publisher.publish(
                f"vehicle/{visit.vehicle_id}/departure",
                {
                    "at": now,
                    "departure": visit.departure.isoformat(),
                    "target_soc": visit.target_soc,
                },
            )
            await charger.arrive(sim_car(visit))
            await self.clock.sleep_until(visit.departure)
            await charger.leave()

    async def _drop_one(self, charger: LedgerChargePoint) -> FaultRecord:
        record = FaultRecord("socket drop", self._wall(), detail=charger.spec.charger_id)
        sessions = len(charger.connected_at)
        await charger.drop()
        record.recovery_s = await until(
            lambda: len(charger.connected_at) > sessions and charger.online.is_set(),
            self.config.recovery_timeout_s,
        )
        return record

    async def _drops(self) -> None:
        """`drop_fraction_per_min` of this share's sockets in each wall minute, at random,
        all within the simulated span (`PACE_SHARE` of the run): after it the clocks stand
        still, and a dropped charger's back-off, on the simulated clock, would never end."""
        config = self.config
        if config.drop_fraction_per_min <= 0:
            return
        rng = random.Random(config.seed + 1 + self.shard)
        minutes = max(1, round(config.wall_s / config.minute_s))
        per_minute = max(1, round(config.drop_fraction_per_min * len(self.indices)))
        span = config.wall_s * PACE_SHARE
        schedule = sorted(
            min((minute + rng.random()) * span / minutes, span * 0.98)
            for minute in range(minutes)
            for _ in range(per_minute)
        )
        drops: list[asyncio.Task[FaultRecord]] = []
        for at in schedule:
            pause = at - self._wall()
            if pause > 0:
                await asyncio.sleep(pause)
            online = [c for c in self.chargers if c.online.is_set()]
            if online:
                drops.append(asyncio.create_task(self._drop_one(rng.choice(online))))
        self.faults += await asyncio.gather(*drops)

    async def _trim_stats(self) -> None:
        """The chargers' own round-trip list is not needed (the ledger keeps them compactly)."""
        while True:
            self.stats.rtt_s.clear()
            await asyncio.sleep(5.0)

    async def run(self, result_path: Path) -> None:
        """Connect, wait for the go, run the soak window, write the result."""
        config = self.config
        tasks: list[asyncio.Task[None]] = []
        background = [
            asyncio.create_task(self.lag.watch()),
            asyncio.create_task(self._trim_stats()),
        ]
        try:
            self.chargers = ledger_chargers(
                config, self.indices, self.clock, self.ledger, self.stats
            )
            await connect_chargers(
                self.chargers,
                self.url,
                tasks,
                connects_per_s=config.connects_per_s / config.charger_processes,
                stats=self.stats,
            )
            emit({"online": len(self.chargers)})
            line = await asyncio.to_thread(sys.stdin.readline)
            go = Pace.from_json(json.loads(line)["go"])
            self.clock.add(go)
            self.publisher = Publisher(self.broker_host, int(self.broker_port), self.topic_prefix)
            await asyncio.sleep(max(0.0, go.wall0 - time.time()))
            self._t0 = go.wall0
            self.lag.clear()
            ledger = self.ledger  # the connect phase is not measured
            del ledger.rtt_at[:], ledger.rtt_s[:], ledger.queued_s[:], ledger.rtt_kind[:]
            cpu0, rss0 = cpu_s(), rss_mib()
            drivers = [
                asyncio.create_task(self._drive(self.chargers[i - self.indices.start], visits))
                for i, visits in sorted(self.visits.items())
            ]
            drops = asyncio.create_task(self._drops())
            await asyncio.sleep(max(0.0, config.wall_s - self._wall()))
            await drops
            cpu = cpu_s() - cpu0
            for task in drivers:
                await stop_task(task)
            ledger = self.ledger
            rtt_lag = self.lag.worst_between(
                np.asarray(ledger.rtt_at) - np.asarray(ledger.rtt_s), np.asarray(ledger.rtt_at)
            )
            result = {
                "ledger": ledger.to_json(),
                "rtt_charger_lag_s": rtt_lag.tolist(),
                "lag_s": list(self.lag.lag_s),
                "stats": {
                    "answered": dict(self.stats.answered),
                    "errors": dict(self.stats.errors),
                    "sent": dict(self.stats.sent),
                    "connects": self.stats.connects,
                },
                "faults": [asdict(f) for f in self.faults],
                "cpu_s": cpu,
                "rss_mib": [rss0, rss_mib()],
                "sim_reached": self.clock.now().isoformat(),
            }
            await asyncio.to_thread(result_path.write_text, json.dumps(result))
            emit({"done": True})
        finally:
            for task in tasks + background:
                task.cancel()
            for task in tasks + background:
                await stop_task(task)
            if self.publisher is not None:
                await self.publisher.close()


def main(argv: Sequence[str]) -> None:
    """Run the job file `argv[0]`, writing the result to `argv[1]`."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ocpp").setLevel(logging.CRITICAL)
    # aiomqtt warns at every publish while more than ten wait for the broker's PUBACK: a
    # thousand cars publishing their departures at once do that; the publisher retries.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    job = json.loads(Path(argv[0]).read_text())
    try:
        asyncio.run(ChargerFleetProcess(job).run(Path(argv[1])))
    except Exception as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
