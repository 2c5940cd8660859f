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

With `"mode": "restart"` in the job (S-12, `StackSoak.run_restart`) the chargers' clock is a
`SimClock` that only the soak moves, so the two processes are in lock-step however fast each
runs; this process carries out the soak's lines on stdin in order from its start:

- `{"to": t}`: move the clock to simulated time t (every 50 ms while the soak follows the
  wall as the fleet connects; from the controller's stop on, one second a step);
- `{"arrive": true}`: every charger's first car plugs in (StartTransaction re-sent until
  answered);
- `{"reject_profiles": true}` (after the controller's stop, with `restart_rejecting`): the
  first chargers of the fleet reject every SetChargingProfile from now on (never re-sync);
- `{"status": {"since": t or null, "wait_s": w}}`: wait up to w wall seconds until every
  charger is backing off or back and re-synced since t (`simulators.chaos.fleet_settled`),
  then print `{"status": ...}` (`FleetStatus`: online, re-synced, backing off, errors, ...);
- `{"end": true}`: write RESULT.json as above, print `{"done": true}` and end.

It prints `{"online": n}` once its chargers are connected, as in the stack mode.
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
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from adapters.ocpp.aio import stop_task
from controller.clock import SimClock
from controller.ports import Clock
from simulators.chaos import (
    FLEET_LINE,
    PACE_SHARE,
    FaultRecord,
    FleetStatus,
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
    fleet_settled,
    fleet_status,
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
        # stack mode: a clock paced by the wall; restart mode (S-12): a `SimClock` the soak
        # moves through the control channel.
        self.restart = job.get("mode") == "restart"
        self.sim_clock = SimClock(self.config.start)
        self.paced = None if self.restart else PacedClock(Pace.from_json(job["connect"]))
        self.clock: Clock = self.sim_clock if self.paced is None else self.paced
        self._arrivals: list[asyncio.Task[None]] = []
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
        self._rss0 = 0.0

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

    def _result(self, cpu: float) -> dict[str, Any]:
        """What the soak collects from this process at the end (`StackSoak._collect`)."""
        ledger = self.ledger
        rtt_lag = self.lag.worst_between(
            np.asarray(ledger.rtt_at) - np.asarray(ledger.rtt_s), np.asarray(ledger.rtt_at)
        )
        return {
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
            "rss_mib": [self._rss0, rss_mib()],
            "sim_reached": self.clock.now().isoformat(),
        }

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
            assert self.paced is not None
            self.paced.add(go)
            self.publisher = Publisher(self.broker_host, int(self.broker_port), self.topic_prefix)
            await asyncio.sleep(max(0.0, go.wall0 - time.time()))
            self._t0 = go.wall0
            self.lag.clear()
            ledger = self.ledger  # the connect phase is not measured
            del ledger.rtt_at[:], ledger.rtt_s[:], ledger.queued_s[:], ledger.rtt_kind[:]
            cpu0, self._rss0 = cpu_s(), rss_mib()
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
            result = self._result(cpu)
            await asyncio.to_thread(result_path.write_text, json.dumps(result))
            emit({"done": True})
        finally:
            for task in tasks + background:
                task.cancel()
            for task in tasks + background:
                await stop_task(task)
            if self.publisher is not None:
                await self.publisher.close()

    # -- S-12: the restart, this process's clock moved by the soak --

    async def _arrive(self) -> None:
        """Every charger's first car plugs in (the messages re-sent until answered)."""
        for index, visits in sorted(self.visits.items()):
            charger = self.chargers[index - self.indices.start]
            self._arrivals.append(asyncio.create_task(charger.arrive(sim_car(visits[0]))))

    async def _status(self, since: datetime | None, wait_s: float) -> FleetStatus:
        """This share's status, once it has settled since `since` or after `wait_s` wall s."""
        began = time.perf_counter()
        if since is not None and wait_s > 0:
            await until(lambda: fleet_settled(self.chargers, since), wait_s)
        return fleet_status(
            self.chargers,
            self.sim_clock.now(),
            since,
            waited_s=time.perf_counter() - began,
            arriving=sum(1 for task in self._arrivals if not task.done()),
            ledger=self.ledger,
            stats=self.stats,
        )

    async def _obey(self, control: asyncio.StreamReader) -> None:
        """Carry out the soak's control lines in order until `{"end": true}`: `to` (move the
        clock to that simulated time), `arrive` (the first cars plug in), `status` (answer
        with a `FleetStatus` line once settled or after `wait_s`), `reject_profiles` (the
        first `restart_rejecting` chargers of the fleet reject every profile from now on)."""
        while True:
            line = await control.readline()
            if not line:
                raise RuntimeError("the soak closed the control channel")
            message = json.loads(line)
            if "to" in message:
                await self.sim_clock.run_until(datetime.fromisoformat(message["to"]))
            elif "arrive" in message:
                await self._arrive()
            elif "reject_profiles" in message:
                for index in self.indices:
                    if index < self.config.restart_rejecting:
                        self.chargers[index - self.indices.start].faults.reject_profiles = True
            elif "status" in message:
                asked = message["status"]
                since = None if asked["since"] is None else datetime.fromisoformat(asked["since"])
                status = await self._status(since, float(asked["wait_s"]))
                emit({"status": status.to_json()})
            elif "end" in message:
                return
            else:
                raise ValueError(f"unknown control line {message!r}")

    async def run_restart(self, result_path: Path) -> None:
        """S-12: connect while the soak moves the clock, then obey its control lines (the cars
        plug in, the controller restarts, the soak steps the clock) until it ends the run;
        write the result."""
        config = self.config
        tasks: list[asyncio.Task[None]] = []
        background = [asyncio.create_task(self.lag.watch())]
        loop = asyncio.get_running_loop()
        control = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(control), sys.stdin)
        cpu0, self._rss0 = cpu_s(), rss_mib()
        try:
            self.chargers = ledger_chargers(
                config, self.indices, self.clock, self.ledger, self.stats
            )
            obeying = asyncio.create_task(self._obey(control))
            background.append(asyncio.create_task(self._trim_stats()))
            connecting = asyncio.create_task(
                connect_chargers(
                    self.chargers,
                    self.url,
                    tasks,
                    connects_per_s=config.connects_per_s / config.charger_processes,
                    stats=self.stats,
                )
            )
            await asyncio.wait({obeying, connecting}, return_when=asyncio.FIRST_COMPLETED)
            if obeying.done():  # the control channel failed before the fleet was online
                await stop_task(connecting)
                await obeying
                raise RuntimeError("the soak ended the run before the fleet was online")
            await connecting
            emit({"online": len(self.chargers)})
            await obeying
            result = self._result(cpu_s() - cpu0)
            await asyncio.to_thread(result_path.write_text, json.dumps(result))
            emit({"done": True})
        finally:
            for task in self._arrivals + tasks + background:
                task.cancel()
            for task in self._arrivals + tasks + background:
                await stop_task(task)


def main(argv: Sequence[str]) -> None:
    """Run the job file `argv[0]`, writing the result to `argv[1]`."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ocpp").setLevel(logging.CRITICAL)
    # aiomqtt warns at every publish while more than ten wait for the broker's PUBACK: a
    # thousand cars publishing their departures at once do that; the publisher retries.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    job = json.loads(Path(argv[0]).read_text())
    try:
        fleet = ChargerFleetProcess(job)
        run = fleet.run_restart if fleet.restart else fleet.run
        asyncio.run(run(Path(argv[1])))
    except Exception as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
