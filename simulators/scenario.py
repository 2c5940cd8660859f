"""A simulated day through the real protocols: the controller, OCPP chargers, MQTT feeds, Redis.

One process holds everything, on one `SimClock`:

- the controller, started by `adapters.bootstrap.run` (embedded Redis and MQTT broker, the OCPP
  central system on a loopback port);
- N simulated charge points (`simulators.chargepoints`), connected over WebSockets with Basic
  auth, which meter what they deliver and follow the charging profiles they receive;
- the site's feeds over MQTT: day-ahead prices, the head-room forecast, the measured household
  load each slot; and each car's telematics: SoC and departure on arrival, SoC every half hour.

Time moves in steps. After each step the runner waits until the system is quiet again (every
message answered, every event applied, the plan made and dispatched), so a run does not depend
on how fast the machine is. What the chargers metered is the result; the controller's plan is
recorded beside it for comparison.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import aiomqtt
import numpy as np
from numpy.typing import NDArray

from adapters import bootstrap
from adapters.codec import encode_event
from adapters.ocpp.credentials import CredentialStore
from controller.clock import SimClock
from controller.domain import SLOT, ChargePoint, Connector, Site, Vehicle, slot_floor
from controller.events import ChargerRegistered, Event, SiteConfigured, VehicleRegistered
from controller.planning.planner import SolveFn
from controller.settings import PlanningSettings, Settings
from simulators.chargepoints.car import SimCar
from simulators.chargepoints.chargepoint import ChargerSpec, FleetStats, SimChargePoint

log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
PASSWORD_SECRET = "voltpool-simulation"  # derives each simulated charger's password


@dataclass(frozen=True, slots=True, kw_only=True)
class CarDay:
    """One car's stay at the depot: when it comes, with what, and what it needs when it goes."""

    vehicle_id: str
    model: str
    capacity_kwh: float
    arrival: datetime
    departure: datetime
    arrival_soc: float
    target_soc: float
    max_charge_kw: float = 11.0
    charge_efficiency: float = 0.92
    v2g: bool = False
    max_discharge_kw: float = 0.0

    def __post_init__(self) -> None:
        if self.departure <= self.arrival:
            raise ValueError(f"{self.vehicle_id}: departs before it arrives")
        if not 0.0 <= self.arrival_soc <= 1.0 or not 0.0 <= self.target_soc <= 1.0:
            raise ValueError(f"{self.vehicle_id}: SoC outside 0..1")

    @property
    def need_kwh(self) -> float:
        """Energy the battery must gain during the stay."""
        return max(0.0, (self.target_soc - self.arrival_soc) * self.capacity_kwh)


@dataclass(frozen=True, slots=True, kw_only=True)
class DayInputs:
    """Everything a simulated day needs, per 15-minute slot from `start`.

    The series cover the simulated span plus a day, because the controller plans 24 h ahead.
    `headroom_forecast_kw` is what the controller is told; `base_load_kw` is what the
    households really draw, so the real head-room is `site_capacity_kw - base_load_kw`.
    """

    start: datetime
    hours: float
    site_capacity_kw: float
    charger_kw: float
    price_eur_per_kwh: FloatArray  # (S,) S >= slots of the span + 96
    headroom_forecast_kw: FloatArray  # (S,)
    base_load_kw: FloatArray  # (S,)
    cars: tuple[CarDay, ...]
    v2g_mode: str = "none"
    # 1 for single-phase wallboxes: a 3-phase charger cannot go below 6 A x 3 x 230 V = 4.1 kW,
    # so a 3.6 kW (16 A single-phase) charger must say it has one phase.
    charger_phases: int = 3

    def __post_init__(self) -> None:
        if self.charger_phases not in (1, 3):
            raise ValueError("charger_phases must be 1 or 3")
        if self.start != slot_floor(self.start):
            raise ValueError("a scenario starts on a 15-minute boundary")
        need = int(np.ceil(self.hours * 4)) + 96
        for name in ("price_eur_per_kwh", "headroom_forecast_kw", "base_load_kw"):
            if len(getattr(self, name)) < need:
                raise ValueError(f"{name} must cover the span and one more day ({need} slots)")

    @property
    def end(self) -> datetime:
        """When the simulated span ends."""
        return self.start + timedelta(hours=self.hours)

    def slot_of(self, at: datetime) -> int:
        """Index of the slot containing `at`."""
        return int((at - self.start) // SLOT)


@dataclass(slots=True)
class CarResult:
    """What one car got."""

    vehicle_id: str
    needed_kwh: float
    delivered_kwh: float  # battery energy gained during the stay (after losses)
    departure_soc: float
    target_soc: float

    @property
    def shortfall_kwh(self) -> float:
        """Energy missing at departure (0 when the target was met, within 50 Wh)."""
        missing = self.needed_kwh - self.delivered_kwh
        return missing if missing > 0.05 else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProfileLatency:
    """One event (a car plugging in) and the first charging profile its charger got after it.

    `sim_s` is on the scenario's `SimClock` (what the controller's coalescing window and the
    steps make of it); `wall_s` is real time on this machine. Both None when the charger got no
    profile before the car left or the run ended.
    """

    charger_id: str
    at: datetime
    sim_s: float | None
    wall_s: float | None


class TimedChargePoint(SimChargePoint):
    """A simulated charge point that also notes the wall time each charging profile arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received_wall_s: list[float] = []  # perf_counter() of each entry of `received`

    def set_profile(self, connector_id: int, raw: dict[str, Any]) -> str:
        """Install the profile as the simulator does, and note when it came (wall clock)."""
        status = super().set_profile(connector_id, raw)
        self.received_wall_s.append(time.perf_counter())
        return status


def profile_latencies(
    plug_ins: Sequence[tuple[int, datetime, float]], chargers: Sequence[TimedChargePoint]
) -> list[ProfileLatency]:
    """For each (charger index, simulated time, wall time) plug-in, the first profile after it.

    A profile counts when it arrived at or after the plug-in on both clocks; only the first
    one after each plug-in is taken (later refreshes are not a response to that event).
    """
    out = []
    for index, at, wall in plug_ins:
        charger = chargers[index]
        found = next(
            (
                (r.at, w)
                for r, w in zip(charger.received, charger.received_wall_s, strict=True)
                if r.at >= at and w >= wall
            ),
            None,
        )
        out.append(
            ProfileLatency(
                charger_id=charger.spec.charger_id,
                at=at,
                sim_s=None if found is None else (found[0] - at).total_seconds(),
                wall_s=None if found is None else found[1] - wall,
            )
        )
    return out


@dataclass(slots=True)
class ScenarioResult:
    """The run's record: metered power per step beside the plan, per-car outcomes, counters."""

    strategy: str
    step_s: float
    times: list[datetime] = field(default_factory=list)
    metered_kw: list[float] = field(default_factory=list)  # mean charger import over the step
    planned_kw: list[float] = field(default_factory=list)  # the plan's setpoint for the step
    headroom_kw: list[float] = field(default_factory=list)  # real head-room in the step
    headroom_forecast_kw: list[float] = field(default_factory=list)
    price_eur_per_kwh: list[float] = field(default_factory=list)
    soc: dict[str, list[float | None]] = field(default_factory=dict)  # per car, per step
    cars: list[CarResult] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    dispatch: dict[str, int] = field(default_factory=dict)
    charger_stats: dict[str, Any] = field(default_factory=dict)
    latency_s: list[float] = field(default_factory=list)
    # Wall time per step from the step's first message to the last profile answered.
    step_latency_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    counters_before_restart: dict[str, int] = field(default_factory=dict)
    # Event-to-profile latency, measured from outside the controller: per plug-in, from the
    # car plugging in (the charger's StatusNotification/StartTransaction, the car's MQTT
    # departure and SoC) to the first SetChargingProfile that charger received afterwards.
    profile_latency: list[ProfileLatency] = field(default_factory=list)
    profiles_received: int = 0  # SetChargingProfile requests the simulated chargers received

    def _array(self, name: str) -> FloatArray:
        return np.asarray(getattr(self, name), dtype=float)

    @property
    def energy_kwh(self) -> float:
        """Energy the chargers drew from the grid."""
        return float(self._array("metered_kw").sum() * self.step_s / 3600.0)

    @property
    def cost_eur(self) -> float:
        """Metered energy at the slot prices."""
        kwh = self._array("metered_kw") * self.step_s / 3600.0
        return float(kwh @ self._array("price_eur_per_kwh"))

    @property
    def planned_cost_eur(self) -> float:
        """The plan's own setpoints at the slot prices (what the optimiser believed)."""
        kwh = self._array("planned_kw") * self.step_s / 3600.0
        return float(kwh @ self._array("price_eur_per_kwh"))

    @property
    def peak_kw(self) -> float:
        """Highest metered step."""
        return float(self._array("metered_kw").max(initial=0.0))

    def violations(self, tolerance_kw: float) -> int:
        """Steps where the chargers drew more than the real head-room plus `tolerance_kw`."""
        over = self._array("metered_kw") - self._array("headroom_kw")
        return int((over > tolerance_kw).sum())

    def max_excess_kw(self) -> float:
        """The largest excess of metered power over the real head-room (0 if never above)."""
        over = self._array("metered_kw") - self._array("headroom_kw")
        return float(max(0.0, over.max(initial=0.0)))

    @property
    def shortfall_kwh(self) -> float:
        """Energy missing at departure, summed over the cars."""
        return float(sum(c.shortfall_kwh for c in self.cars))


def charger_id_for(index: int) -> str:
    """The simulated charger a car of the fleet always uses (one charger per car)."""
    return f"CP-{index + 1:04d}"


def charger_password(charger_id: str) -> str:
    """The simulated charger's Basic-auth password (24 characters, derived, never stored)."""
    import hashlib

    return hashlib.sha256(f"{PASSWORD_SECRET}:{charger_id}".encode()).hexdigest()[:24]


class Quiet:
    """Waits until nothing moves: the same counters over several polls and the service idle."""

    def __init__(self, fingerprint: Callable[[], tuple[int, ...]], polls: int = 3) -> None:
        self._fingerprint = fingerprint
        self._polls = polls

    async def wait(self, timeout_s: float = 60.0) -> None:
        """Return once the fingerprint has not changed for `polls` polls a few ms apart."""
        async with asyncio.timeout(timeout_s):
            last, stable = self._fingerprint(), 0
            while stable < self._polls:
                await asyncio.sleep(0.002)
                now = self._fingerprint()
                stable = stable + 1 if now == last else 0
                last = now


class DayRunner:
    """Runs `DayInputs` against a running voltpool (a `bootstrap.Runtime`) on a `SimClock`."""

    def __init__(
        self,
        inputs: DayInputs,
        runtime: bootstrap.Runtime,
        clock: SimClock,
        *,
        strategy: str,
        step_s: float = 60.0,
        meter_interval_s: float = 300.0,
        soc_interval_s: float = 1800.0,
        progress: Callable[[datetime, ScenarioResult], None] | None = None,
        restart: tuple[datetime, ControllerUnderTest] | None = None,
    ) -> None:
        self.inputs = inputs
        self.restart = restart
        self.runtime = runtime
        self.clock = clock
        self.step = timedelta(seconds=step_s)
        self.meter_interval_s = meter_interval_s
        self.soc_interval = timedelta(seconds=soc_interval_s)
        self.progress = progress
        self.result = ScenarioResult(strategy=strategy, step_s=step_s)
        self.stats = FleetStats()
        self.chargers: list[TimedChargePoint] = []
        self._plug_ins: list[tuple[int, datetime, float]] = []  # charger, sim time, wall time
        self._tasks: list[asyncio.Task[None]] = []
        self._published = 0
        self._arrival_energy: dict[str, float] = {}
        self._client: aiomqtt.Client | None = None

    # -- set-up ------------------------------------------------------------------------------

    def _configuration_events(self) -> list[Event]:
        at = self.clock.now()
        inputs = self.inputs
        events: list[Event] = [
            SiteConfigured(
                event_id="scenario-site",
                at=at,
                site=Site(
                    site_id=self.runtime.settings.site,
                    capacity_kw=inputs.site_capacity_kw,
                    safe_limit_kw=min(
                        inputs.site_capacity_kw, float(np.min(inputs.headroom_forecast_kw))
                    ),
                ),
            )
        ]
        for index, car in enumerate(inputs.cars):
            charger_id = charger_id_for(index)
            events.append(
                ChargerRegistered(
                    event_id=f"scenario-cp-{charger_id}",
                    at=at,
                    charger=ChargePoint(
                        charger_id=charger_id,
                        max_power_kw=inputs.charger_kw,
                        phases=inputs.charger_phases,
                        connectors=(Connector(connector_id=1, max_power_kw=inputs.charger_kw),),
                        v2g_mode=inputs.v2g_mode,  # type: ignore[arg-type]
                    ),
                )
            )
            events.append(
                VehicleRegistered(
                    event_id=f"scenario-ev-{car.vehicle_id}",
                    at=at,
                    vehicle=Vehicle(
                        vehicle_id=car.vehicle_id,
                        model=car.model,
                        capacity_kwh=car.capacity_kwh,
                        energy_kwh=car.arrival_soc * car.capacity_kwh,
                        energy_at=at,
                        max_charge_kw=car.max_charge_kw,
                        max_discharge_kw=car.max_discharge_kw,
                        charge_efficiency=car.charge_efficiency,
                        v2g_allowed=car.v2g,
                    ),
                )
            )
        return events

    async def _publish(self, topic: str, payload: dict[str, Any] | str) -> None:
        assert self._client is not None
        text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
        await self._client.publish(f"{self.runtime.link.topics.prefix}/{topic}", text, qos=1)
        self._published += 1

    async def _publish_feeds(self) -> None:
        inputs, now = self.inputs, self.clock.now()
        first = inputs.slot_of(now)
        published = int(np.ceil(inputs.hours * 4)) + 96 - first
        await self._publish(
            "price",
            {
                "at": now.isoformat(),
                "start": (inputs.start + SLOT * first).isoformat(),
                "price_eur_per_kwh": [
                    float(p) for p in inputs.price_eur_per_kwh[first:][:published]
                ],
            },
        )
        await self._publish(
            "site/headroom",
            {
                "at": now.isoformat(),
                "start": (inputs.start + SLOT * first).isoformat(),
                "headroom_kw": [float(h) for h in inputs.headroom_forecast_kw[first:][:published]],
            },
        )

    async def _set_up(self) -> None:
        settings = self.runtime.settings
        client = self.runtime.redis.client()
        try:
            store = CredentialStore(client, settings.site, rounds=4)
            for index in range(len(self.inputs.cars)):
                charger_id = charger_id_for(index)
                await store.set_password(charger_id, charger_password(charger_id))
        finally:
            await client.aclose()
        for event in self._configuration_events():
            await self._publish("events", encode_event(event))
        await self._publish_feeds()
        await self._quiet()
        url = self.runtime.central.url().rstrip("/")
        for index in range(len(self.inputs.cars)):
            charger_id = charger_id_for(index)
            charger = TimedChargePoint(
                ChargerSpec(
                    charger_id=charger_id,
                    max_power_kw=self.inputs.charger_kw,
                    phases=self.inputs.charger_phases,
                    meter_interval_s=self.meter_interval_s,
                    v2g_mode=self.inputs.v2g_mode,  # type: ignore[arg-type]
                ),
                self.clock,
                stats=self.stats,
            )
            self.chargers.append(charger)
            self._tasks.append(asyncio.create_task(charger.run(url, charger_password(charger_id))))
        async with asyncio.timeout(120):
            for charger in self.chargers:
                await charger.wait_online()
        await self._quiet()

    # -- quiescence --------------------------------------------------------------------------

    def _fingerprint(self) -> tuple[int, ...]:
        service = self.runtime.service
        return (
            sum(self.stats.sent.values()),
            sum(self.stats.answered.values()),
            sum(service.counters.values()) - service.counters.get("last_solve_ms", 0),
            sum(self.runtime.dispatcher.counters.values()),
            len(self.stats.rtt_s),
        )

    async def _quiet(self) -> None:
        service = self.runtime.service
        window = timedelta(seconds=service.settings.coalesce_window_s)
        quiet = Quiet(self._fingerprint)
        for _ in range(10_000):
            await quiet.wait()
            if not service.is_drained:
                await service.applied()
                continue
            if service.is_planning:
                await service.planner_idle()
                continue
            if service.is_dirty:
                # The plan waits out the coalescing window on the simulated clock.
                await self.clock.advance(window)
                continue
            for charger_id in self.runtime.central.online():
                await self.runtime.dispatcher.settled(charger_id)
            before = self._fingerprint()
            await quiet.wait()
            if self._fingerprint() == before and service.is_drained and not service.is_dirty:
                return
        raise RuntimeError("the system did not become quiet")

    # -- the day -----------------------------------------------------------------------------

    async def _arrive(self, index: int, car: CarDay) -> None:
        charger = self.chargers[index]
        now = self.clock.now()
        self._plug_ins.append((index, now, time.perf_counter()))
        await self._publish(
            f"vehicle/{car.vehicle_id}/departure",
            {
                "at": now.isoformat(),
                "departure": car.departure.isoformat(),
                "target_soc": car.target_soc,
            },
        )
        await self._publish(
            f"vehicle/{car.vehicle_id}/soc", {"at": now.isoformat(), "soc": car.arrival_soc}
        )
        sim_car = SimCar(
            vehicle_id=car.vehicle_id,
            id_tag=car.vehicle_id,
            capacity_kwh=car.capacity_kwh,
            energy_kwh=car.arrival_soc * car.capacity_kwh,
            max_charge_kw=car.max_charge_kw,
            max_discharge_kw=car.max_discharge_kw,
            charge_efficiency=car.charge_efficiency,
            taper_from_soc=1.0,
        )
        self._arrival_energy[car.vehicle_id] = sim_car.energy_kwh
        await charger.plug_in(1, sim_car)

    async def _depart(self, index: int, car: CarDay) -> None:
        charger = self.chargers[index]
        sim_car = charger.connectors[0].car
        if sim_car is None:
            return
        charger.advance(self.clock.now())
        delivered = sim_car.energy_kwh - self._arrival_energy[car.vehicle_id]
        self.result.cars.append(
            CarResult(
                vehicle_id=car.vehicle_id,
                needed_kwh=car.need_kwh,
                delivered_kwh=delivered,
                departure_soc=sim_car.soc,
                target_soc=car.target_soc,
            )
        )
        await charger.unplug(1)

    async def _restart(self, controller: ControllerUnderTest) -> None:
        """Restart the controller; advance time in seconds until every charger is back."""
        self.result.counters_before_restart = dict(self.runtime.service.counters)
        self.runtime = await controller.restart()
        async with asyncio.timeout(120):
            while not all(c.online.is_set() for c in self.chargers):
                await self.clock.advance(timedelta(seconds=1))
                await asyncio.sleep(0.001)
        await self._quiet()

    async def _telemetry(self) -> None:
        now = self.clock.now()
        for charger in self.chargers:
            car = charger.connectors[0].car
            if car is not None:
                charger.advance(now)
                await self._publish(
                    f"vehicle/{car.vehicle_id}/soc", {"at": now.isoformat(), "soc": car.soc}
                )

    def _meters_wh(self) -> float:
        now = self.clock.now()
        total = 0.0
        for charger in self.chargers:
            charger.advance(now)
            for connector in charger.connectors:
                total += connector.import_wh - connector.export_wh
        return total

    def _planned_kw(self) -> float:
        plan = self.runtime.service.last_plan
        return 0.0 if plan is None else max(0.0, plan.total_first_slot_kw)

    async def run(self) -> ScenarioResult:
        """Set up, simulate the span step by step, tear down; returns what was metered."""
        started = time.perf_counter()
        endpoint = self.runtime.mqtt
        async with aiomqtt.Client(
            endpoint.host, endpoint.port, identifier="voltpool-scenario-driver"
        ) as client:
            self._client = client
            try:
                await self._set_up()
                await self._simulate()
                # Read before the chargers go: their disconnections are events too.
                self._record(started)
            finally:
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                self._client = None
        return self.result

    def _record(self, started: float) -> None:
        service = self.runtime.service
        self.result.counters = dict(service.counters)
        self.result.dispatch = dict(self.runtime.dispatcher.counters)
        self.result.charger_stats = {
            "sent": dict(self.stats.sent),
            "answered": dict(self.stats.answered),
            "errors": dict(self.stats.errors),
        }
        self.result.latency_s = list(service.latencies_s)
        self.result.profile_latency = profile_latencies(self._plug_ins, self.chargers)
        self.result.profiles_received = sum(len(c.received) for c in self.chargers)
        self.result.wall_s = time.perf_counter() - started

    async def _simulate(self) -> None:
        inputs, result = self.inputs, self.result
        order = sorted(range(len(inputs.cars)), key=lambda i: inputs.cars[i].arrival)
        arrivals = [(inputs.cars[i].arrival, i) for i in order]
        departures = sorted((c.departure, i) for i, c in enumerate(inputs.cars))
        next_soc = self.clock.now() + self.soc_interval
        meters = self._meters_wh()
        result.soc = {car.vehicle_id: [] for car in inputs.cars}
        while self.clock.now() < inputs.end:
            now = self.clock.now()
            if now == slot_floor(now):
                slot = inputs.slot_of(now)
                await self._publish(
                    "site/load",
                    {"at": now.isoformat(), "load_kw": float(inputs.base_load_kw[slot])},
                )
            while departures and departures[0][0] <= now:
                _, index = departures.pop(0)
                await self._depart(index, inputs.cars[index])
            while arrivals and arrivals[0][0] <= now:
                _, index = arrivals.pop(0)
                if inputs.cars[index].departure > now:
                    await self._arrive(index, inputs.cars[index])
            if now >= next_soc:
                await self._telemetry()
                next_soc += self.soc_interval
            if self.restart is not None and now >= self.restart[0]:
                await self._restart(self.restart[1])
                self.restart = None
                now = self.clock.now()
            await self._quiet()
            slot = inputs.slot_of(now)
            planned = self._planned_kw()
            moved = time.perf_counter()
            await self.clock.run_until(now + self.step)
            await self._quiet()
            result.step_latency_s.append(time.perf_counter() - moved)
            metered_now = self._meters_wh()
            step_h = self.step.total_seconds() / 3600.0
            result.times.append(now)
            result.metered_kw.append((metered_now - meters) / 1000.0 / step_h)
            result.planned_kw.append(planned)
            result.headroom_kw.append(inputs.site_capacity_kw - float(inputs.base_load_kw[slot]))
            result.headroom_forecast_kw.append(float(inputs.headroom_forecast_kw[slot]))
            result.price_eur_per_kwh.append(float(inputs.price_eur_per_kwh[slot]))
            for index, car in enumerate(inputs.cars):
                sim_car = self.chargers[index].connectors[0].car
                result.soc[car.vehicle_id].append(None if sim_car is None else sim_car.soc)
            meters = metered_now
            if self.progress is not None:
                result.counters = dict(self.runtime.service.counters)
                result.dispatch = dict(self.runtime.dispatcher.counters)
                self.progress(self.clock.now(), result)
        for _, index in departures:  # cars still plugged in at the end
            await self._depart(index, inputs.cars[index])
        await self._quiet()  # the last stops and statuses, before the counters are read


class ControllerUnderTest:
    """voltpool running in this process as a task, which can be stopped and started again."""

    def __init__(self, settings: Settings, clock: SimClock, solver: SolveFn | None) -> None:
        self.settings = settings
        self.clock = clock
        self.solver = solver
        self.runtime: bootstrap.Runtime | None = None
        self._task: asyncio.Task[None] | None = None
        self.starts = 0

    async def start(self) -> bootstrap.Runtime:
        """Start the service and wait until it is ready."""
        ready: asyncio.Future[bootstrap.Runtime] = asyncio.get_running_loop().create_future()

        async def on_ready(runtime: bootstrap.Runtime) -> None:
            ready.set_result(runtime)

        self._task = asyncio.create_task(
            bootstrap.run(self.settings, clock=self.clock, solver=self.solver, on_ready=on_ready)
        )
        waiter = asyncio.ensure_future(ready)
        racing: set[asyncio.Future[Any]] = {waiter, self._task}
        done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            self._task.result()  # raises what stopped the service
            raise RuntimeError("voltpool stopped before it was ready")
        self.runtime = waiter.result()
        self.starts += 1
        return self.runtime

    async def stop(self) -> None:
        """Cancel the service (its servers, if embedded, stop with it)."""
        task, self._task = self._task, None
        if task is None:
            return
        while not task.done():  # repeat: Python 3.11's wait_for can swallow one cancel
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if not task.cancelled() and task.exception() is not None:
            log.warning("voltpool stopped with %r", task.exception())

    async def restart(self) -> bootstrap.Runtime:
        """Stop and start again on the same data (a crash of the controller process alone)."""
        await self.stop()
        return await self.start()


async def run_day(
    inputs: DayInputs,
    *,
    strategy: str = "managed",
    solver: SolveFn | None = None,
    step_s: float = 60.0,
    meter_interval_s: float = 300.0,
    soc_interval_s: float = 1800.0,
    planning: PlanningSettings | None = None,
    deadband_kw: float = 0.5,
    progress: Callable[[datetime, ScenarioResult], None] | None = None,
    data_dir: str | None = None,
    redis_url: str | None = None,
    mqtt_url: str | None = None,
    ocpp_port: int = 0,
    restart_at: datetime | None = None,
) -> ScenarioResult:
    """Start voltpool with a simulated clock and run the day through it.

    Redis and the broker are embedded unless `redis_url` / `mqtt_url` are given. `restart_at`
    stops the controller at that simulated time and starts it again on the same Redis, broker
    and OCPP port (so it needs the external servers and a fixed `ocpp_port`): the chargers
    reconnect and the plan is rebuilt from what Redis kept.
    """
    if restart_at is not None and (redis_url is None or mqtt_url is None or ocpp_port == 0):
        raise ValueError("a restart needs an external Redis and broker and a fixed OCPP port")
    clock = SimClock(inputs.start)
    with tempfile.TemporaryDirectory(prefix="voltpool-scenario-") as tmp:
        settings = Settings(
            site="scenario",
            data_dir=data_dir or tmp,
            redis_url=redis_url,
            mqtt_url=mqtt_url,
            ocpp_port=ocpp_port,
            ocpp_bcrypt_rounds=4,
            coalesce_window_s=0.2,
            max_event_ahead_s=3600.0,
            deadband_kw=deadband_kw,
            site_capacity_kw=inputs.site_capacity_kw,
            # The simulated site meter reports once a slot (the households' load is a series
            # of slot means), so a reading is trusted for one slot and a minute, not the 60 s
            # a real meter reporting every few seconds gets.
            planning=planning or PlanningSettings(site_load_fresh_s=SLOT.total_seconds() + 60),
        )
        controller = ControllerUnderTest(settings, clock, solver)
        runtime = await controller.start()
        try:
            runner = DayRunner(
                inputs,
                runtime,
                clock,
                strategy=strategy,
                step_s=step_s,
                meter_interval_s=meter_interval_s,
                soc_interval_s=soc_interval_s,
                progress=progress,
                restart=(restart_at, controller) if restart_at is not None else None,
            )
            return await runner.run()
        finally:
            await controller.stop()


def summarise(results: Sequence[ScenarioResult], tolerance_kw: float) -> list[dict[str, Any]]:
    """One row per run: cost, energy, peak, violations, shortfall, messages."""
    return [
        {
            "strategy": r.strategy,
            "cost_eur": round(r.cost_eur, 2),
            "planned_cost_eur": round(r.planned_cost_eur, 2),
            "energy_kwh": round(r.energy_kwh, 1),
            "peak_kw": round(r.peak_kw, 1),
            "violations": r.violations(tolerance_kw),
            "shortfall_kwh": round(r.shortfall_kwh, 2),
            "profiles_sent": r.charger_stats.get("received_profiles", 0),
            "wall_s": round(r.wall_s, 1),
        }
        for r in results
    ]
