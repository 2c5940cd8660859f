"""Impossible values are refused when records and events are built, with a clear message."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from controller.domain import ChargePoint, Connector, Override, Site, Transaction, Vehicle
from controller.errors import InvalidEvent
from controller.events import (
    CapSite,
    HeadroomUpdated,
    MeterSampled,
    PriceUpdated,
    SocReported,
    VehiclePluggedIn,
)
from tests.conftest import T0


def _vehicle(**overrides: object) -> Vehicle:
    fields: dict[str, object] = dict(
        vehicle_id="ev-1", model="m", capacity_kwh=60.0, energy_kwh=30.0, energy_at=T0
    )
    fields.update(overrides)
    return Vehicle(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"capacity_kwh": -5.0}, "capacity_kwh -5.0 is below 0.0"),
        ({"capacity_kwh": 0.0}, "must be positive"),
        ({"energy_kwh": 61.0}, "above its capacity 60.0"),
        ({"energy_kwh": float("nan")}, "not a finite number"),
        ({"target_kwh": 75.0}, "target_kwh 75.0 is above its capacity"),
        ({"charge_efficiency": 1.5}, "charge_efficiency 1.5 is above 1.0"),
        ({"energy_at": datetime(2024, 1, 1)}, "has no time zone"),
        ({"charger_id": "cp-1"}, "charger and connector must be set together"),
        ({"vehicle_id": ""}, "vehicle id is empty"),
    ],
)
def test_a_vehicle_with_impossible_values_is_refused(
    overrides: dict[str, object], message: str
) -> None:
    """Each impossible field is named in the error."""
    with pytest.raises(InvalidEvent, match=message.replace("(", r"\(")):
        _vehicle(**overrides)


def test_charge_points_refuse_bad_phases_and_repeated_connectors() -> None:
    """Three phases or one; connector ids unique and from 1."""
    with pytest.raises(InvalidEvent, match="phases must be 1 or 3"):
        ChargePoint(charger_id="cp", max_power_kw=11, phases=2)
    with pytest.raises(InvalidEvent, match="connector ids repeat"):
        ChargePoint(
            charger_id="cp",
            max_power_kw=11,
            connectors=(Connector(connector_id=1, max_power_kw=11),) * 2,
        )
    with pytest.raises(InvalidEvent, match="connector ids start at 1"):
        Connector(connector_id=0, max_power_kw=11)


def test_minimum_power_follows_current_voltage_and_phases() -> None:
    """6 A on three 230 V phases is 4.14 kW; on one phase 1.38 kW."""
    assert ChargePoint(charger_id="a", max_power_kw=11).min_power_kw == pytest.approx(4.14)
    assert ChargePoint(charger_id="b", max_power_kw=7, phases=1).min_power_kw == pytest.approx(1.38)


def test_site_transaction_and_override_invariants() -> None:
    """A safe limit above capacity, a register running backwards, an expiry before creation."""
    with pytest.raises(InvalidEvent, match="safe_limit_kw 200.0 is above 100.0"):
        Site(site_id="s", capacity_kw=100.0, safe_limit_kw=200.0)
    with pytest.raises(InvalidEvent, match="meter_stop_wh 5.0 is below 10.0"):
        Transaction(
            transaction_id=1,
            charger_id="cp",
            connector_id=1,
            id_tag="t",
            started_at=T0,
            meter_start_wh=10.0,
            meter_stop_wh=5.0,
        )
    with pytest.raises(InvalidEvent, match="not after its creation"):
        Override(
            override_id="o", kind="pause_vehicle", target_id="ev", created_at=T0, expires_at=T0
        )
    with pytest.raises(InvalidEvent, match="cap_site needs limit_kw"):
        Override(
            override_id="o",
            kind="cap_site",
            target_id="s",
            created_at=T0,
            expires_at=T0 + timedelta(hours=1),
        )


def test_events_refuse_impossible_values() -> None:
    """SoC outside 0..1, naive times, off-grid series, empty samples, negative caps."""
    with pytest.raises(InvalidEvent, match="soc 1.2 is above 1.0"):
        SocReported(event_id="e", at=T0, vehicle_id="v", soc=1.2)
    with pytest.raises(InvalidEvent, match="has no time zone"):
        SocReported(event_id="e", at=datetime(2024, 1, 1), vehicle_id="v", soc=0.5)
    with pytest.raises(InvalidEvent, match="not on a 15-minute boundary"):
        PriceUpdated(event_id="e", at=T0, start=T0 + timedelta(minutes=7), price_eur_per_kwh=(0.1,))
    with pytest.raises(InvalidEvent, match="headroom_kw has no values"):
        HeadroomUpdated(event_id="e", at=T0, start=T0, headroom_kw=())
    with pytest.raises(InvalidEvent, match="a meter sample with no value"):
        MeterSampled(event_id="e", at=T0, charger_id="cp", connector_id=1)
    with pytest.raises(InvalidEvent, match="limit_kw -1.0 is below 0.0"):
        CapSite(event_id="e", at=T0, expires_at=T0 + timedelta(hours=1), limit_kw=-1.0)
    with pytest.raises(InvalidEvent, match="not after it was issued"):
        CapSite(event_id="e", at=T0, expires_at=T0, limit_kw=1.0)
    with pytest.raises(InvalidEvent, match="connector id 0 is below 1"):
        VehiclePluggedIn(event_id="e", at=T0, vehicle_id="v", charger_id="cp", connector_id=0)
    with pytest.raises(InvalidEvent, match="1 to 128 characters"):
        SocReported(event_id="", at=T0, vehicle_id="v", soc=0.5)
