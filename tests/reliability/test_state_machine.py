"""A Hypothesis state machine over the fleet-state event model (RELIABILITY.md R-06, O-18).

Random interleavings of plug-in, unplug, SoC reports (in and out of order), meter samples and
transaction start/stop are applied with `controller.state.apply_event`; refusals are allowed,
exceptions of any other kind are not. After every step the invariants hold:

- car <-> connector links agree both ways, and no connector carries two cars;
- every recorded change set rebuilds the same state from scratch (what Redis stores is all
  there is: a reload equals the state in memory);
- a re-delivered event (same event id) never raises anything but `Refused` (the store drops
  it by id before the reducer; the reducer must not crash on it either);
- SoC within [0, 1] of capacity, energy never negative; a stopped transaction has a stop >=
  its start.

The example count is printed at the end (`pytest -s` shows it; it is also asserted).
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from controller.errors import InvalidEvent, Refused
from controller.events import (
    Event,
    MeterSampled,
    SocReported,
    TransactionStarted,
    TransactionStopped,
    VehiclePluggedIn,
    VehicleUnplugged,
)
from controller.state import Change, FleetState, apply_event
from tests.conftest import T0
from tests.factories import charger_registered, site_configured, vehicle_registered

CARS = ("ev-0", "ev-1", "ev-2")
CHARGERS = ("cp-0", "cp-1")
STEPS = {"count": 0, "refused": 0, "applied": 0}


class FleetMachine(RuleBasedStateMachine):
    """The fleet state under random event sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.state = FleetState()
        self.changes: list[Change] = []
        self.n = 0
        self.minutes = 0.0
        self.tx = 0
        self.registers: dict[str, float] = dict.fromkeys(CHARGERS, 0.0)
        self.last: Event | None = None
        setup: list[object] = [site_configured(T0), *(charger_registered(c, T0) for c in CHARGERS)]
        setup += [vehicle_registered(v, T0) for v in CARS]
        for event in setup:
            self._apply(event)  # type: ignore[arg-type]

    def _id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"

    def _now(self, back_minutes: float = 0.0) -> datetime:
        return T0 + timedelta(minutes=self.minutes - back_minutes)

    def _apply(self, event: Event) -> None:
        STEPS["count"] += 1
        try:
            outcome = apply_event(self.state, event)
        except Refused:
            STEPS["refused"] += 1
            return
        STEPS["applied"] += 1
        self.state = outcome.state
        self.changes.extend(outcome.changes)
        self.last = event

    @rule(minutes=st.floats(0.0, 30.0))
    def time_passes(self, minutes: float) -> None:
        """The clock moves on."""
        self.minutes += minutes

    @rule(car=st.sampled_from(CARS), cp=st.sampled_from(CHARGERS))
    def plug_in(self, car: str, cp: str) -> None:
        """A car is plugged into a charger's connector 1."""
        self._apply(
            VehiclePluggedIn(
                event_id=self._id("plug"), at=self._now(), vehicle_id=car, charger_id=cp,
                connector_id=1,
            )
        )  # fmt: skip

    @rule(car=st.sampled_from(CARS))
    def unplug(self, car: str) -> None:
        """A car leaves."""
        self._apply(VehicleUnplugged(event_id=self._id("unplug"), at=self._now(), vehicle_id=car))

    @rule(car=st.sampled_from(CARS), soc=st.floats(0.0, 1.0), back=st.floats(0.0, 60.0))
    def soc(self, car: str, soc: float, back: float) -> None:
        """A SoC report, possibly older than the last one (out of order)."""
        self._apply(
            SocReported(event_id=self._id("soc"), at=self._now(back), vehicle_id=car, soc=soc)
        )

    @rule(cp=st.sampled_from(CHARGERS), wh=st.floats(0.0, 5000.0), kw=st.floats(-11.0, 22.0))
    def meter(self, cp: str, wh: float, kw: float) -> None:
        """The charger meters its connector (the register only grows)."""
        self.registers[cp] += wh
        self._apply(
            MeterSampled(
                event_id=self._id("meter"), at=self._now(), charger_id=cp, connector_id=1,
                meter_wh=self.registers[cp], power_kw=kw,
            )
        )  # fmt: skip

    @rule(cp=st.sampled_from(CHARGERS))
    def start(self, cp: str) -> None:
        """A transaction starts on connector 1."""
        self.tx += 1
        self._apply(
            TransactionStarted(
                event_id=self._id("start"), at=self._now(), transaction_id=self.tx,
                charger_id=cp, connector_id=1, id_tag="TAG", meter_start_wh=self.registers[cp],
            )
        )  # fmt: skip

    @rule(pick=st.integers(1, 50))
    def stop(self, pick: int) -> None:
        """A transaction (maybe unknown, maybe already stopped) stops."""
        if self.tx == 0:
            return
        tx = (pick - 1) % self.tx + 1
        record = self.state.transactions.get(tx)
        cp = record.charger_id if record is not None else CHARGERS[0]
        self._apply(
            TransactionStopped(
                event_id=self._id("stop"), at=self._now(), transaction_id=tx,
                meter_stop_wh=self.registers[cp],
            )
        )  # fmt: skip

    @precondition(lambda self: self.last is not None)
    @rule()
    def redeliver(self) -> None:
        """The last applied event arrives again (QoS 1, a retried commit)."""
        assert self.last is not None
        with contextlib.suppress(Refused):  # refusing it is fine; the store drops it by id
            apply_event(self.state, self.last)

    @invariant()
    def links_agree_both_ways(self) -> None:
        """A car's connector names the car, and the connector's car is on that connector."""
        on_connector: dict[tuple[str, int], str] = {}
        for charger in self.state.chargers.values():
            for connector in charger.connectors:
                if connector.vehicle_id is not None:
                    key = (charger.charger_id, connector.connector_id)
                    assert key not in on_connector
                    on_connector[key] = connector.vehicle_id
                    car = self.state.vehicles[connector.vehicle_id]
                    assert (car.charger_id, car.connector_id) == key
        for car in self.state.vehicles.values():
            if car.charger_id is not None:
                assert on_connector.get((car.charger_id, car.connector_id or 0)) == car.vehicle_id

    @invariant()
    def changes_rebuild_the_state(self) -> None:
        """What a store keeps (the changes) is enough to reload exactly this state."""
        assert FleetState().with_changes(tuple(self.changes)) == self.state

    @invariant()
    def physical_bounds_hold(self) -> None:
        """Energy within [0, capacity]; transactions stop after they start."""
        for car in self.state.vehicles.values():
            assert 0.0 <= car.energy_kwh <= car.capacity_kwh + 1e-9
        for tx in self.state.transactions.values():
            if tx.stopped_at is not None:
                assert tx.stopped_at >= tx.started_at


FleetMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=25, deadline=None, derandomize=True
)
TestFleetMachine = FleetMachine.TestCase


def test_zz_the_state_machine_ran_enough_examples() -> None:
    """Print and check how many events the state machine applied (run after it, same module)."""
    print(
        f"\nfleet state machine: {STEPS['count']} events, {STEPS['applied']} applied, "
        f"{STEPS['refused']} refused"
    )
    if STEPS["count"]:  # only meaningful when the machine ran in this session
        assert STEPS["applied"] > 0
        assert STEPS["refused"] > 0  # the sequences do reach the refusal paths


def test_invalid_events_are_refused_at_construction() -> None:
    """The event types guard their own fields, before any reducer sees them."""
    try:
        VehiclePluggedIn(event_id="x", at=T0, vehicle_id="ev-0", charger_id="cp-0", connector_id=0)
    except InvalidEvent:
        return
    raise AssertionError("connector 0 accepted")
