"""Bad input, frame by frame: each gets the OCPP-J 1.6 answer and the connection keeps working.

The corpus runs over real sockets against the central system (RELIABILITY.md O-01..O-17); a
Hypothesis property runs the frame checker itself on arbitrary JSON (O-18).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from adapters.ocpp.frames import HANDLED_ACTIONS, ONE_SIX_CODES, FrameChecker, schema_error
from tests.ocpp.conftest import Harness, ask, frame, recv

STATUS = {"connectorId": 1, "errorCode": "NoError", "status": "Available"}
START = {"connectorId": 1, "idTag": "T1", "meterStart": 0, "timestamp": "2024-03-04T16:00:00Z"}


def meter(value: str, measurand: str | None = None, ts: str = "2024-03-04T16:00:00Z") -> str:
    """A MeterValues frame with one sampled value."""
    sample: dict[str, str] = {"value": value}
    if measurand:
        sample["measurand"] = measurand
    return frame(
        "mv",
        "MeterValues",
        {"connectorId": 1, "meterValue": [{"timestamp": ts, "sampledValue": [sample]}]},
    )


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of a payload with keys changed (`...` removes one)."""
    out = dict(base)
    for key, value in changes.items():
        if value is ...:
            out.pop(key)
        else:
            out[key] = value
    return out


# (frame, expected): expected is (echoed id, 1.6 code), or None when the frame is dropped.
CORPUS: dict[str, tuple[str | bytes, tuple[str, str] | None]] = {
    # O-01 / O-02: nothing to answer to
    "not json": ("not json", None),
    "truncated json": ('[2,"m9","Heartbeat"', None),
    "json object": ('{"a":1}', None),
    "json string": ('"hello"', None),
    "json number": ("42", None),
    "json null": ("null", None),
    "empty array": ("[]", None),
    "array without id": ("[2]", None),
    "NaN literal": ('[2,"n1","Heartbeat",NaN]', None),
    "binary frame": (b"\x00\x01\x02", None),
    "invalid utf-8 binary": (b"\xff\xfe\xfd", None),
    "nesting too deep": ("[" * 20_000, None),
    # O-13: answers to CALLs we never sent are never answered
    "callresult for no call": ('[3,"nobody",{}]', None),
    "callerror for no call": ('[4,"nobody","GenericError","",{}]', None),
    # O-02 / O-03 / O-04: FormationViolation
    "message type 9": ('[9,"m1","Heartbeat",{}]', ("m1", "FormationViolation")),
    "message type as string": ('["2","m2","Heartbeat",{}]', ("m2", "FormationViolation")),
    "message type as float": ('[2.0,"m3","Heartbeat",{}]', ("m3", "FormationViolation")),
    "message type true": ('[true,"m4","Heartbeat",{}]', ("m4", "FormationViolation")),
    "call with 3 elements": ('[2,"m5","Heartbeat"]', ("m5", "FormationViolation")),
    "call with 5 elements": ('[2,"m6","Heartbeat",{},{}]', ("m6", "FormationViolation")),
    "numeric id": ('[2,17,"Heartbeat",{}]', ("", "FormationViolation")),
    "empty id": ('[2,"","Heartbeat",{}]', ("", "FormationViolation")),
    "null id": ('[2,null,"Heartbeat",{}]', ("", "FormationViolation")),
    "id of 37 characters": (frame("i" * 37, "Heartbeat", {}), ("i" * 37, "FormationViolation")),
    "non-ascii id": ('[2,"idé","Heartbeat",{}]', ("idé", "FormationViolation")),
    "action not a string": ('[2,"m7",5,{}]', ("m7", "FormationViolation")),
    "payload an array": ('[2,"m8","Heartbeat",[]]', ("m8", "FormationViolation")),
    "payload null": ('[2,"m9","Heartbeat",null]', ("m9", "FormationViolation")),
    # O-09: properties the schema does not allow
    "extra property": (frame("x1", "Heartbeat", {"x": 1}), ("x1", "FormationViolation")),
    "extra nested property": (
        frame(
            "x2",
            "MeterValues",
            {
                "connectorId": 1,
                "meterValue": [
                    {"timestamp": "2024-03-04T16:00:00Z", "sampledValue": [{"value": "1", "q": 1}]}
                ],
            },
        ),
        ("x2", "FormationViolation"),
    ),
    # O-05 / O-06
    "unknown action": (frame("u1", "FooBar", {}), ("u1", "NotImplemented")),
    "action in the wrong case": (frame("u2", "heartbeat", {}), ("u2", "NotImplemented")),
    "cs-to-cp action Reset": (frame("u3", "Reset", {"type": "Soft"}), ("u3", "NotSupported")),
    "security extension action": (
        frame("u4", "SignCertificate", {"csr": "x"}),
        ("u4", "NotSupported"),
    ),
    "SetChargingProfile from a charger": (
        frame("u5", "SetChargingProfile", {}),
        ("u5", "NotSupported"),
    ),
    # O-08: missing required properties
    "boot without fields": (frame("r1", "BootNotification", {}), ("r1", "ProtocolError")),
    "start without timestamp": (
        frame("r2", "StartTransaction", with_(START, timestamp=...)),
        ("r2", "ProtocolError"),
    ),
    "status without status": (
        frame("r3", "StatusNotification", with_(STATUS, status=...)),
        ("r3", "ProtocolError"),
    ),
    # O-07: types and lengths
    "connector id as string": (
        frame("t1", "StatusNotification", with_(STATUS, connectorId="1")),
        ("t1", "TypeConstraintViolation"),
    ),
    "connector id as boolean": (
        frame("t2", "StatusNotification", with_(STATUS, connectorId=True)),
        ("t2", "TypeConstraintViolation"),
    ),
    "idTag of 21 characters": (
        frame("t3", "Authorize", {"idTag": "x" * 21}),
        ("t3", "TypeConstraintViolation"),
    ),
    "meterStart not an integer": (
        frame("t4", "StartTransaction", with_(START, meterStart=1.5)),
        ("t4", "TypeConstraintViolation"),
    ),
    "vendor as number": (
        frame("t5", "BootNotification", {"chargePointVendor": 1, "chargePointModel": "m"}),
        ("t5", "TypeConstraintViolation"),
    ),
    # cardinality
    "no meter values": (
        frame("c1", "MeterValues", {"connectorId": 1, "meterValue": []}),
        ("c1", "OccurenceConstraintViolation"),
    ),
    "no sampled values": (
        frame(
            "c2",
            "MeterValues",
            {
                "connectorId": 1,
                "meterValue": [{"timestamp": "2024-03-04T16:00:00Z", "sampledValue": []}],
            },
        ),
        ("c2", "OccurenceConstraintViolation"),
    ),
    # O-09 / O-10: values
    "status not in the enum": (
        frame("p1", "StatusNotification", with_(STATUS, status="Flying")),
        ("p1", "PropertyConstraintViolation"),
    ),
    "timestamp not a date": (
        frame("p2", "StatusNotification", with_(STATUS, timestamp="not-a-date")),
        ("p2", "PropertyConstraintViolation"),
    ),
    "timestamp without zone": (
        frame("p3", "StartTransaction", with_(START, timestamp="2024-03-04T16:00:00")),
        ("p3", "PropertyConstraintViolation"),
    ),
    "february 30": (
        frame("p4", "StartTransaction", with_(START, timestamp="2024-02-30T00:00:00Z")),
        ("p4", "PropertyConstraintViolation"),
    ),
    "timestamp 10 min ahead": (
        frame("p5", "StartTransaction", with_(START, timestamp="2024-03-04T16:10:00Z")),
        ("p5", "PropertyConstraintViolation"),
    ),
    "negative connector id": (
        frame("p6", "StatusNotification", with_(STATUS, connectorId=-5)),
        ("p6", "PropertyConstraintViolation"),
    ),
    "transaction on connector 0": (
        frame("p7", "StartTransaction", with_(START, connectorId=0)),
        ("p7", "PropertyConstraintViolation"),
    ),
    "connector the charger does not have": (
        frame("p8", "StatusNotification", with_(STATUS, connectorId=2)),
        ("p8", "PropertyConstraintViolation"),
    ),
    "negative meterStart": (
        frame("p9", "StartTransaction", with_(START, meterStart=-1)),
        ("p9", "PropertyConstraintViolation"),
    ),
    "meter value abc": (meter("abc"), ("mv", "PropertyConstraintViolation")),
    "meter value NaN": (meter("NaN"), ("mv", "PropertyConstraintViolation")),
    "meter value 1e999": (meter("1e999"), ("mv", "PropertyConstraintViolation")),
    "meter value empty": (meter(""), ("mv", "PropertyConstraintViolation")),
    "negative energy register": (
        meter("-5", "Energy.Active.Import.Register"),
        ("mv", "PropertyConstraintViolation"),
    ),
    "SoC of 140 %": (meter("140", "SoC"), ("mv", "PropertyConstraintViolation")),
    "power of 100 MW": (
        meter("1e8", "Power.Active.Import"),
        ("mv", "PropertyConstraintViolation"),
    ),
    "meter timestamp not a date": (
        meter("5", ts="yesterday"),
        ("mv", "PropertyConstraintViolation"),
    ),
}


def assert_callerror_shape(answer: Any) -> None:
    """O-17: five elements, a 1.6 code (never 2.0.1's FormatViolation), a string, an object."""
    assert isinstance(answer, list)
    assert len(answer) == 5
    assert answer[0] == 4
    assert isinstance(answer[1], str)
    assert answer[2] in ONE_SIX_CODES
    assert answer[2] != "FormatViolation"
    assert isinstance(answer[3], str)
    assert isinstance(answer[4], dict)


def test_the_corpus_is_large_enough() -> None:
    """RELIABILITY.md asks for at least 40 malformed-frame cases."""
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("name", list(CORPUS))
async def test_bad_frame_gets_the_16_answer_and_the_connection_keeps_working(
    harness: Harness, name: str
) -> None:
    """Each bad frame: the exact CALLERROR (or none), then a Heartbeat is still served."""
    bad, expected = CORPUS[name]
    async with harness.connect("CP-1") as ws:
        await ws.send(bad)
        answer = await ask(ws, frame("probe", "Heartbeat", {}))
        if expected is None:
            assert answer == [3, "probe", {"currentTime": "2024-03-04T16:00:00Z"}]
        else:
            assert_callerror_shape(answer)
            assert answer[1:3] == list(expected)
            assert await recv(ws) == [3, "probe", {"currentTime": "2024-03-04T16:00:00Z"}]
    assert harness.recorder.of("meter_sampled") == []
    assert harness.recorder.of("transaction_started") == []


async def test_a_repeated_message_id_gets_protocol_error_and_is_applied_once(
    harness: Harness,
) -> None:
    """O-11: the second CALL with the same id on one connection -> ProtocolError."""
    sample = meter("100")
    async with harness.connect("CP-1") as ws:
        assert await ask(ws, sample) == [3, "mv", {}]
        again = await ask(ws, sample)
    assert_callerror_shape(again)
    assert again[1:3] == ["mv", "ProtocolError"]
    assert len(harness.recorder.of("meter_sampled")) == 1


async def test_the_same_message_id_on_a_new_connection_is_a_new_call(harness: Harness) -> None:
    """O-12: ids are per connection; de-duplication of facts is by content (event id)."""
    sample = meter("100")
    for _ in range(2):
        async with harness.connect("CP-1") as ws:
            assert await ask(ws, sample) == [3, "mv", {}]
    first, second = harness.recorder.of("meter_sampled")
    assert first.event_id == second.event_id


async def test_an_oversized_frame_closes_that_connection_only(harness: Harness) -> None:
    """O-16: a frame over 64 KiB closes with 1009; another charger is not affected."""
    async with harness.connect("CP-1") as big, harness.connect("CP-2") as other:
        await big.send(
            json.dumps([2, "big", "DataTransfer", {"vendorId": "v", "data": "x" * 70_000}])
        )
        with pytest.raises(ConnectionClosed) as closed:
            await recv(big)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
        answer = await ask(other, frame("h", "Heartbeat", {}))
        assert answer[0] == 3
    await harness.recorder.wait_for(lambda: not harness.central.is_online("CP-1"))
    assert harness.central.metrics["frames_oversized"] == 1


async def test_a_garbage_burst_from_one_charger_leaves_the_others_served(harness: Harness) -> None:
    """Bad frames are answered and counted per connection; the neighbour sees nothing."""
    async with harness.connect("CP-1") as noisy, harness.connect("CP-2") as quiet:
        for i in range(50):
            await noisy.send(f"garbage {i}")
            await noisy.send(frame(f"u{i}", "FooBar", {}))
        answer = await ask(quiet, frame("q", "Heartbeat", {}))
        assert answer == [3, "q", {"currentTime": "2024-03-04T16:00:00Z"}]
        codes = [(await recv(noisy))[2] for _ in range(50)]
        assert codes == ["NotImplemented"] * 50
    assert harness.central.metrics["frames_drop"] == 50
    assert harness.central.metrics["callerror_NotImplemented"] == 50


# --- Hypothesis: the checker on arbitrary JSON (O-18) ------------------------------------------

NOW = datetime(2024, 3, 4, 16, 0, tzinfo=UTC)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
actions = st.sampled_from([*sorted(HANDLED_ACTIONS), "FooBar", "Reset", ""])
calls = st.tuples(
    st.sampled_from([2, 3, 4, 9, "2", None]),
    st.one_of(st.text(max_size=40), st.integers(), st.none()),
    actions,
    json_values,
).map(list)
VALID: dict[str, dict[str, Any]] = {
    "Authorize": {"idTag": "T1"},
    "BootNotification": {"chargePointVendor": "v", "chargePointModel": "m"},
    "DataTransfer": {"vendorId": "v", "messageId": "m", "data": "d"},
    "Heartbeat": {},
    "MeterValues": {
        "connectorId": 1,
        "transactionId": 3,
        "meterValue": [
            {
                "timestamp": "2024-03-04T15:00:00Z",
                "sampledValue": [{"value": "10", "measurand": "SoC", "unit": "Percent"}],
            }
        ],
    },
    "StartTransaction": START,
    "StatusNotification": with_(STATUS, timestamp="2024-03-04T15:00:00+01:00"),
    "StopTransaction": {"meterStop": 9, "timestamp": "2024-03-04T15:00:00Z", "transactionId": 3},
}


@st.composite
def mutated_calls(draw: st.DrawFn) -> list[Any]:
    """A valid CALL of a handled action with up to three keys dropped, replaced or added."""
    action = draw(st.sampled_from(sorted(VALID)))
    payload = json.loads(json.dumps(VALID[action]))
    for _ in range(draw(st.integers(0, 3))):
        target = payload
        inner = payload.get("meterValue")
        if isinstance(inner, list) and inner and isinstance(inner[0], dict) and draw(st.booleans()):
            target = inner[0]
        keys = [*sorted(target), "extra"]
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(json_values)
    ascii_id = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=36)
    return [2, draw(ascii_id), action, payload]


frames_ = st.one_of(json_values, calls, calls.map(lambda c: c[:3]), mutated_calls())


@given(message=frames_)
@settings(max_examples=2000, deadline=None)
def test_every_frame_is_passed_valid_answered_in_shape_or_dropped(message: Any) -> None:
    """The checker never raises; what it passes on is a valid CALL of a handled action; what it
    answers is a well-formed 1.6 CALLERROR."""
    checker = FrameChecker(now=lambda: NOW)
    checker.boot_accepted = True
    verdict = checker.check(json.dumps(message))
    assert verdict.kind in ("call", "reply", "drop")  # no CALL of ours is outstanding
    if verdict.kind == "reply":
        assert_callerror_shape(json.loads(verdict.text))
    if verdict.kind == "call":
        parsed = json.loads(verdict.text)
        assert parsed[0] == 2
        assert parsed[2] in HANDLED_ACTIONS
        assert schema_error(parsed[2], parsed[3]) is None
