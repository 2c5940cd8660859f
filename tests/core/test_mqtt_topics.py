"""Each MQTT input topic and each operator command, through a real broker into the state."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from adapters.codec import encode_event
from adapters.mqtt_payloads import schemas
from controller.clock import SimClock
from tests.core.conftest import PREFIX, TIMEOUT_S, Wired
from tests.factories import small_site

ROOT = Path(__file__).resolve().parents[2]


class Operator:
    """An MQTT client that publishes inputs and collects command results."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.results: dict[str, dict[str, Any]] = {}
        self._arrived = asyncio.Event()

    async def collect(self) -> None:
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            result = json.loads(message.payload)
            self.results[result["command_id"]] = result
            self._arrived.set()

    async def send(self, topic: str, payload: dict[str, Any] | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
        await self.client.publish(f"{PREFIX}/{topic}", text, qos=1)

    async def result(self, command_id: str) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT_S):
            while command_id not in self.results:
                self._arrived.clear()
                await self._arrived.wait()
        return self.results[command_id]


@pytest.fixture
async def operator(wired: Wired, clock: SimClock) -> AsyncIterator[Operator]:
    """A depot of three cars, and a client subscribed to every command result."""
    async with aiomqtt.Client(wired.endpoint.host, wired.endpoint.port) as client:
        await client.subscribe(f"{PREFIX}/operator/result/#", qos=1)
        op = Operator(client)
        collector = asyncio.create_task(op.collect())
        events = small_site(clock.now(), cars=3)
        for event in events:
            await client.publish(f"{PREFIX}/events", encode_event(event), qos=1)  # type: ignore[arg-type]
        async with asyncio.timeout(TIMEOUT_S):
            await wired.service.counted("events_applied", len(events))
        yield op
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)


async def _applied(wired: Wired, more: int) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        await wired.service.counted("events_applied", 10 + more)  # 10 = the depot's events


def _iso(at: datetime) -> str:
    return at.isoformat()


async def test_soc_topic_updates_the_car_and_a_qos1_duplicate_is_applied_once(
    wired: Wired, operator: Operator, clock: SimClock
) -> None:
    """The same payload twice is one event id: applied once, the second counted as duplicate."""
    payload = {"at": _iso(clock.now()), "soc": 0.55}
    await operator.send("vehicle/ev-1/soc", payload)
    await operator.send("vehicle/ev-1/soc", payload)
    async with asyncio.timeout(TIMEOUT_S):
        await wired.service.counted("events_duplicate", 1)
    assert wired.service.state.vehicles["ev-1"].soc == pytest.approx(0.55)
    assert wired.service.counters["events_applied"] == 11


async def test_older_soc_than_stored_is_dropped_and_counted(
    wired: Wired, operator: Operator, clock: SimClock
) -> None:
    """Out-of-order telemetry never overwrites newer state."""
    now = clock.now()
    await operator.send("vehicle/ev-2/soc", {"at": _iso(now), "soc": 0.6})
    await operator.send("vehicle/ev-2/soc", {"at": _iso(now - timedelta(minutes=3)), "soc": 0.1})
    async with asyncio.timeout(TIMEOUT_S):
        await wired.service.counted("events_stale", 1)
    assert wired.service.state.vehicles["ev-2"].soc == pytest.approx(0.6)


async def test_departure_topic_with_a_target_soc(
    wired: Wired, operator: Operator, clock: SimClock
) -> None:
    """A target given as SoC becomes kWh of the car's battery (60 kWh)."""
    departure = clock.now() + timedelta(hours=9)
    await operator.send(
        "vehicle/ev-3/departure",
        {"at": _iso(clock.now()), "departure": _iso(departure), "target_soc": 0.9},
    )
    await _applied(wired, 1)
    vehicle = wired.service.state.vehicles["ev-3"]
    assert vehicle.departure == departure
    assert vehicle.target_kwh == pytest.approx(54.0)


async def test_hourly_prices_become_quarter_hours_and_keep_their_forecast_mark(
    wired: Wired, operator: Operator, clock: SimClock
) -> None:
    """Two hourly prices give eight 15-minute values; the forecast starts at the second hour."""
    await operator.send(
        "price",
        {
            "at": _iso(clock.now()),
            "start": _iso(clock.now()),
            "resolution_min": 60,
            "price_eur_per_kwh": [0.1, 0.3],
            "forecast_from": 1,
        },
    )
    await _applied(wired, 1)
    prices = wired.service.state.prices
    assert prices is not None
    assert prices.values == (0.1,) * 4 + (0.3,) * 4
    assert prices.forecast_from == 4


async def test_headroom_and_site_load_topics(
    wired: Wired, operator: Operator, clock: SimClock
) -> None:
    """A head-room series and a measured load both reach the state."""
    await operator.send(
        "site/headroom",
        {"at": _iso(clock.now()), "start": _iso(clock.now()), "headroom_kw": [20.0, 25.0]},
    )
    await operator.send("site/load", {"at": _iso(clock.now()), "load_kw": 61.5})
    await _applied(wired, 2)
    assert wired.service.state.headroom is not None
    assert wired.service.state.headroom.values == (20.0, 25.0)
    assert wired.service.state.site_load is not None
    assert wired.service.state.site_load.load_kw == 61.5


def _command(clock: SimClock, command_id: str, command: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"command_id": command_id, "command": command, "at": _iso(clock.now())}
    body.update(fields)
    return body


@pytest.mark.parametrize(
    ("command", "fields", "override_kind"),
    [
        ("force_charge", {"vehicle_id": "ev-1", "duration_s": 3600}, "force_charge"),
        ("pause_vehicle", {"vehicle_id": "ev-1", "duration_s": 3600}, "pause_vehicle"),
        ("pause_charger", {"charger_id": "cp-2", "duration_s": 3600}, "pause_charger"),
        ("cap_site", {"limit_kw": 7.5, "duration_s": 3600}, "cap_site"),
        ("pin_charger", {"charger_id": "cp-3", "limit_kw": 5.0, "duration_s": 600}, "pin_charger"),
        ("set_v2g", {"vehicle_id": "ev-2", "enabled": True, "duration_s": 3600}, "set_v2g"),
    ],
)
async def test_each_override_command_is_accepted_and_stands_until_its_expiry(
    wired: Wired,
    operator: Operator,
    clock: SimClock,
    command: str,
    fields: dict[str, Any],
    override_kind: str,
) -> None:
    """The command's result is ok, and an override of its kind is in force until it expires."""
    await operator.send("operator/command", _command(clock, "c-1", command, **fields))
    assert (await operator.result("c-1"))["ok"] is True
    state = wired.service.state
    active = state.active_overrides(clock.now())
    assert [o.kind for o in active] == [override_kind]
    assert state.active_overrides(clock.now() + timedelta(seconds=fields["duration_s"])) == []


async def test_resume_ends_a_pause_and_change_departure_moves_it(
    wired: Wired, operator: Operator, clock: SimClock
) -> None:
    """Resume clears the pause on the car; change_departure sets a new departure and target."""
    await operator.send(
        "operator/command",
        _command(clock, "p", "pause_vehicle", vehicle_id="ev-1", duration_s=3600),
    )
    await operator.send("operator/command", _command(clock, "r", "resume", target_id="ev-1"))
    departure = clock.now() + timedelta(hours=5)
    await operator.send(
        "operator/command",
        _command(
            clock,
            "d",
            "change_departure",
            vehicle_id="ev-1",
            departure=_iso(departure),
            target_kwh=40.0,
        ),
    )
    assert [(await operator.result(c))["ok"] for c in ("p", "r", "d")] == [True] * 3
    assert wired.service.state.active_overrides(clock.now()) == []
    assert wired.service.state.vehicles["ev-1"].departure == departure
    assert wired.service.state.vehicles["ev-1"].target_kwh == 40.0


@pytest.mark.parametrize(
    ("command", "fields", "reason"),
    [
        ("force_charge", {"vehicle_id": "ev-404", "duration_s": 60}, "no vehicle 'ev-404'"),
        ("pause_charger", {"charger_id": "cp-404", "duration_s": 60}, "no charge point"),
        ("cap_site", {"limit_kw": -3.0, "duration_s": 60}, "limit_kw -3.0 is below 0.0"),
        ("pin_charger", {"charger_id": "cp-1", "limit_kw": 50.0, "duration_s": 60}, "circuit"),
        ("force_charge", {"vehicle_id": "ev-1"}, "give expires_at or duration_s"),
        ("teleport", {"vehicle_id": "ev-1", "duration_s": 60}, "does not match any"),
        (
            "change_departure",
            {"vehicle_id": "ev-1", "departure": "2024-03-04T10:00:00+00:00"},
            "is not after",
        ),
    ],
)
async def test_an_impossible_command_gets_an_error_result_with_the_reason(
    wired: Wired,
    operator: Operator,
    clock: SimClock,
    command: str,
    fields: dict[str, Any],
    reason: str,
) -> None:
    """Unknown car or charger, a negative cap, a pin above the circuit, no expiry, an unknown
    command, a departure in the past: each answered with why, and nothing changes."""
    before = wired.service.state
    await operator.send("operator/command", _command(clock, "bad-1", command, **fields))
    result = await operator.result("bad-1")
    assert result["ok"] is False
    assert reason in result["reason"]
    assert wired.service.state.overrides == before.overrides
    assert wired.service.state.vehicles == before.vehicles


async def test_an_expired_command_is_refused(
    wired: Wired, operator: Operator, clock: SimClock
) -> None:
    """An expiry already past when the command arrives is answered as expired."""
    issued = clock.now() - timedelta(hours=2)
    await operator.send(
        "operator/command",
        {
            "command_id": "old",
            "command": "cap_site",
            "at": _iso(issued),
            "expires_at": _iso(issued + timedelta(hours=1)),
            "limit_kw": 1.0,
        },
    )
    result = await operator.result("old")
    assert result["ok"] is False
    assert "expired" in result["reason"]


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("vehicle/ev-1/soc", "{"),
        ("vehicle/ev-1/soc", {"soc": 0.5}),
        ("vehicle/ev-1/soc", {"at": "2024-03-04T16:00:00", "soc": 0.5}),
        ("vehicle/ev-1/soc", {"at": "2024-03-04T16:00:00Z", "soc": 1.5}),
        ("vehicle/ev-1/soc", {"at": "2024-03-04T16:00:00Z", "soc": 0.5, "extra": 1}),
        ("vehicle/ev-1/departure", {"at": "2024-03-04T16:00:00Z"}),
        (
            "price",
            {
                "at": "2024-03-04T16:00:00Z",
                "start": "2024-03-04T16:05:00Z",
                "price_eur_per_kwh": [0.1],
            },
        ),
        (
            "price",
            {
                "at": "2024-03-04T16:00:00Z",
                "start": "2024-03-04T16:00:00Z",
                "price_eur_per_kwh": [],
            },
        ),
        (
            "price",
            {
                "at": "2024-03-04T16:00:00Z",
                "start": "2024-03-04T16:00:00Z",
                "resolution_min": 30,
                "price_eur_per_kwh": [0.1],
            },
        ),
        (
            "site/headroom",
            {
                "at": "2024-03-04T16:00:00Z",
                "start": "2024-03-04T16:00:00Z",
                "headroom_kw": ["lots"],
            },
        ),
        ("site/load", {"at": "2024-03-04T16:00:00Z", "load_kw": "NaN"}),
        ("operator/command", "[]"),
    ],
)
async def test_each_bad_payload_is_counted_and_dropped(
    wired: Wired, operator: Operator, topic: str, payload: dict[str, Any] | str
) -> None:
    """Broken JSON, missing or extra fields, naive or off-grid times, out-of-range values."""
    await operator.send(topic, payload)
    async with asyncio.timeout(TIMEOUT_S):
        await wired.service.counted("payloads_rejected_mqtt", 1)
    assert wired.service.counters["events_applied"] == 10


def test_the_published_topic_schemas_are_current() -> None:
    """docs/schemas/mqtt/*.json are what the code validates against (`voltpool schema`)."""
    for name, schema in schemas().items():
        published = json.loads((ROOT / f"docs/schemas/mqtt/{name}.json").read_text())
        assert published == json.loads(json.dumps(schema, sort_keys=True)), name
