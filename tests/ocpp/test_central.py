"""The central system over real WebSockets: boot, transactions, meter values, connection state."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from redis.asyncio import Redis

from adapters import redis_keys as keys
from adapters.ocpp.aio import redis_call
from adapters.ocpp.config import OcppConfig
from controller.clock import SimClock
from controller.errors import StoreUnavailable
from tests.conftest import T0
from tests.ocpp.conftest import (
    BOOT,
    SITE,
    Harness,
    ask,
    charger,
    fleet,
    frame,
    recv,
    running_central,
)


def start_frame(uid: str, connector: int = 1, tag: str = "TAG-9", meter: int = 1000) -> str:
    """A StartTransaction frame."""
    return frame(
        uid,
        "StartTransaction",
        {
            "connectorId": connector,
            "idTag": tag,
            "meterStart": meter,
            "timestamp": "2024-03-04T15:59:00Z",
        },
    )


async def test_boot_is_accepted_with_the_heartbeat_interval_and_the_clock_time(
    harness: Harness,
) -> None:
    """A known charge point gets Accepted, the configured interval and the central time."""
    async with harness.connect("CP-1", boot=False) as ws:
        answer = await ask(ws, frame("b1", "BootNotification", BOOT))
    assert answer == [
        3,
        "b1",
        {"currentTime": "2024-03-04T16:00:00Z", "interval": 300, "status": "Accepted"},
    ]


async def test_heartbeat_answers_the_central_time(harness: Harness) -> None:
    """Heartbeat carries the (simulated) central time."""
    await harness.clock.advance(timedelta(minutes=5))
    async with harness.connect("CP-1") as ws:
        answer = await ask(ws, frame("h1", "Heartbeat", {}))
    assert answer == [3, "h1", {"currentTime": "2024-03-04T16:05:00Z"}]


async def test_status_notification_becomes_a_connector_status_event(harness: Harness) -> None:
    """StatusNotification -> ConnectorStatusChanged at the charger's timestamp."""
    async with harness.connect("CP-1") as ws:
        payload = {
            "connectorId": 1,
            "errorCode": "NoError",
            "status": "Charging",
            "timestamp": "2024-03-04T15:58:00Z",
        }
        assert await ask(ws, frame("s1", "StatusNotification", payload)) == [3, "s1", {}]
    (event,) = harness.recorder.of("connector_status_changed")
    assert (event.charger_id, event.connector_id, event.status.value) == ("CP-1", 1, "Charging")
    assert event.at == T0 - timedelta(minutes=2)
    connector = harness.recorder.state.chargers["CP-1"].connector(1)
    assert connector is not None
    assert connector.status.value == "Charging"


async def test_transaction_ids_are_unique_and_a_replayed_start_gets_the_same_id(
    harness: Harness,
) -> None:
    """Two starts get two ids; the same start re-sent (its answer lost) gets its first id."""
    async with harness.connect("CP-1") as ws:
        first = await ask(ws, start_frame("t1"))
        again = await ask(ws, start_frame("t2"))
        other = await ask(ws, start_frame("t3", meter=2000))
    assert first[2]["transactionId"] == again[2]["transactionId"]
    assert other[2]["transactionId"] != first[2]["transactionId"]
    starts = harness.recorder.of("transaction_started")
    assert {e.event_id for e in starts} == {
        f"CP-1:tx:{first[2]['transactionId']}:start",
        f"CP-1:tx:{other[2]['transactionId']}:start",
    }
    assert len(harness.recorder.state.transactions) == 2


async def test_transaction_ids_survive_a_restart_of_the_central_system(
    redis: Redis, clock: SimClock
) -> None:
    """The id counter lives in Redis: a new central system never hands out an old id."""
    state = fleet([charger("CP-1")])
    seen = []
    for meter in (10, 20):
        async with running_central(redis, clock, state) as h, h.connect("CP-1") as ws:
            seen.append((await ask(ws, start_frame("t", meter=meter)))[2]["transactionId"])
    assert seen[1] > seen[0]


async def test_a_vehicle_tag_plugs_the_vehicle_in_and_ev_disconnect_unplugs_it(
    harness: Harness,
) -> None:
    """idTag of ev-1 -> VehiclePluggedIn + TransactionStarted; StopTransaction(EVDisconnected)
    -> TransactionStopped + VehicleUnplugged, applied to the fleet state by the real reducer."""
    async with harness.connect("CP-2") as ws:
        started = await ask(ws, start_frame("t1", tag="TAG-1"))
        tx = started[2]["transactionId"]
        assert harness.recorder.state.vehicles["ev-1"].charger_id == "CP-2"
        stop = {
            "meterStop": 5000,
            "timestamp": "2024-03-04T16:00:00Z",
            "transactionId": tx,
            "reason": "EVDisconnected",
        }
        assert await ask(ws, frame("t2", "StopTransaction", stop)) == [3, "t2", {}]
    kinds = [e.kind for e in harness.recorder.events if e.kind not in ("charger_connected",)]
    assert kinds[:4] == [
        "vehicle_plugged_in",
        "transaction_started",
        "transaction_stopped",
        "vehicle_unplugged",
    ]
    assert harness.recorder.state.transactions[tx].energy_kwh == pytest.approx(4.0)
    assert harness.recorder.state.vehicles["ev-1"].charger_id is None


async def test_available_after_a_stop_unplugs_the_vehicle_once(harness: Harness) -> None:
    """A Local stop leaves the car; the connector's Available status then unplugs it, once."""
    async with harness.connect("CP-1") as ws:
        tx = (await ask(ws, start_frame("t1", tag="TAG-1")))[2]["transactionId"]
        stop = {"meterStop": 1500, "timestamp": "2024-03-04T16:00:00Z", "transactionId": tx}
        await ask(ws, frame("t2", "StopTransaction", stop))
        assert harness.recorder.of("vehicle_unplugged") == []
        for uid in ("s1", "s2"):
            status = {"connectorId": 1, "errorCode": "NoError", "status": "Available"}
            await ask(ws, frame(uid, "StatusNotification", status))
    (unplugged,) = harness.recorder.of("vehicle_unplugged")
    assert unplugged.vehicle_id == "ev-1"


async def test_meter_values_become_meter_samples_in_wh_kw_and_soc_fraction(
    harness: Harness,
) -> None:
    """kWh and kW units are converted; per-phase powers add up; SoC % becomes a fraction."""
    payload = {
        "connectorId": 1,
        "transactionId": 7,
        "meterValue": [
            {
                "timestamp": "2024-03-04T15:59:50Z",
                "sampledValue": [
                    {"value": "12.5", "measurand": "Energy.Active.Import.Register", "unit": "kWh"},
                    {
                        "value": "2.0",
                        "measurand": "Power.Active.Import",
                        "unit": "kW",
                        "phase": "L1",
                    },
                    {
                        "value": "2.5",
                        "measurand": "Power.Active.Import",
                        "unit": "kW",
                        "phase": "L2",
                    },
                    {"value": "41", "measurand": "SoC", "unit": "Percent"},
                    {"value": "230.1", "measurand": "Voltage", "unit": "V"},
                ],
            },
            {"timestamp": "2024-03-04T15:59:55Z", "sampledValue": [{"value": "12600"}]},
        ],
    }
    async with harness.connect("CP-1") as ws:
        assert await ask(ws, frame("m1", "MeterValues", payload)) == [3, "m1", {}]
    first, second = harness.recorder.of("meter_sampled")
    assert (first.meter_wh, first.power_kw, first.soc) == (12500.0, 4.5, 0.41)
    assert first.transaction_id == 7
    assert first.event_id.startswith("CP-1:mv:1:2024-03-04T15:59:50Z:")
    assert first.event_id != second.event_id
    assert (second.meter_wh, second.power_kw, second.soc) == (12600.0, None, None)


async def test_connection_state_goes_to_redis_and_into_events(harness: Harness) -> None:
    """Online while connected, offline after; ChargerConnected then ChargerDisconnected."""
    key = keys.charger_connections(SITE)
    async with harness.connect("CP-3"):
        online = json.loads(str(await redis_call(harness.redis.hget(key, "CP-3"))))
        assert harness.central.is_online("CP-3")
    await harness.recorder.wait_for(lambda: bool(harness.recorder.of("charger_disconnected")))
    offline = json.loads(str(await redis_call(harness.redis.hget(key, "CP-3"))))
    assert (online["online"], online["accepted"], offline["online"]) == (True, True, False)
    assert [e.kind for e in harness.recorder.events] == [
        "charger_connected",
        "charger_disconnected",
    ]
    assert harness.recorder.state.chargers["CP-3"].online is False


async def test_a_new_connection_replaces_the_old_one(harness: Harness) -> None:
    """The newest authenticated connection wins; closing the old one leaves it online."""
    async with harness.connect("CP-1") as old, harness.connect("CP-1", boot=False) as new:
        with pytest.raises(Exception, match="1000"):
            await recv(old)
        assert await ask(new, frame("h", "Heartbeat", {})) == [
            3,
            "h",
            {"currentTime": "2024-03-04T16:00:00Z"},
        ]
        assert harness.central.is_online("CP-1")
        assert harness.central.metrics["connections_replaced"] == 1


async def test_a_reconnect_without_boot_is_served_when_the_charger_was_accepted_before(
    harness: Harness,
) -> None:
    """A charger that lost its link does not reboot; its calls are taken (no SecurityError)."""
    async with harness.connect("CP-1"):
        pass
    async with harness.connect("CP-1", boot=False) as ws:
        assert (await ask(ws, frame("h", "Heartbeat", {})))[0] == 3


async def test_calls_before_an_accepted_boot_get_security_error(harness: Harness) -> None:
    """A charger never accepted must boot first."""
    async with harness.connect("CP-2", boot=False) as ws:
        answer = await ask(ws, frame("h", "Heartbeat", {}))
    assert answer[:3] == [4, "h", "SecurityError"]


@pytest.mark.parametrize("status", ["Rejected", "Pending"])
async def test_an_unknown_charger_gets_the_configured_boot_status(
    redis: Redis, clock: SimClock, status: str
) -> None:
    """Without auth (profile 0, loopback only) an unknown charger is not Accepted."""
    config = OcppConfig(require_auth=False, unknown_boot_status=status, bcrypt_rounds=4)  # type: ignore[arg-type]
    async with (
        running_central(redis, clock, fleet([]), config=config) as h,
        h.connect("STRANGER", headers={}, boot=False) as ws,
    ):
        answer = await ask(ws, frame("b", "BootNotification", BOOT))
        assert answer[2]["status"] == status
        assert answer[2]["interval"] == config.pending_retry_s
        assert (await ask(ws, frame("h", "Heartbeat", {})))[2] == "SecurityError"


async def test_unknown_vendor_data_transfer_gets_unknown_vendor_id(harness: Harness) -> None:
    """DataTransfer from a vendor voltpool does not know."""
    async with harness.connect("CP-1") as ws:
        answer = await ask(ws, frame("d", "DataTransfer", {"vendorId": "com.acme", "data": "x"}))
    assert answer == [3, "d", {"status": "UnknownVendorId"}]


async def test_unknown_id_tags_are_invalid_when_so_configured(
    redis: Redis, clock: SimClock
) -> None:
    """With accept_unknown_id_tags off, only tags of vehicles are Accepted."""
    config = OcppConfig(accept_unknown_id_tags=False, bcrypt_rounds=4)
    async with (
        running_central(
            redis, clock, fleet([charger("CP-1")]), config=config, tags={"OK": "ev"}
        ) as h,
        h.connect("CP-1") as ws,
    ):
        bad = await ask(ws, frame("a1", "Authorize", {"idTag": "NOPE"}))
        good = await ask(ws, frame("a2", "Authorize", {"idTag": "OK"}))
    assert (bad[2]["idTagInfo"]["status"], good[2]["idTagInfo"]["status"]) == (
        "Invalid",
        "Accepted",
    )


async def test_a_store_outage_answers_internal_error_so_the_charger_retries(
    harness: Harness,
) -> None:
    """T-06: never a CALLRESULT without the event taken; the connection stays usable."""
    async with harness.connect("CP-1") as ws:
        harness.recorder.fail_with = StoreUnavailable("redis down")
        failed = await ask(
            ws,
            frame(
                "m1",
                "MeterValues",
                {
                    "connectorId": 1,
                    "meterValue": [
                        {"timestamp": "2024-03-04T16:00:00Z", "sampledValue": [{"value": "10"}]}
                    ],
                },
            ),
        )
        harness.recorder.fail_with = None
        ok = await ask(
            ws,
            frame(
                "m2",
                "MeterValues",
                {
                    "connectorId": 1,
                    "meterValue": [
                        {"timestamp": "2024-03-04T16:00:00Z", "sampledValue": [{"value": "10"}]}
                    ],
                },
            ),
        )
    assert failed[:3] == [4, "m1", "InternalError"]
    assert failed[4] == {}
    assert ok == [3, "m2", {}]
    assert len(harness.recorder.of("meter_sampled")) == 1
