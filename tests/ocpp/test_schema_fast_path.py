"""The compiled schema checks of the frame checker agree with jsonschema (issue #8, O-01..O-19).

`adapters.ocpp.frames.schema_error` first asks a predicate compiled once from the library's
OCPP 1.6 schema; only a payload it does not pass is interpreted by jsonschema. The answers
stay jsonschema's as long as the predicate never passes a payload jsonschema refuses; here it
is compared with `Draft4Validator.is_valid` on payloads generated from each handled action's
schema, most of them valid, the rest with one of the faults a charge point makes (a wrong type,
`true` or `1.0` for an integer, a value outside an enum, a string one over its maxLength, an
empty array, a missing required or an extra property), so both verdicts are exercised.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ocpp.messages import get_validator

from adapters.ocpp.frames import (
    HANDLED_ACTIONS,
    CallErrorCode,
    compile_schema,
    fast_check,
    schema_error,
)

EXAMPLES_PER_ACTION = 50
VERDICTS: Counter[str] = Counter()

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
any_json = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def valid_for(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that conform to a schema node (edges included: a string at its maxLength)."""
    kind = schema.get("type")
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if kind == "string":
        limit = schema.get("maxLength", 12)
        return st.text(max_size=limit) | st.just("x" * limit)
    if kind == "integer":
        return st.integers(-5, 10**6)
    if kind == "number":
        return st.floats(-1e6, 1e6) | st.integers(-5, 10**6)
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        least = schema.get("minItems", 0)
        return st.lists(valid_for(schema["items"]), min_size=least, max_size=max(least, 3))
    if kind == "object":
        return objects_for(schema, faulty=False)
    return any_json


def faulty_for(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values with one of the faults a charge point makes at this node or below it."""
    kind = schema.get("type")
    wrong_type: st.SearchStrategy[Any] = any_json.filter(
        lambda v: not isinstance(v, dict | list)
    ) | st.just({})
    if "enum" in schema:
        return st.sampled_from(["", "Bogus", schema["enum"][0] + "x", 1]) | wrong_type
    if kind == "string":
        limit = schema.get("maxLength")
        over = st.just("x" * (limit + 1)) if limit is not None else st.nothing()
        return over | wrong_type
    if kind == "integer":
        return st.sampled_from([1.0, True, False, 2.5, "1", None])
    if kind == "number":
        return st.sampled_from([True, "1.5", None, [1]])
    if kind == "boolean":
        return st.sampled_from([0, 1, "true", None])
    if kind == "array":
        least = schema.get("minItems", 0)
        too_few = st.just([None] * 0) if least else st.nothing()
        one_bad = st.tuples(
            st.lists(valid_for(schema["items"]), max_size=2), faulty_for(schema["items"])
        ).map(lambda pair: [*pair[0], pair[1]])
        return too_few | one_bad | st.just({})
    if kind == "object":
        return objects_for(schema, faulty=True) | st.sampled_from([[], "x", 1])
    return any_json


def objects_for(schema: dict[str, Any], *, faulty: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with every required property and some optional ones; when `faulty`, one fault:
    a required property dropped, a property added (unknown, or a known one with any value), or
    one property's value faulty."""
    properties: dict[str, Any] = schema.get("properties", {})
    required: list[str] = schema.get("required", [])

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, sub in properties.items():
            if name in required or draw(st.booleans()):
                out[name] = draw(valid_for(sub))
        if not faulty:
            return out
        faults = ["extra", "known"] + (["drop"] if required else []) + (["deep"] if out else [])
        fault = draw(st.sampled_from(faults))
        if fault == "drop":
            del out[draw(st.sampled_from(required))]
        elif fault == "extra":
            out[draw(st.sampled_from(["extra", "connectorid", ""]))] = draw(any_json)
        elif fault == "known" and properties:
            out[draw(st.sampled_from(sorted(properties)))] = draw(any_json)
        elif fault == "deep":
            name = draw(st.sampled_from(sorted(out)))
            out[name] = draw(faulty_for(properties[name]))
        return out

    return build()


@pytest.mark.parametrize("action", sorted(HANDLED_ACTIONS))
def test_the_compiled_check_agrees_with_jsonschema_on_generated_payloads(action: str) -> None:
    """Property: for every handled action, the compiled predicate is valid exactly when
    jsonschema's Draft 4 validator is (so a payload it passes has no error to answer), and
    `schema_error` answers None exactly then."""
    validator = get_validator(2, action, "1.6")
    fast = fast_check(action)
    assert fast is not None, f"{action}: its schema should compile"

    @given(faulty=st.booleans(), data=st.data())
    @settings(
        max_examples=EXAMPLES_PER_ACTION,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def agrees(faulty: bool, data: st.DataObject) -> None:
        payload = data.draw(objects_for(validator.schema, faulty=faulty))
        payload = json.loads(json.dumps(payload))  # as a frame would carry it
        expected = validator.is_valid(payload)
        VERDICTS[f"{action}:{'valid' if expected else 'invalid'}"] += 1
        assert fast(payload) is expected, payload
        assert (schema_error(action, payload) is None) is expected, payload

    agrees()


def test_zz_the_agreement_property_saw_valid_and_invalid_payloads_of_every_action() -> None:
    """Print (and check) the examples per action and verdict (run after the property)."""
    if not VERDICTS:  # only meaningful when the property ran in this session
        return
    print("\nschema fast path vs jsonschema:", dict(sorted(VERDICTS.items())))
    for action in HANDLED_ACTIONS:
        valid, invalid = VERDICTS[f"{action}:valid"], VERDICTS[f"{action}:invalid"]
        assert valid + invalid >= EXAMPLES_PER_ACTION
        if action != "Heartbeat":  # {} is its only valid payload; extras make the rest
            assert valid >= 3, (action, valid)
            assert invalid >= 10, (action, invalid)


@pytest.mark.parametrize(
    "payload",
    [
        {"connectorId": True, "meterValue": [{"timestamp": "t", "sampledValue": [{"value": "1"}]}]},
        {"connectorId": 1.0, "meterValue": [{"timestamp": "t", "sampledValue": [{"value": "1"}]}]},
        {"connectorId": 1, "meterValue": []},
        {"connectorId": 1, "meterValue": [{"timestamp": "t", "sampledValue": [{"value": 1}]}]},
        {"connectorId": 1, "meterValue": [{"timestamp": "t", "sampledValue": [{"x": "1"}]}]},
        {
            "connectorId": 1,
            "meterValue": [{"timestamp": "t", "sampledValue": [{"value": "1", "unit": "Watt"}]}],
        },
        {
            "connectorId": 1,
            "meterValue": [{"timestamp": "t", "sampledValue": [{"value": "1"}]}],
            "x": 1,
        },
    ],
)
def test_a_payload_the_fast_path_refuses_gets_jsonschemas_answer(payload: dict[str, Any]) -> None:
    """Each of these is refused by the predicate and answered with a 1.6 code by the
    jsonschema path (the codes themselves are checked by the frame corpus)."""
    fast = fast_check("MeterValues")
    assert fast is not None
    assert fast(payload) is False
    answer = schema_error("MeterValues", payload)
    assert answer is not None
    assert answer[0] in set(CallErrorCode)


def test_the_format_keyword_is_not_checked_as_jsonschema_does_not_without_a_checker() -> None:
    """`format: date-time` is an annotation for the library's validator (the semantic check
    of frames.py tests dates); the predicate passes what jsonschema passes."""
    payload = {
        "connectorId": 1,
        "meterValue": [{"timestamp": "no", "sampledValue": [{"value": "1"}]}],
    }
    fast = fast_check("MeterValues")
    assert fast is not None
    assert get_validator(2, "MeterValues", "1.6").is_valid(payload)
    assert fast(payload)


def test_the_compiled_check_leaves_the_payload_as_it_came() -> None:
    """A schema's `default` is not filled in: the check answers, it does not change the frame
    the handlers then read."""
    check = compile_schema(
        {"type": "object", "properties": {"unit": {"type": "string", "default": "Wh"}}}
    )
    payload: dict[str, Any] = {}
    assert check(payload)
    assert payload == {}
    assert not check({"unit": 1})


def test_only_the_actions_the_central_system_takes_have_a_fast_path() -> None:
    """A CALL we send (SetChargingProfile, whose schema the library parses with Decimal for
    multipleOf) or an unknown action gets no predicate, and the library's validator of such a
    schema is not built here (its cache would keep a float-parsed one)."""
    from ocpp import messages

    assert fast_check("SetChargingProfile") is None
    assert fast_check("NoSuchAction") is None
    assert "SetChargingProfile_1.6" not in messages._validators or (
        messages._validators["SetChargingProfile_1.6"]
        .schema["properties"]["csChargingProfiles"]["properties"]["chargingSchedule"]["properties"][
            "chargingSchedulePeriod"
        ]["items"]["properties"]["limit"]["multipleOf"]
        .__class__.__name__
        == "Decimal"
    )
