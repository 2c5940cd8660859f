"""The CALLs the central system sends, and their answers, checked by compiled schemas (issue #8).

`ChargerSession._call` replaces the library's `call`: the payload is converted through a key
cache and checked by `frames.outbound_valid` (fastjsonschema) instead of jsonschema in a thread
with a Decimal re-parse. These tests pin what must not change:

- the payload is the library's (`remove_nones(snake_to_camel_case(serialize_as_dict(p)))`) for
  every request type the central system sends, and the frame sent for a SetChargingProfile
  built by voltpool's own profile code is byte for byte the frame the library sends after its
  Decimal validation;
- the compiled check passes exactly what the library's validation passes, on valid profiles and
  on profiles with one fault (a limit not a multiple of 0.1, NaN, a string limit, a missing or
  an extra property, a bad enum), and on answers;
- over a real socket: an invalid profile is refused before anything is sent (the library's
  error, as before), an answer outside its schema raises the library's error as a CallFailed,
  and a GetCompositeSchedule answer comes back as before (floats).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from ocpp.charge_point import remove_nones, serialize_as_dict, snake_to_camel_case
from ocpp.exceptions import OCPPError
from ocpp.messages import Call, CallResult, _validate_payload
from ocpp.v16 import call

from adapters.ocpp.central import outgoing_payload
from adapters.ocpp.errors import CallFailed
from adapters.ocpp.frames import outbound_valid
from adapters.ocpp.profiles import OutgoingProfile, to_limit
from tests.conftest import T0
from tests.ocpp.conftest import Harness, absolute_profile, charger, recv

EXAMPLES = 400


def _library_payload(payload: Any) -> Any:
    return remove_nones(snake_to_camel_case(serialize_as_dict(payload)))


def _library_accepts(message: Call | CallResult) -> bool:
    try:
        _validate_payload(message, "1.6")
    except OCPPError:
        return False
    return True


def _random_profile(rng: random.Random) -> OutgoingProfile:
    """A profile as the dispatcher builds it: limits from `to_limit` in W or A."""
    unit = rng.choice(("W", "A"))
    point = charger("CP-1", max_power_kw=rng.choice((3.7, 11.0, 22.0)), rate_unit=unit)
    periods = rng.randint(1, 24)
    offsets = sorted(rng.sample(range(1, 86_400), periods - 1))
    return OutgoingProfile(
        slot="tx:1",
        connector_id=1,
        purpose=rng.choice(("TxProfile", "TxDefaultProfile", "ChargePointMaxProfile")),
        profile_id=rng.randint(1, 200),
        stack_level=rng.randint(0, 3),
        unit=point.rate_unit,
        start=T0 + timedelta(seconds=rng.randint(0, 10**6)),
        offsets_s=(0, *offsets),
        limits=tuple(to_limit(rng.uniform(-5.0, 25.0), point) for _ in range(periods)),
        phases=3,
        transaction_id=rng.choice((None, rng.randint(1, 10**6))),
    )


def test_the_payload_sent_is_the_librarys_for_every_request_type() -> None:
    """Key for key and value for value, None fields dropped, lists of strings kept."""
    profile = absolute_profile(101, "TxProfile", [(0, 7400.0), (900, 0.0)], transaction_id=3)
    requests: list[Any] = [
        call.SetChargingProfile(connector_id=1, cs_charging_profiles=profile),
        call.ClearChargingProfile(id=None, connector_id=1, charging_profile_purpose="TxProfile"),
        call.ClearChargingProfile(),
        call.GetCompositeSchedule(connector_id=1, duration=900, charging_rate_unit=None),
        call.RemoteStartTransaction(id_tag="TAG", connector_id=None, charging_profile=profile),
        call.RemoteStopTransaction(transaction_id=9),
        call.TriggerMessage(requested_message="StatusNotification", connector_id=None),
        call.ChangeConfiguration(key="AuthorizationKey", value="x" * 40),
        call.GetConfiguration(key=["ChargeProfileMaxStackLevel", "HeartbeatInterval"]),
        call.GetConfiguration(key=None),
        call.DataTransfer(vendor_id="org.voltpool", message_id=None, data='{"a": 1}'),
    ]
    for request in requests:
        assert outgoing_payload(request) == _library_payload(request), request


def test_a_payload_holding_a_dataclass_goes_the_librarys_way() -> None:
    """A nested dataclass (not what voltpool sends, but what the library takes) is serialised
    by the library's own function."""

    @dataclass
    class Inner:
        some_value: int
        not_set: str | None = None

    @dataclass
    class Outer:
        inner_part: Inner
        many_parts: list[Inner]

    payload = Outer(Inner(1), [Inner(2, "x"), Inner(3)])
    assert outgoing_payload(payload) == _library_payload(payload)
    assert outgoing_payload(payload) == {
        "innerPart": {"someValue": 1},
        "manyParts": [{"someValue": 2, "notSet": "x"}, {"someValue": 3}],
    }


def test_a_built_profile_is_sent_byte_for_byte_as_the_library_sends_it() -> None:
    """400 random profiles from voltpool's own encoding (`to_limit`, `to_ocpp`): the compiled
    check passes each, and the frame is the one the library writes after re-parsing the
    payload with Decimal and encoding it back with one decimal."""
    rng = random.Random(16)
    for n in range(EXAMPLES):
        profile = _random_profile(rng)
        request = call.SetChargingProfile(connector_id=1, cs_charging_profiles=profile.to_ocpp())
        ours = Call(f"id-{n}", "SetChargingProfile", outgoing_payload(request))
        assert outbound_valid("SetChargingProfile", ours.payload, answer=False)
        library = Call(f"id-{n}", "SetChargingProfile", _library_payload(request))
        _validate_payload(library, "1.6")  # the library's path: Decimal payload afterwards
        assert ours.to_json() == library.to_json()


def _faults(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Copies of a SetChargingProfile payload with one fault each."""
    out: list[dict[str, Any]] = []

    def mutated(change: Any) -> None:
        copied = copy.deepcopy(payload)
        change(copied)
        out.append(copied)

    def period(p: dict[str, Any]) -> dict[str, Any]:
        first: dict[str, Any] = p["csChargingProfiles"]["chargingSchedule"][
            "chargingSchedulePeriod"
        ][0]
        return first

    mutated(lambda p: period(p).update(limit=7.45))
    mutated(lambda p: period(p).update(limit=0.30000000000000004))
    mutated(lambda p: period(p).update(limit=math.nan))
    mutated(lambda p: period(p).update(limit=math.inf))
    mutated(lambda p: period(p).update(limit="7.4"))
    mutated(lambda p: period(p).update(startPeriod=1.5))
    mutated(lambda p: period(p).pop("limit"))
    mutated(lambda p: period(p).update(extra=1))
    mutated(lambda p: p["csChargingProfiles"].update(chargingProfilePurpose="Tx"))
    mutated(lambda p: p["csChargingProfiles"].pop("chargingSchedule"))
    mutated(lambda p: p.update(connectorId=True))
    mutated(lambda p: p.update(unknown="x"))
    return out


def test_the_compiled_check_passes_exactly_what_the_librarys_validation_passes() -> None:
    """Valid profiles pass both; each one-fault copy fails both (the library raises)."""
    rng = random.Random(23)
    faulty = 0
    for n in range(EXAMPLES // 4):
        profile = _random_profile(rng)
        request = call.SetChargingProfile(connector_id=1, cs_charging_profiles=profile.to_ocpp())
        payload = outgoing_payload(request)
        for candidate in [payload, *_faults(payload)]:
            ours = outbound_valid("SetChargingProfile", candidate, answer=False)
            library = Call(f"id-{n}", "SetChargingProfile", copy.deepcopy(candidate))
            try:
                accepted = _library_accepts(library)
            except (ArithmeticError, TypeError, ValueError):
                accepted = False  # the library's validation fails on it (not an OCPPError)
            assert ours == accepted, candidate
            faulty += not ours
    assert faulty == (EXAMPLES // 4) * len(_faults(payload))


def test_answers_are_checked_against_the_answer_schemas() -> None:
    """CALLRESULT payloads: what the library's validation passes, the compiled check passes."""
    answers: list[tuple[str, dict[str, Any]]] = [
        ("SetChargingProfile", {"status": "Accepted"}),
        ("SetChargingProfile", {"status": "NotSupported"}),
        ("SetChargingProfile", {"status": "Maybe"}),
        ("SetChargingProfile", {}),
        ("SetChargingProfile", {"status": "Accepted", "extra": 1}),
        ("ClearChargingProfile", {"status": "Unknown"}),
        ("TriggerMessage", {"status": "NotImplemented"}),
        ("GetConfiguration", {"configurationKey": [{"key": "A", "readonly": True}]}),
        ("GetConfiguration", {"configurationKey": [{"key": "A", "readonly": "yes"}]}),
        ("GetCompositeSchedule", {"status": "Rejected"}),
        (
            "GetCompositeSchedule",
            {
                "status": "Accepted",
                "connectorId": 1,
                "scheduleStart": "2024-03-04T16:00:00Z",
                "chargingSchedule": {
                    "chargingRateUnit": "W",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 7400.5}],
                },
            },
        ),
        (
            "GetCompositeSchedule",
            {
                "status": "Accepted",
                "chargingSchedule": {
                    "chargingRateUnit": "W",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 7400.55}],
                },
            },
        ),
        ("DataTransfer", {"status": "UnknownVendorId"}),
    ]
    verdicts = []
    for action, payload in answers:
        ours = outbound_valid(action, payload, answer=True)
        library = CallResult("x", copy.deepcopy(payload), action)
        assert ours == _library_accepts(library), (action, payload)
        verdicts.append(ours)
    assert verdicts.count(False) == 5  # the faulty answers above are refused, by both


async def test_an_invalid_profile_is_refused_before_it_is_sent(harness: Harness) -> None:
    """Over a real socket: a limit that is not a multiple of 0.1 raises the library's error
    (as a CallFailed) and nothing goes out: the first frame the charger then receives is the
    valid profile sent after it, which it answers."""
    async with harness.connect("CP-1") as ws:
        bad = absolute_profile(101, "TxProfile", [(0, 7400.05)], transaction_id=1)
        with pytest.raises(CallFailed) as refused:
            await harness.central.set_charging_profile("CP-1", 1, bad)
        library = Call("x", "SetChargingProfile", {"connectorId": 1, "csChargingProfiles": bad})
        with pytest.raises(OCPPError) as expected:
            _validate_payload(library, "1.6")
        assert refused.value.code == expected.value.code

        good = absolute_profile(101, "TxProfile", [(0, 7400.1)], transaction_id=1)
        sending = asyncio.ensure_future(harness.central.set_charging_profile("CP-1", 1, good))
        first = await recv(ws)
        assert first[2] == "SetChargingProfile"
        assert first[3]["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"] == [
            {"startPeriod": 0, "limit": 7400.1}
        ]
        await ws.send(f'[3,"{first[1]}",{{"status":"Accepted"}}]')
        assert await sending == "Accepted"


async def test_an_answer_outside_its_schema_raises_the_librarys_error(harness: Harness) -> None:
    """A SetChargingProfile answered {"status": "Maybe"} is a CallFailed with the code the
    library's validation gives; a GetCompositeSchedule answer comes back with float limits."""
    async with harness.connect("CP-1") as ws:
        profile = absolute_profile(1, "TxDefaultProfile", [(0, 11000.0)])
        sending = asyncio.ensure_future(harness.central.set_charging_profile("CP-1", 0, profile))
        request = await recv(ws)
        await ws.send(f'[3,"{request[1]}",{{"status":"Maybe"}}]')
        with pytest.raises(CallFailed) as failed:
            await sending
        with pytest.raises(OCPPError) as expected:
            _validate_payload(CallResult("x", {"status": "Maybe"}, "SetChargingProfile"), "1.6")
        assert failed.value.code == expected.value.code

        asking = asyncio.ensure_future(harness.central.get_composite_schedule("CP-1", 1, 900))
        request = await recv(ws)
        assert request[2:] == ["GetCompositeSchedule", {"connectorId": 1, "duration": 900}]
        schedule = {
            "chargingRateUnit": "W",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 7400.5}],
        }
        answer = {"status": "Accepted", "connectorId": 1, "chargingSchedule": schedule}
        await ws.send(f'[3,"{request[1]}",{json.dumps(answer)}]')
        got = await asking
        assert got == answer
        limit = got["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"]
        assert isinstance(limit, float)


async def test_a_call_whose_requester_is_cancelled_stops_and_its_late_answer_is_dropped(
    harness: Harness,
) -> None:
    """A dispatcher worker cancelled while its SetChargingProfile is out (stopped, or replaced
    at a reconnect): the CALL stops with it instead of running on unobserved, its late answer
    is dropped as unmatched (counted), and the next CALL to the charger goes out and is
    answered as usual."""
    async with harness.connect("CP-1") as ws:
        profile = absolute_profile(1, "TxDefaultProfile", [(0, 11000.0)])
        first = asyncio.ensure_future(harness.central.set_charging_profile("CP-1", 0, profile))
        request = await recv(ws)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await ws.send(f'[3,"{request[1]}",{{"status":"Accepted"}}]')  # too late
        second = asyncio.ensure_future(harness.central.set_charging_profile("CP-1", 0, profile))
        again = await recv(ws)
        assert again[1] != request[1]
        await ws.send(f'[3,"{again[1]}",{{"status":"Accepted"}}]')
        assert await second == "Accepted"
        assert harness.central.metrics["answers_unmatched"] == 1
