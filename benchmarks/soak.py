"""Chaos soaks: the full stack through kill -9 of Redis, broker restarts and dropped sockets.

    .venv/bin/python benchmarks/soak.py --chargers 1000 --duration 600          # T-08, L-01, L-03
    .venv/bin/python benchmarks/soak.py --mode restart --chargers 1000          # S-12
    .venv/bin/python benchmarks/soak.py --mode log --duration 60 --producers 50 # event log only

`--mode stack` (default; RELIABILITY.md T-08, L-01..L-03): `--chargers` simulated charge points
(`simulators.chaos.LedgerChargePoint`: re-send StartTransaction/StopTransaction until answered,
keep a ledger of every CALLRESULT) in `--charger-processes` processes of their own
(`simulators.chaos_fleet`), against the controller wired as in production (OCPP central system
on real WebSockets, lease dispatcher, MQTT link, Redis store, planner) in this process, for
`--duration` wall seconds in which a simulated day (`--sim-hours`) passes; both sides derive
the simulated time from the wall (`simulators.chaos.PacedClock`). `--visits day`: each charger
gets an evening car (and half of them an afternoon one); `--visits steady`: car after car, as
many arriving as leaving (the memory check). Faults: `--kills` kill -9 of the redis-server (AOF
as the embedded server runs it, `appendfsync no`; restarted on the same files; the report
says how many AOF bytes the kill found only in the server's memory), `--broker-restarts`
restarts of the amqtt broker on its
port (both from this process), and `--drop-per-min` of the sockets dropped (no close frame)
each wall minute (in the chargers' processes). Printed: lost and duplicated transaction records
(the chargers' ledgers, sent back as JSON, against the transaction book, the fleet state and
the applied event ids; target 0 and 0), recovery after each fault, OCPP round trip p50/p99
measured at the chargers from the frame going out (all, outside fault windows, by action, and
with the chargers' own event loop calm), the wait behind a charger's own call in flight, both
processes' event-loop lag, re-plan event-to-profile (StartTransaction answered -> first
TxProfile for it) p50/p95, the controller process's RSS from 20 % of the run to its end with
the open transactions then, CPU and RSS of each process, the load average.
The controller process runs on `Settings.event_loop` (asyncio by default, as `voltpool run`
does; `--event-loop`). `--slow-callback-ms` lists its event-loop callbacks slower than that;
it times asyncio's own callbacks, so with it the controller runs on asyncio's loop.

`--mode restart` (S-12): every charger connected with a car charging, the controller stopped
for `--restart-down-s` simulated seconds and started again; the simulated seconds until every
charger is back and re-synced (TxDefaultProfile and ChargePointMaxProfile accepted again), and
the errors the chargers saw after the controller was up (thundering herd). The chargers run in
`--charger-processes` processes of their own, their simulated clocks moved from this process
in lock-step with the controller's: following the wall while the fleet connects, then from the
stop on one simulated second per step, each step ending when every charger is backing off or
back and re-synced (at most `--restart-settle-wall-s`; the steps that hit that cap are
counted, since in them this machine's speed decided how far the fleet got); the clocks stand
still while the controller stops and starts.

`--mode log`: the event log alone (R-02, R-03): `--producers` writers append events through
`RedisFleetStore.append`, each retrying the *same* event until acknowledged; one consumer takes,
applies and commits; the server is killed `--kills` times. `--no-aof` is the control run that
must lose events, which shows the comparison can fail.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
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

from adapters.bootstrap import event_loop_factory
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.errors import StoreUnavailable
from controller.events import SocReported
from controller.planning.share import share_by_need
from controller.settings import Settings
from controller.state import FleetState, apply_event
from simulators.chaos import CALM_LAG_S, MEMORY_FIELDS, SoakConfig, SoakReport, StackSoak
from tests.factories import small_site
from tests.reliability.redis_process import RedisProcess

SITE = "soak"
T0 = datetime(2024, 3, 4, 16, 0, tzinfo=UTC)


def memory_parts(report: SoakReport, from_s: float) -> str:
    """What the controller's RSS was made of at `from_s` and at the end
    (`simulators.chaos.MEMORY_FIELDS`); "" without samples."""
    after = [m for m in report.memory_mib if m[0] >= from_s]
    if len(after) < 2:
        return ""
    first, last = after[0][1:], after[-1][1:]
    return ", ".join(
        f"{name} {a:.1f} -> {b:.1f}"
        for name, a, b in zip(MEMORY_FIELDS, first, last, strict=True)
        if name != "rss"
    )


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


def print_log_result(result: dict[str, Any]) -> bool:
    """The event-log soak's figures; True when nothing was lost or doubled."""
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    ok = bool(result["lost"] == 0 and result["duplicated"] == 0)
    print("RESULT", "PASS (0 lost, 0 duplicated)" if ok else "FAIL")
    return ok


def _ms(figures: dict[str, float], *names: str) -> str:
    if not figures:
        return "n/a"
    return " / ".join(f"{figures[n]:.1f}" for n in names) + f" ms (n={int(figures['n'])})"


def stack_rows(report: SoakReport, args: argparse.Namespace) -> tuple[list[tuple[str, str]], bool]:
    """The full-stack soak's figures as (name, value) rows, and whether every target is met."""
    verdict = report.verdict
    assert verdict is not None
    config = report.config
    rows: list[tuple[str, str]] = [
        ("chargers", f"{config.chargers}"),
        ("controller's event loop", args.event_loop),
        (
            "wall / simulated",
            f"{report.wall_s:.0f} s / {config.sim_hours:g} h (x{config.speed:.0f}), "
            f"reached {report.sim_reached[:19]}",
        ),
        (
            "solver",
            f"{args.solver}, "
            + (
                "in a worker process"
                if report.solver_cpu_s is not None
                else "in the controller process (planner's thread)"
            ),
        ),
        (
            "transaction records compared",
            f"{verdict.starts} starts, {verdict.stops} stops, {verdict.meter_values} MeterValues",
        ),
        ("lost", f"{verdict.lost}"),
        ("duplicated", f"{verdict.duplicated}"),
        ("recorded, never acknowledged", f"{verdict.unacknowledged}"),
    ]
    for detail in verdict.details:
        rows.append(("  detail", detail))
    redis_ok = True
    for fault in report.faults:
        if fault.kind == "socket drop":
            continue
        recovered = "NOT RECOVERED" if fault.recovery_s is None else f"{fault.recovery_s:.2f} s"
        if fault.kind.startswith("redis") and (fault.recovery_s is None or fault.recovery_s > 5):
            redis_ok = False
        rows.append((f"{fault.kind} at {fault.at_s:.0f} s", f"{recovered} ({fault.detail})"))
    drops = [f.recovery_s for f in report.faults if f.kind == "socket drop"]
    back = [d for d in drops if d is not None]
    if drops:
        rows.append(
            (
                "socket drops",
                f"{len(drops)}, back online p50 {np.median(back):.2f} s, max "
                f"{max(back):.2f} s, not back {len(drops) - len(back)}"
                if back
                else f"{len(drops)}, none back",
            )
        )
    rtt, calm, quiet = report.rtt_ms, report.rtt_outside_faults_ms, report.rtt_calm_ms
    rows += [
        ("OCPP round trip p50/p99/max", _ms(rtt, "p50", "p99", "max")),
        ("  outside fault windows", _ms(calm, "p50", "p99", "max")),
        (
            f"  ... and chargers' loop lag < {1000 * CALM_LAG_S:.0f} ms",
            _ms(quiet, "p50", "p99", "max"),
        ),
    ]
    for action, figures in report.rtt_by_action_ms.items():
        rows.append((f"  {action} (outside faults)", _ms(figures, "p50", "p99", "max")))
    for action, figures in report.handled_ms.items():
        # The central system's share: from its router to the answer written (whole run).
        rows.append((f"  {action}: handled in", _ms(figures, "p50", "p99", "max")))
    rows += [
        (
            "wait for the charger's own call before",
            _ms(report.queued_ms, "p50", "p99", "max"),
        ),
        ("controller loop lag p50/p99/max", _ms(report.controller_lag_ms, "p50", "p99", "max")),
        ("chargers' loop lag p50/p99/max", _ms(report.charger_lag_ms, "p50", "p99", "max")),
    ]
    replan = report.event_to_profile_s
    rows.append(
        (
            "re-plan event -> profile p50/p95",
            f"{replan['p50']:.2f} / {replan['p95']:.2f} s (n={int(replan['n'])}), "
            f"{report.transactions_without_profile} transactions without a TxProfile"
            if replan
            else "n/a",
        )
    )
    growth = report.rss_growth(0.2 * report.wall_s)
    if growth is not None:
        opened = report.open_between(0.2 * report.wall_s)
        rows.append(
            (
                "controller RSS from 20 % of the run to the end",
                f"{growth[0]:.0f} -> {growth[1]:.0f} MiB ({growth[2]:+.1f} %)"
                + (f"; open transactions {opened[0]} -> {opened[1]}" if opened else ""),
            )
        )
        parts = memory_parts(report, 0.2 * report.wall_s)
        if parts:
            rows.append(("  ... made of (20 % -> end, MiB)", parts))
        pool = [n for t, n in report.redis_connections if t >= 0.2 * report.wall_s]
        if pool:
            rows.append(
                (
                    "  ... Redis connections (20 % -> end, max)",
                    f"{pool[0]} -> {pool[-1]}, {max(n for _, n in report.redis_connections)}",
                )
            )
    wall = max(report.wall_s, 1e-9)
    rows += [
        (
            "CPU of the controller process",
            f"{report.cpu_s:.0f} s = {100 * report.cpu_s / wall:.0f} % of one core",
        ),
        (
            "CPU of the solver process",
            "n/a (none)"
            if report.solver_cpu_s is None
            else f"{report.solver_cpu_s:.0f} s = {100 * report.solver_cpu_s / wall:.0f} % "
            f"of one core; {dict(report.solver_counters)}",
        ),
        (
            "CPU of the charger processes",
            ", ".join(f"{c:.0f} s = {100 * c / wall:.0f} %" for c in report.charger_cpu_s) or "n/a",
        ),
        (
            "RSS of the charger processes",
            ", ".join(f"{a:.0f} -> {b:.0f} MiB" for a, b in report.charger_rss_mib) or "n/a",
        ),
        ("load average (1, 5, 15 min) at the end", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("CALLs answered", f"{sum(report.calls.values())} {report.calls}"),
        ("charger errors", f"{report.charger_errors}"),
        ("transaction messages re-sent", f"{report.retries}"),
        ("MeterValues answered with an error", f"{report.meter_values_unanswered}"),
        ("controller counters", f"{report.service_counters}"),
        ("dispatcher counters", f"{report.dispatch_counters}"),
        ("feed publishes retried (broker down)", f"{report.mqtt_publish_failures}"),
        ("plans still in memory at the end", f"{report.live_plans} {report.plan_holders}"),
    ]
    for line in report.memory_growth:
        rows.append(("  memory grew at", line))
    for line in report.slow_callbacks:
        rows.append(("  slow callbacks", line))
    p99_target = 100.0 if config.chargers <= 1000 else 250.0
    targets = {
        "0 lost, 0 duplicated": verdict.ok,
        f"p99 <= {p99_target:.0f} ms outside faults": bool(calm) and calm["p99"] <= p99_target,
        "re-plan p95 <= 2 s": bool(replan) and replan["p95"] <= 2.0,
        "Redis recovery <= 5 s": redis_ok,
        "RSS growth < 10 %": growth is not None and growth[2] < 10.0,
    }
    for name, met in targets.items():
        rows.append(("target " + name, "met" if met else "NOT MET"))
    missed = sum(1 for met in targets.values() if not met)
    rows.append(
        (
            "exit status",
            "0 lost / 0 duplicated decides it"
            + (f"; {missed} of {len(targets)} targets not met" if missed else ""),
        )
    )
    return rows, verdict.ok


def restart_rows(report: SoakReport) -> tuple[list[tuple[str, str]], bool]:
    """The S-12 figures as rows, and whether the run meets S-12 (`RestartFigures.failures`:
    every charger back and re-synced within 90 s simulated, no error after the controller was
    up, 0 lost and 0 duplicated)."""
    r = report.restart
    assert r is not None
    verdict = report.verdict
    wall = max(report.wall_s, 1e-9)
    rows = [
        (
            "chargers (transactions running)",
            f"{r.chargers} ({r.transactions_running}), in {r.charger_processes} "
            "process(es) of their own",
        ),
        (
            "controller down",
            f"{r.down_sim_s:g} s simulated (stop, steps, start: {r.down_wall_s:.1f} s wall; "
            f"{r.down_steps_at_cap} steps ended by the cap)",
        ),
        ("all online again after", f"{_sim(r.all_online_sim_s)} simulated (from ready)"),
        ("all re-synced after", f"{_sim(r.all_resynced_sim_s)} simulated (from ready)"),
        (
            "not re-synced",
            f"{r.not_resynced}" + (f" {list(r.not_resynced_ids)}" if r.not_resynced else ""),
        ),
        (
            "simulated-second steps",
            f"{r.steps}, {r.steps_at_cap} of them ended by the {r.settle_cap_wall_s:g} s wall "
            f"cap (not settled); slowest step {r.step_wall_s_max:.2f} s wall",
        ),
        (
            "timeline (sim s: online / re-synced / backing off)",
            "; ".join(f"{t:g}: {n} / {k} / {b}" for t, n, k, b in _thin(r.timeline)),
        ),
        ("charger errors while down", f"{r.errors_while_down}"),
        ("charger errors after ready (herd)", f"{r.errors_after_ready}"),
        ("connections made in the run", f"{r.connects}"),
        (
            "CPU: controller process / charger processes",
            f"{report.cpu_s:.0f} s / "
            + ", ".join(f"{c:.0f} s" for c in report.charger_cpu_s)
            + f" (run {wall:.0f} s wall)",
        ),
        ("load average (1, 5, 15 min) at the end", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]
    if verdict is not None:
        rows.append(("lost / duplicated", f"{verdict.lost} / {verdict.duplicated}"))
    failures = r.failures(verdict)
    rows.append(("S-12", "met" if not failures else "NOT MET: " + "; ".join(failures)))
    return rows, not failures


def _sim(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:g} s"


def _thin(
    timeline: tuple[tuple[float, int, int, int], ...], most: int = 12
) -> list[tuple[float, int, int, int]]:
    """At most `most` points of the timeline, the first and last kept."""
    if len(timeline) <= most:
        return list(timeline)
    picks = np.linspace(0, len(timeline) - 1, most).round().astype(int)
    return [timeline[int(i)] for i in sorted(set(picks))]


def _redis_server(workdir: Path) -> RedisProcess:
    return RedisProcess(workdir / "redis", aof=True)


async def run_stack(args: argparse.Namespace, *, restart: bool) -> SoakReport:
    """One full-stack soak (or the S-12 restart run)."""
    config = SoakConfig(
        chargers=args.chargers,
        wall_s=args.duration,
        sim_hours=args.sim_hours,
        redis_kills=args.kills,
        redis_down_s=args.down_s,
        broker_restarts=args.broker_restarts,
        broker_down_s=args.broker_down_s,
        drop_fraction_per_min=args.drop_per_min,
        meter_interval_s=args.meter_interval,
        heartbeat_s=args.heartbeat,
        connects_per_s=args.connects_per_s,
        restart_down_s=args.restart_down_s,
        restart_settle_wall_s=args.restart_settle_wall_s,
        restart_max_sim_s=args.restart_max_sim_s,
        coalesce_wall_s=args.coalesce_wall_s,
        trace_memory=args.trace_memory,
        census_memory=args.census,
        malloc_trim_s=args.malloc_trim_s,
        malloc_arena_max=args.malloc_arena_max,
        malloc_mmap_threshold_kib=args.malloc_mmap_threshold_kib,
        visits=args.visits,
        charger_processes=args.charger_processes,
        slow_callback_ms=args.slow_callback_ms,
        seed=args.seed,
        solver_process=not args.solver_in_thread,
    )
    solver = share_by_need if args.solver == "share" else None
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="voltpool-soak-") as workdir:
        soak = StackSoak(config, _redis_server(Path(workdir)), solver=solver, progress=progress)
        return await (soak.run_restart() if restart else soak.run())


def main() -> None:
    """Parse the arguments, run, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("stack", "restart", "log"), default="stack")
    parser.add_argument("--duration", type=float, help="wall seconds (stack 600, log 60)")
    parser.add_argument("--kills", type=int, default=3, help="kill -9 of redis-server")
    parser.add_argument("--down-s", type=float, default=0.5, help="time the server stays dead")
    stack = parser.add_argument_group("stack and restart modes")
    stack.add_argument("--chargers", type=int, default=1000)
    stack.add_argument("--sim-hours", type=float, default=24.0)
    stack.add_argument("--broker-restarts", type=int, default=2)
    stack.add_argument("--broker-down-s", type=float, default=1.0)
    stack.add_argument("--drop-per-min", type=float, default=0.05, help="share of sockets")
    stack.add_argument("--meter-interval", type=float, default=900.0, help="simulated s")
    stack.add_argument("--heartbeat", type=float, default=3600.0, help="simulated s")
    stack.add_argument("--connects-per-s", type=float, default=200.0)
    stack.add_argument(
        "--restart-down-s",
        type=float,
        default=10.0,
        help="restart mode: simulated seconds the controller stays stopped",
    )
    stack.add_argument(
        "--restart-settle-wall-s",
        type=float,
        default=10.0,
        help="restart mode: a simulated second's step waits at most this for the fleet to settle",
    )
    stack.add_argument(
        "--restart-max-sim-s", type=int, default=600, help="restart mode: give up after this"
    )
    stack.add_argument(
        "--solver",
        choices=("share", "optimiser"),
        default="optimiser",
        help="optimiser (default): as `voltpool serve` plans; share: the proportional share",
    )
    stack.add_argument(
        "--solver-in-thread",
        action="store_true",
        help="the optimiser in the planner's thread, not in a worker process (comparison)",
    )
    stack.add_argument("--coalesce-wall-s", type=float, default=0.3)
    stack.add_argument(
        "--trace-memory", action="store_true", help="tracemalloc: top growth sites (slow)"
    )
    stack.add_argument(
        "--census",
        action="store_true",
        help="objects by type at 20 %% of the run and at its end (two ~1 s pauses)",
    )
    stack.add_argument(
        "--malloc-trim-s",
        type=float,
        default=0.0,
        help="> 0: malloc_trim(0) in the controller process every this many seconds",
    )
    stack.add_argument(
        "--malloc-arena-max",
        type=int,
        default=None,
        help="glibc malloc: the most arenas in the controller process (0: glibc's own; "
        "default: Settings.malloc_arena_max)",
    )
    stack.add_argument(
        "--malloc-mmap-threshold-kib",
        type=int,
        default=None,
        help="glibc malloc: chunks from this size (KiB) on mapped alone (0: glibc's own; "
        "default: Settings.malloc_mmap_threshold_kib)",
    )
    stack.add_argument(
        "--visits", choices=("day", "steady"), default="day", help="pattern of the cars' visits"
    )
    stack.add_argument(
        "--charger-processes", type=int, default=1, help="processes the chargers run in"
    )
    stack.add_argument(
        "--slow-callback-ms",
        type=float,
        default=0.0,
        help="list the controller process's event-loop callbacks slower than this (diagnostic)",
    )
    stack.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        help="the controller process's event loop (default: Settings.event_loop, or asyncio "
        "with --slow-callback-ms)",
    )
    stack.add_argument("--seed", type=int, default=0)
    stack.add_argument("--json", help="also write the report as JSON to this file")
    log_mode = parser.add_argument_group("log mode")
    log_mode.add_argument("--producers", type=int, default=50)
    log_mode.add_argument("--vehicles", type=int, default=20)
    log_mode.add_argument("--rate", type=float, default=10.0, help="events/s per producer")
    log_mode.add_argument(
        "--no-aof", action="store_true", help="control run: RDB only, shows what AOF prevents"
    )
    args = parser.parse_args()
    if args.slow_callback_ms and args.event_loop not in (None, "asyncio"):
        # It times asyncio's own `Handle._run`, which uvloop's callbacks never go through.
        parser.error("--slow-callback-ms needs --event-loop asyncio")
    if args.event_loop is None:
        args.event_loop = "asyncio" if args.slow_callback_ms else Settings().event_loop
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    # The ocpp library logs every CALLERROR it answers (InternalError while Redis is down)
    # with a traceback: thousands in a run. They are counted by the chargers instead.
    logging.getLogger("ocpp").setLevel(logging.CRITICAL)
    if args.mode == "log":
        args.duration = args.duration or 60.0
        ok = print_log_result(asyncio.run(run(args)))
        sys.exit(0 if ok else 1)
    args.duration = args.duration or 600.0
    # The controller process runs on the loop `voltpool run` runs on (Settings.event_loop).
    with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
        report = runner.run(run_stack(args, restart=args.mode == "restart"))
    rows, ok = restart_rows(report) if args.mode == "restart" else stack_rows(report, args)
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(report), default=str, indent=1))
    print("RESULT", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
