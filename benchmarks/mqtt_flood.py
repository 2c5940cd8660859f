"""M-11: a telemetry flood against the controller's MQTT link (bounded inbox, drops counted).

    .venv/bin/python benchmarks/mqtt_flood.py --rate 5000 --duration 60

A publisher in its own process sends `--rate` SoC readings per second (QoS 0, round-robin over
`--cars` plugged-in cars, each with a fresh `at`) for `--duration` wall seconds through a real
broker (Mosquitto when installed, else amqtt in a child process). The controller runs in this
process as in production: `MqttLink` (inbox of `--inbox` messages) -> `ControllerService` ->
embedded Redis with AOF -> planner (proportional share). Printed: offered, sent, received by the
link, dropped at the full inbox, lost between publisher and link, handled, inbox high-water mark,
events applied, plans made during the flood, the service's event-to-plan latency p50/p95/max
(the P-13 target is p95 <= 2 s), the time messages waited in the inbox, and CPU seconds of
this process. Shared 2-core machine: the
publisher and broker compete with the controller for CPU, so the figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.embedded import (
    MqttEndpoint,
    embedded_broker,
    free_port,
    redis_endpoint,
    until_listening,
)
from adapters.mqtt import MqttLink
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.clock import WallClock
from controller.domain import slot_floor
from controller.planning.plan import Plan
from controller.planning.planner import StatePlanner
from controller.planning.share import share_by_need
from controller.service import ControllerService
from controller.settings import Settings
from controller.state import FleetState
from tests.factories import flat_headroom, flat_prices, small_site

PREFIX = "flood"
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)


class PlanCounter:
    """A `PlanSink` that counts the plans made while the flood runs."""

    def __init__(self) -> None:
        self.made_at: list[float] = []

    async def publish(self, plan: Plan, state: FleetState) -> None:
        """Note when the plan went out."""
        self.made_at.append(time.perf_counter())


def _publisher(
    port: int, rate: int, duration_s: float, cars: int, sent: object, elapsed: object
) -> None:
    """Child process: publish `rate` readings per second for `duration_s` (paho, blocking
    client with its network thread: several times faster than an asyncio publisher)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="flood-publisher")
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    count = 0
    tick_s = 0.01
    per_tick = max(1, round(rate * tick_s))
    started = time.perf_counter()
    next_tick = started
    while time.perf_counter() - started < duration_s:
        at = datetime.now(UTC)
        for k in range(per_tick):
            car = count % cars + 1
            stamp = (at + timedelta(microseconds=k)).isoformat()
            payload = json.dumps({"at": stamp, "soc": 0.2 + (count % 50) / 100})
            client.publish(f"{PREFIX}/vehicle/ev-{car}/soc", payload, qos=0)
            count += 1
        next_tick += tick_s
        delay = next_tick - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    elapsed.value = time.perf_counter() - started  # type: ignore[attr-defined]
    client.loop_stop()
    client.disconnect()
    sent.value = count  # type: ignore[attr-defined]


def _amqtt_process(port: int, ready: object, stop: object) -> None:
    """Child process: an amqtt broker on `port` until `stop` is set."""

    async def serve() -> None:
        async with embedded_broker("127.0.0.1", port):
            ready.set()  # type: ignore[attr-defined]
            await asyncio.to_thread(stop.wait)  # type: ignore[attr-defined]

    asyncio.run(serve())


async def main(args: argparse.Namespace) -> None:
    """Start broker, controller and publisher; print the figures."""
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    broker: multiprocessing.process.BaseProcess | asyncio.subprocess.Process
    use_mosquitto = MOSQUITTO is not None and args.broker != "amqtt"
    with tempfile.TemporaryDirectory(prefix="voltpool-flood-") as tmp:
        if use_mosquitto:
            assert MOSQUITTO is not None
            config = Path(tmp) / "mosquitto.conf"
            config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
            broker = await asyncio.create_subprocess_exec(
                MOSQUITTO,
                "-c",
                str(config),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        else:
            ready = ctx.Event()
            broker = ctx.Process(target=_amqtt_process, args=(port, ready, stop))
            broker.start()
        try:
            await until_listening(port)
            async with redis_endpoint(None, Path(tmp)) as redis_ep:
                await run_controller(args, port, redis_ep.client(), ctx, use_mosquitto)
        finally:
            if isinstance(broker, asyncio.subprocess.Process):
                broker.terminate()
                await broker.wait()
            else:
                stop.set()
                broker.join(10)


async def run_controller(
    args: argparse.Namespace,
    port: int,
    redis: object,
    ctx: multiprocessing.context.SpawnContext,
    use_mosquitto: bool,
) -> None:
    """The controller side of the run."""
    clock = WallClock()
    plans = PlanCounter()
    service = ControllerService(
        store=RedisFleetStore(redis, "flood", policy=LogPolicy()),  # type: ignore[arg-type]
        clock=clock,
        planner=StatePlanner(solve=share_by_need),
        sink=plans,
        settings=Settings(site="flood"),
    )
    link = MqttLink(
        MqttEndpoint("127.0.0.1", port), PREFIX, client_id="flood-controller", inbox_size=args.inbox
    )
    link.attach(service.submit, service.reject_invalid)
    tasks = [asyncio.create_task(service.run()), asyncio.create_task(link.run())]
    try:
        now = clock.now() - timedelta(seconds=1)
        for event in [*small_site(now, cars=args.cars, capacity_kw=args.cars * 11.0)]:
            await service.submit(event)  # type: ignore[arg-type]
        slot = slot_floor(now)
        await service.submit(flat_headroom(now, slot, args.cars * 7.0))
        await service.submit(flat_prices(now, slot))
        await link.connected.wait()
        await service.settled()
        applied_before = service.counters.get("events_applied", 0)
        plans_before = len(plans.made_at)
        service.latencies_s.clear()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        sent, elapsed = ctx.Value("q", 0), ctx.Value("d", 0.0)
        publisher = ctx.Process(
            target=_publisher, args=(port, args.rate, args.duration, args.cars, sent, elapsed)
        )
        started = time.perf_counter()
        publisher.start()
        await asyncio.to_thread(publisher.join)
        flood_s = time.perf_counter() - started
        latencies = np.asarray(service.latencies_s)
        drain_started = time.perf_counter()
        while link.backlog and time.perf_counter() - drain_started < 120:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # the link has no "drained" event; poll its backlog
        async with asyncio.timeout(300):
            await service.applied()  # what the link handed over is in the log: apply it all
        drain_s = time.perf_counter() - drain_started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await redis.aclose()  # type: ignore[attr-defined]
    counters = link.counters
    received, dropped = counters["received"], counters["dropped"]
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    made = len(plans.made_at) - plans_before
    print(f"broker                    {'mosquitto' if use_mosquitto else 'amqtt'}")
    print(f"offered                   {args.rate:,} msg/s for {args.duration:.0f} s")
    rate = sent.value / max(elapsed.value, 1e-9)
    print(f"sent by the publisher     {sent.value:,} in {elapsed.value:.1f} s ({rate:,.0f} msg/s)")
    print(f"received by the link      {received:,}")
    print(f"lost before the link      {sent.value - received:,} (QoS 0, broker or socket)")
    print(f"dropped at the inbox      {dropped:,} (inbox {args.inbox:,})")
    print(f"handled                   {received - dropped:,}")
    print(f"inbox high-water mark     {counters['inbox_max']:,}")
    applied = service.counters.get("events_applied", 0) - applied_before
    print(f"events applied            {applied:,} ({applied / flood_s:,.0f}/s)")
    refused = {k: v for k, v in service.counters.items() if k.startswith("events_") and v}
    print(f"service counters          {refused}")
    print(f"plans made in the flood   {made} ({made / flood_s:.1f}/s)")
    if latencies.size:
        print(
            "event -> plan latency     "
            f"p50 {np.quantile(latencies, 0.5):.3f} s  p95 {np.quantile(latencies, 0.95):.3f} s"
            f"  max {latencies.max():.3f} s (P-13 target p95 <= 2 s)"
        )
    waits = np.asarray(link.inbox_waits_s)
    if waits.size:
        print(
            "inbox wait (arrival->handling, last 10,000)  "
            f"p50 {np.quantile(waits, 0.5):.3f} s  p95 {np.quantile(waits, 0.95):.3f} s"
            f"  max {waits.max():.3f} s"
        )
    print(f"backlog applied in        {drain_s:.1f} s after the flood")
    print(
        f"controller CPU            {cpu_s:.1f} s in {flood_s:.1f} s wall ({cpu_s / flood_s:.0%})"
    )
    print("shared 2-core machine: publisher, broker and controller compete; figures are noisy")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5000, help="messages per second")
    parser.add_argument("--duration", type=float, default=60.0, help="wall seconds of flood")
    parser.add_argument("--cars", type=int, default=100, help="plugged-in cars")
    parser.add_argument("--inbox", type=int, default=1_000, help="the link's inbox bound")
    parser.add_argument("--broker", choices=["auto", "amqtt"], default="auto")
    asyncio.run(main(parser.parse_args()))
