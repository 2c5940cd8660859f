"""The frame-checking layer in front of the `ocpp` library's router (RELIABILITY.md A4).

The library answers some bad frames with the OCPP 2.0.1 spelling or the wrong code (it has
NotImplemented and NotSupported swapped), ignores others silently and accepts values the 1.6
schemas cannot express (a timestamp that is not a date, a negative connector id). Every frame a
charge point sends passes `FrameChecker.check` first; only what passes reaches the library.

The answers, per the OCPP-J 1.6 CALLERROR table (documented in docs/ocpp.md):

| Input | Answer |
|---|---|
| not JSON, binary frame, not an array, empty array, no string id | dropped and counted |
| message type not 2/3/4, a CALL with the wrong number of elements, action or payload of the
  wrong JSON type, message id empty / not a string / over 36 characters / not printable ASCII |
  `FormationViolation` (id echoed when it is a string, else "") |
| same CALL id twice on one connection | `ProtocolError` |
| action OCPP 1.6 does not define | `NotImplemented` |
| 1.6 action the central system does not take | `NotSupported` |
| property not in the schema | `FormationViolation` |
| required property missing | `ProtocolError` |
| wrong JSON type, string over its maxLength | `TypeConstraintViolation` |
| array with too few items | `OccurenceConstraintViolation` |
| bad enum value, bad date-time, out-of-range id, non-decimal or non-finite meter value,
  SoC outside 0..100, timestamp too far in the future | `PropertyConstraintViolation` |
| anything but BootNotification before a boot was accepted | `SecurityError` |
| CALLRESULT/CALLERROR for no CALL we have outstanding | dropped and counted, never answered |
| CALLERROR with an unknown code or a non-object details | passed on as `GenericError` / `{}` |
| CALLERROR with a 2.0.1 spelling (`FormatViolation`) | passed on with the 1.6 spelling |
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from importlib import resources
from typing import Any, Literal, TypeAlias

import fastjsonschema
from ocpp.messages import get_validator
from ocpp.v16.enums import Action

MAX_ID_LENGTH = 36  # OCPP-J 1.6 §4.1.3: unique id is a string of at most 36 characters
MAX_DESCRIPTION = 200

ONE_SIX_ACTIONS: frozenset[str] = frozenset(a.value for a in Action)
# The CALLs a charge point may send that the central system handles.
HANDLED_ACTIONS: frozenset[str] = frozenset(
    {
        "Authorize",
        "BootNotification",
        "DataTransfer",
        "DiagnosticsStatusNotification",
        "FirmwareStatusNotification",
        "Heartbeat",
        "MeterValues",
        "StartTransaction",
        "StatusNotification",
        "StopTransaction",
    }
)
# Actions a charge point may send before its BootNotification was accepted.
BEFORE_BOOT: frozenset[str] = frozenset({"BootNotification"})


class CallErrorCode(StrEnum):
    """The OCPP-J 1.6 CALLERROR codes (with the 1.6 spellings of the errata sheet)."""

    NOT_IMPLEMENTED = "NotImplemented"
    NOT_SUPPORTED = "NotSupported"
    INTERNAL_ERROR = "InternalError"
    PROTOCOL_ERROR = "ProtocolError"
    SECURITY_ERROR = "SecurityError"
    FORMATION_VIOLATION = "FormationViolation"
    PROPERTY_CONSTRAINT_VIOLATION = "PropertyConstraintViolation"
    OCCURENCE_CONSTRAINT_VIOLATION = "OccurenceConstraintViolation"
    TYPE_CONSTRAINT_VIOLATION = "TypeConstraintViolation"
    GENERIC_ERROR = "GenericError"


ONE_SIX_CODES: frozenset[str] = frozenset(c.value for c in CallErrorCode)

VerdictKind: TypeAlias = Literal["call", "result", "error", "reply", "drop"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one inbound frame.

    `call`, `result`, `error`: pass `text` on to the library (`error` frames are normalised).
    `reply`: send `text` (a CALLERROR) back and pass nothing on. `drop`: pass nothing on.
    """

    kind: VerdictKind
    text: str = ""
    reason: str = ""
    code: str = ""
    unique_id: str = ""
    action: str = ""
    counter: str = ""  # a specific counter to add to, besides the kind (e.g. unmatched answers)
    payload: Any = None  # a passed CALL's payload as parsed here (so it is not parsed again)


def call_error(unique_id: str, code: CallErrorCode, description: str) -> str:
    """A CALLERROR frame: five elements, a 1.6 code, a description string, a details object."""
    return json.dumps(
        [4, unique_id, code.value, description[:MAX_DESCRIPTION], {}], separators=(",", ":")
    )


def _reply(unique_id: str, code: CallErrorCode, reason: str, action: str = "") -> Verdict:
    return Verdict(
        "reply",
        call_error(unique_id, code, reason),
        reason=reason,
        code=code.value,
        unique_id=unique_id,
        action=action,
    )


def _drop(reason: str, counter: str = "") -> Verdict:
    return Verdict("drop", reason=reason, counter=counter)


# A charge point speaking OCPP 2.0.1 spellings in its CALLERRORs means the 1.6 code.
_CODE_SPELLINGS = {
    "FormatViolation": CallErrorCode.FORMATION_VIOLATION.value,
    "OccurrenceConstraintViolation": CallErrorCode.OCCURENCE_CONSTRAINT_VIOLATION.value,
}


def inbound_error_code(code: object) -> str:
    """The 1.6 code a charge point's CALLERROR means: its own if 1.6 knows it, the 1.6
    spelling of a 2.0.1 one, else `GenericError` (RELIABILITY O-14)."""
    if not isinstance(code, str):
        return CallErrorCode.GENERIC_ERROR.value
    code = _CODE_SPELLINGS.get(code, code)
    return code if code in ONE_SIX_CODES else CallErrorCode.GENERIC_ERROR.value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _valid_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and all(" " <= ch <= "~" for ch in value)
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- schema errors to 1.6 codes ---------------------------------------------------------------

# Rank decides which error is reported when a payload has several: structure first.
_SCHEMA_CODES: dict[str, tuple[int, CallErrorCode]] = {
    "additionalProperties": (0, CallErrorCode.FORMATION_VIOLATION),
    "required": (1, CallErrorCode.PROTOCOL_ERROR),
    "type": (2, CallErrorCode.TYPE_CONSTRAINT_VIOLATION),
    "maxLength": (2, CallErrorCode.TYPE_CONSTRAINT_VIOLATION),
    "minItems": (3, CallErrorCode.OCCURENCE_CONSTRAINT_VIOLATION),
    "maxItems": (3, CallErrorCode.OCCURENCE_CONSTRAINT_VIOLATION),
}
_OTHER_SCHEMA = (4, CallErrorCode.PROPERTY_CONSTRAINT_VIOLATION)


def _where(error: Any) -> str:  # a jsonschema ValidationError
    return "/".join(str(p) for p in error.absolute_path) or "payload"


# --- compiled schema checks (the fast path) ------------------------------------------------------
#
# jsonschema interprets a schema on every call: about 190 us for a MeterValues with four sampled
# values, a third of the controller's event loop under OCPP load. Most frames are valid, so each
# handled action's schema is compiled once by `fastjsonschema` into Python code that answers
# only "valid or not" (about 11 us), with Draft 4 semantics, no format checking (the library's
# validator has no format checker either: dates are checked by `semantic_error`) and no
# defaults filled in (the payload is not changed). A frame it passes is valid; any other goes to
# jsonschema, which finds and ranks its errors as before. So the answers are jsonschema's; the
# compiled check only decides faster that there is nothing to answer.
# tests/ocpp/test_schema_fast_path.py checks it against jsonschema on generated payloads of
# every handled action.

Check: TypeAlias = Callable[[Any], bool]


def compile_schema(schema: dict[str, Any]) -> Check:
    """A predicate equal to jsonschema's `is_valid` without a format checker, compiled once.

    Raises:
        fastjsonschema.JsonSchemaDefinitionException: `schema` is not a valid schema.
    """
    validate = fastjsonschema.compile(
        schema, use_default=False, use_formats=False, detailed_exceptions=False
    )

    def check(payload: Any) -> bool:
        try:
            validate(payload)
        except fastjsonschema.JsonSchemaValueException:
            return False
        return True

    return check


_FAST: dict[str, Check | None] = {}


def fast_check(action: str) -> Check | None:
    """The compiled predicate of the 1.6 CALL schema of an action a charge point sends and the
    central system takes (built once), or None: another action, or a schema that cannot be
    compiled (then jsonschema decides every payload).

    Only those actions: the library caches one validator per schema whatever float parser it
    was built with, and parses the schemas of some CALLs we send (SetChargingProfile,
    RemoteStartTransaction) with Decimal; asking for those here first would leave it a float
    one."""
    if action in _FAST:
        return _FAST[action]
    check: Check | None = None
    if action in HANDLED_ACTIONS:
        validator = get_validator(2, action, "1.6")
        try:
            check = compile_schema(validator.schema) if validator.format_checker is None else None
        except fastjsonschema.JsonSchemaDefinitionException:
            check = None
    _FAST[action] = check
    return check


@functools.cache
def outbound_check(action: str, *, answer: bool) -> Check | None:
    """The compiled predicate of the 1.6 schema of a CALL the central system sends
    (`answer=False`) or of the CALLRESULT that answers it (`answer=True`), built once; None when
    the library has no such schema or it cannot be compiled.

    Read from the library's own schema files, not through `get_validator`: that caches one
    validator per schema whatever float parser built it, and the library parses the schemas
    of SetChargingProfile, RemoteStartTransaction and the GetCompositeSchedule answer with
    Decimal. The compiled check of their `multipleOf: 0.1` divides `Decimal(repr(value))` by
    `Decimal("0.1")`, which is what the library's Decimal parsing of `json.dumps(value)`
    checks. A payload the predicate passes has no schema error; any other goes to the
    library's own validation, whose errors are raised as before (`adapters.ocpp.central`)."""
    name = f"{action}Response" if answer else action
    try:
        text = (resources.files("ocpp.v16") / "schemas" / f"{name}.json").read_text("utf-8-sig")
        return compile_schema(json.loads(text))
    except (OSError, ValueError, fastjsonschema.JsonSchemaDefinitionException):
        return None


def outbound_valid(action: str, payload: Any, *, answer: bool) -> bool:
    """Whether the compiled check passes `payload` (False: no check, or it does not pass, or
    it raised on a value it cannot divide, such as NaN: the library's validation decides)."""
    check = outbound_check(action, answer=answer)
    if check is None:
        return False
    try:
        return check(payload)
    except (ArithmeticError, TypeError, ValueError):
        return False


def schema_error(action: str, payload: dict[str, Any]) -> tuple[CallErrorCode, str] | None:
    """The 1.6 code and a reason for the first schema violation of a CALL payload, or None.

    The compiled predicate answers first; only a payload it does not pass is given to
    jsonschema, whose errors decide the answer (and which passes it if the predicate was
    merely stricter: it never is on the schemas tested)."""
    fast = fast_check(action)
    if fast is not None and fast(payload):
        return None
    validator = get_validator(2, action, "1.6")
    worst: tuple[int, str, CallErrorCode, str] | None = None
    for error in validator.iter_errors(payload):
        rank, code = _SCHEMA_CODES.get(str(error.validator), _OTHER_SCHEMA)
        where = _where(error)
        if error.validator == "required":
            reason = f"{action}: {where}: {error.message}"
        elif error.validator == "additionalProperties":
            reason = f"{action}: {where}: property not allowed by the schema"
        else:
            reason = f"{action}: {where}: fails {error.validator} {error.validator_value!r}"
        candidate = (rank, where, code, reason)
        if worst is None or candidate[:2] < worst[:2]:
            worst = candidate
    if worst is None:
        return None
    return worst[2], worst[3]


# --- semantics the schemas cannot say ----------------------------------------------------------

_DECIMAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?$")
MAX_CONNECTOR_ID = 1000  # when the charge point's connectors are not known
MAX_METER = 1e13  # Wh; far above any register, below float trouble


def parse_timestamp(text: str) -> datetime | None:
    """An RFC 3339 date-time with a zone ('Z' or an offset), or None when it is not one."""
    if not 10 < len(text) <= 40 or "T" not in text.upper():
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    if value.tzinfo is None:
        return None
    return value


def parse_decimal(text: str) -> float | None:
    """A finite decimal number from a meter value string, or None."""
    if len(text) > 40 or not _DECIMAL.match(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


class _Semantics:
    """Checks of values the 1.6 schemas leave open; each method returns a reason or None."""

    def __init__(
        self, now: datetime, max_ahead: timedelta, connectors: frozenset[int] | None
    ) -> None:
        self.now = now
        self.max_ahead = max_ahead
        self.connectors = connectors

    def timestamp(self, where: str, text: object) -> str | None:
        """Why a date-time field is not acceptable, or None."""
        if not isinstance(text, str):
            return None
        value = parse_timestamp(text)
        if value is None:
            return f"{where}: {text[:40]!r} is not an RFC 3339 date-time with a time zone"
        if value - self.now > self.max_ahead:
            return f"{where}: {text} is more than {self.max_ahead.total_seconds():.0f} s ahead"
        return None

    def connector(self, where: str, value: object, *, lowest: int) -> str | None:
        """Why a connector id is not acceptable, or None."""
        if not _is_int(value):
            return None
        assert isinstance(value, int)
        if value < lowest:
            return f"{where}: connector id {value} is below {lowest}"
        known = self.connectors
        if known is not None and value != 0 and value not in known:
            return f"{where}: this charge point has no connector {value}"
        if value > MAX_CONNECTOR_ID:
            return f"{where}: connector id {value} is above {MAX_CONNECTOR_ID}"
        return None

    def meter(self, where: str, value: object) -> str | None:
        """Why a meterStart/meterStop register is not acceptable, or None."""
        if _is_int(value) and not 0 <= value <= MAX_METER:  # type: ignore[operator]
            return f"{where}: register {value} Wh is outside 0..{MAX_METER:.0e}"
        return None

    def samples(self, where: str, meter_values: object) -> str | None:
        """Why a meterValue list carries an impossible value, or None."""
        if not isinstance(meter_values, list):
            return None
        for i, entry in enumerate(meter_values):
            if not isinstance(entry, dict):
                continue
            problem = self.timestamp(f"{where}/{i}/timestamp", entry.get("timestamp"))
            if problem:
                return problem
            for j, sample in enumerate(entry.get("sampledValue") or []):
                if not isinstance(sample, dict) or sample.get("format") == "SignedData":
                    continue
                text = sample.get("value")
                if not isinstance(text, str):
                    continue
                value = parse_decimal(text)
                spot = f"{where}/{i}/sampledValue/{j}/value"
                if value is None:
                    return f"{spot}: {text[:40]!r} is not a finite decimal number"
                measurand = sample.get("measurand", "Energy.Active.Import.Register")
                if measurand == "SoC" and not 0.0 <= value <= 100.0:
                    return f"{spot}: SoC {value} is outside 0..100 %"
                if measurand.endswith(".Register") and not 0.0 <= value <= MAX_METER:
                    return f"{spot}: register {value} is outside 0..{MAX_METER:.0e}"
        return None


def semantic_error(
    action: str,
    payload: dict[str, Any],
    now: datetime,
    max_ahead: timedelta,
    connectors: frozenset[int] | None = None,
) -> str | None:
    """Why a schema-valid payload still carries an impossible value, or None."""
    check = _Semantics(now, max_ahead, connectors)
    problems: Iterable[str | None]
    if action == "StatusNotification":
        problems = (
            check.connector("connectorId", payload.get("connectorId"), lowest=0),
            check.timestamp("timestamp", payload.get("timestamp")),
        )
    elif action == "StartTransaction":
        problems = (
            check.connector("connectorId", payload.get("connectorId"), lowest=1),
            check.timestamp("timestamp", payload.get("timestamp")),
            check.meter("meterStart", payload.get("meterStart")),
        )
    elif action == "StopTransaction":
        problems = (
            check.timestamp("timestamp", payload.get("timestamp")),
            check.meter("meterStop", payload.get("meterStop")),
            check.samples("transactionData", payload.get("transactionData")),
        )
    elif action == "MeterValues":
        problems = (
            check.connector("connectorId", payload.get("connectorId"), lowest=0),
            check.samples("meterValue", payload.get("meterValue")),
        )
    else:
        return None
    for problem in problems:
        if problem:
            return f"{action}: {problem}"
    return None


# --- the per-connection checker ----------------------------------------------------------------


class FrameChecker:
    """Checks the frames of one charge-point connection; keeps that connection's id window.

    Args:
        now: the clock, for the "too far in the future" check.
        connectors: the charge point's connector ids when known (None: any up to 1000).
        handled: the CALL actions the central system takes.
    """

    def __init__(
        self,
        *,
        now: Callable[[], datetime],
        max_ahead_s: float = 300.0,
        connectors: Callable[[], frozenset[int] | None] = lambda: None,
        handled: frozenset[str] = HANDLED_ACTIONS,
        id_window: int = 1024,
    ) -> None:
        self._now = now
        self._max_ahead = timedelta(seconds=max_ahead_s)
        self._connectors = connectors
        self._handled = handled
        self._seen: set[str] = set()
        self._order: deque[str] = deque()
        self._window = id_window
        self._outstanding: set[str] = set()
        self.boot_accepted = False
        self.counts: Counter[str] = Counter()

    # -- outbound bookkeeping: which CALLRESULT/CALLERROR ids we are waiting for --

    def sent_call(self, unique_id: str) -> None:
        """Record a CALL we sent, so its answer is let through."""
        self._outstanding.add(unique_id)

    def forget_call(self, unique_id: str) -> None:
        """Stop waiting for an answer (the CALL timed out); a late answer will be dropped."""
        self._outstanding.discard(unique_id)

    # -- inbound --

    def check(self, raw: str | bytes) -> Verdict:
        """Classify one inbound frame (and count the outcome)."""
        verdict = self._check(raw)
        key = verdict.kind if verdict.kind != "reply" else f"callerror:{verdict.code}"
        self.counts[key] += 1
        return verdict

    def _check(self, raw: str | bytes) -> Verdict:
        if isinstance(raw, bytes):
            return _drop("binary frame (OCPP-J uses text frames)")
        try:
            message = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return _drop("not JSON")
        if not isinstance(message, list) or not message:
            return _drop("not a non-empty JSON array")
        kind = message[0]
        if _is_int(kind) and kind in (3, 4):
            return self._answer(message)
        if len(message) < 2:
            return _drop("no message id")
        unique_id = message[1]
        echo = unique_id if isinstance(unique_id, str) else ""
        if not _valid_id(unique_id):
            return _reply(
                echo,
                CallErrorCode.FORMATION_VIOLATION,
                "message id must be a string of 1 to 36 printable ASCII characters",
            )
        if not (_is_int(kind) and kind == 2):
            return _reply(
                echo, CallErrorCode.FORMATION_VIOLATION, f"message type {kind!r} is not 2, 3 or 4"
            )
        if len(message) != 4:
            return _reply(
                echo,
                CallErrorCode.FORMATION_VIOLATION,
                f"a CALL has 4 elements, this one has {len(message)}",
            )
        action, payload = message[2], message[3]
        if not isinstance(action, str) or not action:
            return _reply(echo, CallErrorCode.FORMATION_VIOLATION, "action is not a string")
        if not isinstance(payload, dict):
            return _reply(
                echo, CallErrorCode.FORMATION_VIOLATION, "payload is not a JSON object", action
            )
        if unique_id in self._seen:
            return _reply(
                echo,
                CallErrorCode.PROTOCOL_ERROR,
                f"message id {unique_id!r} was already used on this connection",
                action,
            )
        self._remember(unique_id)
        if action not in ONE_SIX_ACTIONS:
            return _reply(
                echo,
                CallErrorCode.NOT_IMPLEMENTED,
                f"{action[:50]!r} is not an OCPP 1.6 action",
                action,
            )
        if action not in self._handled:
            return _reply(
                echo,
                CallErrorCode.NOT_SUPPORTED,
                f"{action} is not taken by this central system",
                action,
            )
        schema = schema_error(action, payload)
        if schema is not None:
            return _reply(echo, schema[0], schema[1], action)
        meaning = semantic_error(action, payload, self._now(), self._max_ahead, self._connectors())
        if meaning is not None:
            return _reply(echo, CallErrorCode.PROPERTY_CONSTRAINT_VIOLATION, meaning, action)
        if not self.boot_accepted and action not in BEFORE_BOOT:
            return _reply(
                echo,
                CallErrorCode.SECURITY_ERROR,
                f"{action} before a BootNotification was accepted",
                action,
            )
        return Verdict("call", raw, unique_id=unique_id, action=action, payload=payload)

    def _remember(self, unique_id: str) -> None:
        self._seen.add(unique_id)
        self._order.append(unique_id)
        if len(self._order) > self._window:
            self._seen.discard(self._order.popleft())

    def _answer(self, message: list[Any]) -> Verdict:
        """A CALLRESULT or CALLERROR: let it through only if it answers our outstanding CALL."""
        unique_id = message[1] if len(message) > 1 else None
        if not isinstance(unique_id, str) or unique_id not in self._outstanding:
            return _drop(
                "answer to no outstanding CALL (late, unknown or malformed id)",
                "answers_unmatched",
            )
        if message[0] == 3:
            if len(message) != 3 or not isinstance(message[2], dict):
                return _drop("CALLRESULT is not [3, id, {payload}]", "answers_malformed")
            self._outstanding.discard(unique_id)
            return Verdict(
                "result", json.dumps(message, separators=(",", ":")), unique_id=unique_id
            )
        code = message[2] if len(message) > 2 else None
        description = message[3] if len(message) > 3 else ""
        details = message[4] if len(message) > 4 else {}
        normalised = [
            4,
            unique_id,
            inbound_error_code(code),
            description if isinstance(description, str) else "",
            details if isinstance(details, dict) else {},
        ]
        self._outstanding.discard(unique_id)
        return Verdict("error", json.dumps(normalised, separators=(",", ":")), unique_id=unique_id)
