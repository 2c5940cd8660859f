"""The composition root: start servers and adapters, wire them into the service, shut down in order.

Only this module (and the CLI that calls it) knows which adapter implements which port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from adapters.embedded import (
    BrokerTls,
    MqttEndpoint,
    RedisEndpoint,
    mqtt_endpoint,
    redis_endpoint,
)
from adapters.forecast_feed import ForecastFeed
from adapters.memory import tune_malloc
from adapters.mqtt import MqttLink, MqttPlanPublisher
from adapters.ocpp.central import CentralSystem
from adapters.ocpp.config import LeaseConfig, OcppConfig
from adapters.ocpp.dispatcher import LeaseDispatcher
from adapters.redis_store import RedisFleetStore
from adapters.security.mqtt_acl import MqttCredentials, runtime_password_file
from adapters.solver_process import SolverProcess, SolverProcessConfig
from controller import failpoints
from controller.clock import WallClock
from controller.planning.plan import Plan
from controller.planning.planner import SolveFn, StatePlanner
from controller.planning.share import share_by_need
from controller.ports import Clock, PlanSink
from controller.service import ControllerService
from controller.settings import Settings
from controller.state import FleetState

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 10.0
# The group commits' own client: each keeps one pipeline in flight, and there are two.
COMMIT_CONNECTIONS = 4


class FanOutSink:
    """A `PlanSink` that hands each plan to several sinks in order (dispatch first)."""

    def __init__(self, sinks: Sequence[PlanSink]) -> None:
        self._sinks = list(sinks)

    def add(self, sink: PlanSink) -> None:
        """Add a sink after the existing ones."""
        self._sinks.append(sink)

    async def publish(self, plan: Plan, state: FleetState) -> None:
        """Publish to every sink; one failing sink does not keep the plan from the others."""
        for sink in self._sinks:
            try:
                await sink.publish(plan, state)
            except Exception:
                log.exception("plan sink %s failed", type(sink).__name__)


@dataclass
class Runtime:
    """What a running voltpool consists of, for the CLI, the demo and tests."""

    settings: Settings
    redis: RedisEndpoint
    mqtt: MqttEndpoint
    store: RedisFleetStore
    service: ControllerService
    link: MqttLink
    sink: FanOutSink
    central: CentralSystem
    dispatcher: LeaseDispatcher
    extra_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # The optimiser's worker process (None: the solve runs in the planner's thread).
    solver: SolverProcess | None = None


def default_solver() -> SolveFn:
    """The optimiser's fast exact path when it is installed, else the proportional share."""
    try:
        optimiser = importlib.import_module("controller.optimiser")
    except ImportError:  # the optimiser package is not part of this build
        return share_by_need
    solve: SolveFn | None = getattr(optimiser, "solve", None)
    return share_by_need if solve is None else solve


def planning_solver(settings: Settings, solver: SolveFn | None) -> SolveFn:
    """The solve the planner calls: `solver` (default: `default_solver()`) in a worker process
    when `settings.planning.solver_process` is on, else in the planner's thread.

    The proportional share stays in the thread: it is a few numpy passes, less than sending
    its problem to another process would cost. So does a solver a fresh interpreter cannot
    import by name (a closure, a lambda), with a warning.
    """
    solve = solver or default_solver()
    if not settings.planning.solver_process or solve is share_by_need:
        return solve
    try:
        return SolverProcess(
            solve,
            SolverProcessConfig(
                solve_deadline_s=settings.planning.solve_deadline_s,
                nice=settings.planning.solver_nice,
            ),
        )
    except ValueError as exc:
        log.warning("solving in the planner's thread: %s", exc)
        return solve


async def run(
    settings: Settings,
    *,
    clock: Clock | None = None,
    solver: SolveFn | None = None,
    on_ready: Callable[[Runtime], Awaitable[None]] | None = None,
) -> None:
    """Start everything, run until cancelled, then stop in reverse order."""
    failpoints.arm(settings.failpoint)
    malloc_tuned(settings)
    async with AsyncExitStack() as stack:
        redis_ep = await stack.enter_async_context(
            redis_endpoint(settings.redis_url, Path(settings.data_dir))
        )
        redis = redis_ep.client()
        stack.push_async_callback(redis.aclose)
        # The group commits that answers to chargers wait for (the event log's appends, the
        # MeterValues ledger) on connections of their own: in the shared pool, bounded at
        # MAX_CONNECTIONS, their pipelines queued behind every other command under load.
        commits = redis_ep.client(max_connections=COMMIT_CONNECTIONS)
        stack.push_async_callback(commits.aclose)
        store = RedisFleetStore(redis, settings.site, commits=commits)
        durability = await store.durability()
        if durability.get("appendonly") != "yes":
            log.warning(
                "redis runs without an append-only file (appendonly=%s): a crash of the server "
                "loses recent writes",
                durability.get("appendonly"),
            )
        mqtt_ep = await stack.enter_async_context(broker_endpoint(settings))
        sink = FanOutSink([])
        solve = planning_solver(settings, solver)
        solver_process = solve if isinstance(solve, SolverProcess) else None
        if solver_process is not None:
            solver_process.start()  # it imports numpy, scipy and HiGHS while the rest starts
            # Closed in a thread: it may wait up to a second for the worker to exit.
            stack.push_async_callback(asyncio.to_thread, solver_process.close)
        planner = StatePlanner(settings.planning, solve=solve)
        link = MqttLink(
            mqtt_ep,
            settings.mqtt_prefix,
            client_id=f"voltpool-{settings.site}",
            persistent_session=settings.mqtt_persistent_session,
        )
        service_clock = clock or WallClock()
        service = ControllerService(
            store=store,
            clock=service_clock,
            planner=planner,
            sink=sink,
            settings=settings,
            results=link,
        )
        link.attach(service.submit, service.reject_invalid)
        await service.start()
        central = CentralSystem(
            redis=redis,
            commits=commits,
            site=settings.site,
            sink=service,
            clock=service_clock,
            config=ocpp_config(settings),
            chargers=lambda charger_id: service.state.chargers.get(charger_id),
            vehicle_for_tag=lambda tag: tag if tag in service.state.vehicles else None,
        )
        dispatcher = LeaseDispatcher(
            central,
            service_clock,
            LeaseConfig(deadband_kw=settings.deadband_kw, lease_window_s=settings.lease_window_s),
            state=lambda: service.state,
        )
        sink.add(dispatcher)  # chargers first: operators read the schedule after it is sent
        sink.add(MqttPlanPublisher(link))
        await stack.enter_async_context(central)
        stack.push_async_callback(dispatcher.close)
        runtime = Runtime(
            settings,
            redis_ep,
            mqtt_ep,
            store,
            service,
            link,
            sink,
            central,
            dispatcher,
            solver=solver_process,
        )
        log.info(
            "voltpool site %r up: %d vehicles, %d chargers loaded",
            settings.site,
            len(service.state.vehicles),
            len(service.state.chargers),
        )
        stack.enter_context(collector_tuned(settings))
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(service.run())
            tasks.create_task(link.run())
            tasks.create_task(_publish_status(runtime))
            if settings.models_dir is not None:
                feed = ForecastFeed(
                    Path(settings.models_dir),
                    clock=service_clock,
                    submit=service.submit,
                    capacity_kw=settings.site_capacity_kw,
                    quantile=settings.planning.headroom_quantile,
                    slots=settings.planning.horizon_slots,
                )
                tasks.create_task(feed.run())
            if on_ready is not None:
                await link.connected.wait()
                await on_ready(runtime)


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of the event loop `Settings.event_loop` names: the standard library's (the
    default) or uvloop's (libuv)."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"unknown event loop {name!r}: uvloop or asyncio")


def malloc_tuned(settings: Settings) -> dict[str, bool] | None:
    """glibc malloc's parameters from the settings, before the servers' threads start (an
    arena already made stays); what glibc refused is logged. Process-wide and not undone."""
    threshold = settings.malloc_mmap_threshold_kib
    done = tune_malloc(
        arena_max=settings.malloc_arena_max or None,  # 0: glibc's own
        mmap_threshold_bytes=threshold * 1024 or None,
    )
    refused = [name for name, ok in (done or {}).items() if not ok]
    if refused:
        log.warning("glibc refused the malloc parameters %s", refused)
    return done


@contextlib.contextmanager
def collector_tuned(settings: Settings) -> Iterator[None]:
    """Python's cyclic garbage collector set for a long-running service, restored on exit.

    A full collection walks every tracked object. After start-up most of them (modules, the
    libraries' schemas and classes, the loaded state) live as long as the process, and with
    Python's thresholds (700, 10, 10) the soak at 1,000 chargers made a full collection every
    ~3 s of 0.3-0.6 s each, all on the event loop (docs/reliability.md). So what is alive now
    is frozen out of the collector's reach (`gc.freeze`; reference counting still frees it)
    and the collector runs less often (`settings.gc_thresholds`). On exit the objects are
    unfrozen and the thresholds put back, so a test process that starts many runtimes keeps
    collecting them.
    """
    previous = gc.get_threshold()
    if settings.gc_thresholds is not None:
        gc.set_threshold(*settings.gc_thresholds)
    if settings.gc_freeze:
        gc.collect()
        gc.freeze()
    try:
        yield
    finally:
        if settings.gc_freeze:
            gc.unfreeze()
        gc.set_threshold(*previous)


def broker_endpoint(settings: Settings) -> contextlib.AbstractAsyncContextManager[MqttEndpoint]:
    """The MQTT broker from the settings: `MQTT_URL`, or the embedded one (SEC-07).

    With `mqtt_password_file` the embedded broker authenticates every client and applies the
    topic ACLs; the controller's own principal gets a password made now, written with the
    file's other principals to `{data_dir}/mqtt/passwd` (mode 0600). Without it the broker is
    anonymous, which `embedded_broker` allows on a loopback host only; any other host also
    needs `mqtt_tls_cert` and `mqtt_tls_key`.

    Raises:
        ValueError: the embedded broker would be anonymous or in clear off loopback, or only
            one of certificate and key is set.
    """
    if settings.mqtt_url is not None:
        return mqtt_endpoint(settings.mqtt_url, ca_file=settings.mqtt_tls_ca)
    if (settings.mqtt_tls_cert is None) != (settings.mqtt_tls_key is None):
        raise ValueError("set both VOLTPOOL_MQTT_TLS_CERT and VOLTPOOL_MQTT_TLS_KEY, or neither")
    tls = None
    if settings.mqtt_tls_cert is not None and settings.mqtt_tls_key is not None:
        ca = Path(settings.mqtt_tls_ca) if settings.mqtt_tls_ca else None
        tls = BrokerTls(Path(settings.mqtt_tls_cert), Path(settings.mqtt_tls_key), ca)
    password_file = None
    credentials: MqttCredentials | None = None
    if settings.mqtt_password_file is not None:
        password_file = Path(settings.data_dir) / "mqtt" / "passwd"
        credentials = runtime_password_file(Path(settings.mqtt_password_file), password_file)
    return mqtt_endpoint(
        None,
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        password_file=password_file,
        prefix=settings.mqtt_prefix,
        tls=tls,
        credentials=credentials,
    )


def ocpp_config(settings: Settings) -> OcppConfig:
    """The central system's configuration from the settings (TLS when a certificate is set)."""
    context = None
    if settings.ocpp_tls_cert and settings.ocpp_tls_key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(settings.ocpp_tls_cert, settings.ocpp_tls_key)
    return OcppConfig(
        host=settings.ocpp_host,
        port=settings.ocpp_port,
        require_auth=settings.ocpp_require_auth,
        ssl_context=context,
        bcrypt_rounds=settings.ocpp_bcrypt_rounds,
        max_event_ahead_s=settings.max_event_ahead_s,
    )


async def _publish_status(runtime: Runtime) -> None:
    """Keep the retained status topic current (online, counters, last plan)."""
    while True:
        service = runtime.service
        plan = service.last_plan
        await runtime.link.publish(
            runtime.link.topics.status,
            {
                "state": "online",
                "site": runtime.settings.site,
                "counters": dict(service.counters),
                "vehicles": len(service.state.vehicles),
                "plugged_in": sum(1 for v in service.state.vehicles.values() if v.plugged_in),
                "last_plan_at": plan.made_at.isoformat() if plan else None,
                "fallback": plan.fallback if plan else None,
                "chargers_online": len(runtime.central.online()),
                "chargers_not_following": sorted(runtime.dispatcher.not_following),
                # received, dropped (inbox full), inbox_max, resynced, spooled, spool_dropped
                "mqtt": dict(runtime.link.counters),
                # solves, worker_starts, worker_deaths, timeouts, solve_errors, start_failures
                "solver_process": dict(runtime.solver.counters) if runtime.solver else None,
                "store_down_since": (
                    service.store_down_since.isoformat() if service.store_down_since else None
                ),
            },
            retain=True,
        )
        _raise_if_cancel_swallowed()
        await asyncio.sleep(STATUS_INTERVAL_S)


def _raise_if_cancel_swallowed() -> None:
    """Raise CancelledError if this task was cancelled and the cancellation got lost.

    Python 3.11's `asyncio.wait_for` (under aiomqtt's QoS 1 publish) can swallow a cancellation
    that arrives with the awaited answer, and a `TaskGroup` cancels its tasks only once when
    its parent is cancelled: the status task then ran on and the service never stopped (a soak's
    controller hung at its stop, 2026-11-27). The task's `cancelling()` count still shows it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
