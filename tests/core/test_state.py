"""The pure reducer: what each event does to the fleet state, and what it refuses."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.domain import ConnectorStatus
from controller.errors import RefusalCode, Refused
from controller.events import (
    DepartureSet,
    Event,
    MeterSampled,
    PauseVehicle,
    Resume,
    TransactionStarted,
    TransactionStopped,
    VehicleUnplugged,
)
from controller.state import FleetState, apply_event
from tests.conftest import T0
from tests.factories import next_id, plugged_in, small_site, soc_reported


def _fold(events: list[object]) -> FleetState:
    state = FleetState()
    for event in events:
        state = apply_event(state, event).state  # type: ignore[arg-type]
    return state


def test_plugging_in_links_car_and_connector_both_ways() -> None:
    """The car knows its connector and the connector knows its car."""
    state = _fold(small_site(T0, cars=1))
    assert state.vehicles["ev-1"].charger_id == "cp-1"
    assert state.chargers["cp-1"].connector(1).vehicle_id == "ev-1"  # type: ignore[union-attr]


def test_a_new_car_on_an_occupied_connector_unplugs_the_previous_one() -> None:
    """The connector's newest occupant wins; the one before is no longer plugged in."""
    state = _fold(small_site(T0, cars=2))
    state = apply_event(state, plugged_in("ev-2", "cp-1", T0 + timedelta(minutes=1))).state
    assert not state.vehicles["ev-1"].plugged_in
    assert state.vehicles["ev-2"].charger_id == "cp-1"
    assert state.chargers["cp-2"].connector(1).vehicle_id is None  # type: ignore[union-attr]


def test_metered_energy_adds_to_the_car_with_its_efficiency_counted_once() -> None:
    """10 kWh through the meter at 92 % efficiency adds 9.2 kWh; the same register adds 0."""
    state = _fold(small_site(T0, cars=1))
    start = state.vehicles["ev-1"].energy_kwh

    def sample(wh: float, minutes: int) -> MeterSampled:
        return MeterSampled(
            event_id=next_id("mv"),
            at=T0 + timedelta(minutes=minutes),
            charger_id="cp-1",
            connector_id=1,
            meter_wh=wh,
        )

    state = apply_event(state, sample(1000.0, 1)).state
    state = apply_event(state, sample(11000.0, 30)).state
    state = apply_event(state, sample(11000.0, 31)).state
    assert state.vehicles["ev-1"].energy_kwh == pytest.approx(start + 9.2)


def test_an_older_soc_than_the_stored_one_is_refused_as_stale() -> None:
    """Out-of-order telemetry never overwrites newer state."""
    state = _fold([*small_site(T0, cars=1), soc_reported("ev-1", 0.7, T0 + timedelta(minutes=5))])
    with pytest.raises(Refused) as refused:
        apply_event(state, soc_reported("ev-1", 0.2, T0 + timedelta(minutes=1)))
    assert refused.value.code is RefusalCode.STALE


def test_a_departure_in_the_past_or_a_target_above_the_battery_is_refused() -> None:
    """Both are impossible requests, answered with the reason."""
    state = _fold(small_site(T0, cars=1))
    with pytest.raises(Refused, match="is not after"):
        apply_event(
            state,
            DepartureSet(
                event_id="d1", at=T0, vehicle_id="ev-1", departure=T0 - timedelta(hours=1)
            ),
        )
    with pytest.raises(Refused, match="above the battery"):
        apply_event(
            state,
            DepartureSet(
                event_id="d2",
                at=T0,
                vehicle_id="ev-1",
                departure=T0 + timedelta(hours=8),
                target_kwh=500.0,
            ),
        )


def test_unplugging_ends_the_stay_and_its_departure() -> None:
    """After the car leaves, its old departure and target no longer drive any plan."""
    state = _fold(
        [
            *small_site(T0, cars=1),
            DepartureSet(
                event_id="d",
                at=T0,
                vehicle_id="ev-1",
                departure=T0 + timedelta(hours=8),
                target_kwh=50.0,
            ),
            VehicleUnplugged(event_id="u", at=T0 + timedelta(hours=8), vehicle_id="ev-1"),
        ]
    )
    vehicle = state.vehicles["ev-1"]
    assert (vehicle.plugged_in, vehicle.departure, vehicle.target_kwh) == (False, None, None)
    assert state.chargers["cp-1"].connector(1).vehicle_id is None  # type: ignore[union-attr]


def test_transactions_start_once_and_stop_with_their_energy() -> None:
    """A replayed start changes nothing; the stop records the register; an unknown stop is
    refused."""
    start = TransactionStarted(
        event_id="t1",
        at=T0,
        transaction_id=7,
        charger_id="cp-1",
        connector_id=1,
        id_tag="tag",
        meter_start_wh=1000.0,
    )
    state = _fold([*small_site(T0, cars=1), start])
    assert apply_event(state, start).changes == ()
    stop = TransactionStopped(
        event_id="t2", at=T0 + timedelta(hours=2), transaction_id=7, meter_stop_wh=21000.0
    )
    state = apply_event(state, stop).state
    assert state.transactions[7].energy_kwh == pytest.approx(20.0)
    assert state.transactions[7].vehicle_id == "ev-1"
    assert state.chargers["cp-1"].connector(1).transaction_id is None  # type: ignore[union-attr]
    with pytest.raises(Refused) as refused:
        apply_event(
            state, TransactionStopped(event_id="t3", at=T0, transaction_id=8, meter_stop_wh=1.0)
        )
    assert refused.value.code is RefusalCode.UNKNOWN_TRANSACTION


def test_resume_ends_a_pause() -> None:
    """A pause becomes an override; resume removes it."""
    pause = PauseVehicle(event_id="p", at=T0, expires_at=T0 + timedelta(hours=1), vehicle_id="ev-1")
    state = _fold([*small_site(T0, cars=1), pause])
    assert [o.kind for o in state.active_overrides(T0)] == ["pause_vehicle"]
    state = apply_event(state, Resume(event_id="r", at=T0, target_id="ev-1")).state
    assert state.active_overrides(T0) == []


def test_status_of_an_unknown_connector_is_refused() -> None:
    """A connector the charger does not have is named in the refusal."""
    from controller.events import ConnectorStatusChanged

    state = _fold(small_site(T0, cars=1))
    with pytest.raises(Refused, match="has no connector 3"):
        apply_event(
            state,
            ConnectorStatusChanged(
                event_id="s",
                at=T0,
                charger_id="cp-1",
                connector_id=3,
                status=ConnectorStatus.CHARGING,
            ),
        )


@settings(max_examples=60, deadline=None)
@given(st.permutations(list(range(6))), st.lists(st.floats(0, 1), min_size=6, max_size=6))
def test_soc_reports_in_any_order_leave_the_newest(order: list[int], socs: list[float]) -> None:
    """Whatever order the reports arrive in, the state holds the newest one's value."""
    reports: list[Event] = [
        soc_reported("ev-1", socs[k], T0 + timedelta(minutes=k)) for k in range(6)
    ]
    state = _fold(small_site(T0, cars=1))
    refusals: list[RefusalCode] = []
    for k in order:
        try:
            state = apply_event(state, reports[k]).state
        except Refused as refused:
            refusals.append(refused.code)
    assert set(refusals) <= {RefusalCode.STALE}
    assert state.vehicles["ev-1"].soc == pytest.approx(socs[5])
