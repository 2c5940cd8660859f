"""A charge point's charging profiles, kept and combined by OCPP 1.6's rules (§3.13, §5.16).

Written from the specification, independently of `adapters.ocpp.profiles` (which builds what
the central system sends), so a test that sends with one and reads back with the other checks
both.

- Installing: a profile replaces one with the same `chargingProfileId`, and one with the same
  connector, purpose and stack level. `ChargePointMaxProfile` only on connector 0; `TxProfile`
  only on a connector with a running transaction (and its id, when given); stack levels up to
  `max_stack_level`; at most `max_periods` periods, the first starting at 0.
- In force at time t: within `validFrom`/`validTo`, the schedule started (Absolute:
  `startSchedule`; Relative: the transaction's start; Recurring: the last daily/weekly repeat
  of `startSchedule`) and not past its `duration`. Within one purpose the highest stack level in
  force wins.
- Combining, per connector: the TxProfile of its transaction if one is in force, else a
  TxDefaultProfile (one for that connector before one for connector 0); the result is capped
  by the ChargePointMaxProfile. No profile in force means no limit (the hardware's).
- A transaction's TxProfiles are deleted when it ends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, TypeAlias

Purpose: TypeAlias = Literal["ChargePointMaxProfile", "TxDefaultProfile", "TxProfile"]
Kind: TypeAlias = Literal["Absolute", "Recurring", "Relative"]
PURPOSES: tuple[Purpose, ...] = ("ChargePointMaxProfile", "TxDefaultProfile", "TxProfile")
KINDS: tuple[Kind, ...] = ("Absolute", "Recurring", "Relative")
RECURRENCE_S = {"Daily": 86_400, "Weekly": 7 * 86_400}


class ProfileRejected(ValueError):
    """A SetChargingProfile this charge point does not take (answered `Rejected`)."""


@dataclass(frozen=True, slots=True)
class Period:
    """A schedule period: from `start_s` after the schedule's start, `limit` in its unit."""

    start_s: int
    limit: float
    phases: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """One installed charging profile."""

    profile_id: int
    connector_id: int
    stack_level: int
    purpose: Purpose
    kind: Kind
    unit: Literal["A", "W"]
    periods: tuple[Period, ...]
    start: datetime | None = None
    duration_s: int | None = None
    recurrency: str | None = None
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    transaction_id: int | None = None
    min_rate: float | None = None


def _get(raw: Mapping[str, Any], camel: str) -> Any:
    """A field by its camelCase name, or by the snake_case name the `ocpp` library hands over."""
    if camel in raw:
        return raw[camel]
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    return raw.get(snake)


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    at = datetime.fromisoformat(str(value))
    if at.tzinfo is None:
        raise ProfileRejected(f"{value!r} has no time zone")
    return at.astimezone(UTC)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ProfileRejected(f"{value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ProfileRejected(f"{value!r} is not finite")
    return number


def parse_profile(connector_id: int, raw: Mapping[str, Any]) -> Profile:
    """A `csChargingProfiles` object (camelCase or snake_case keys) as a `Profile`.

    Raises:
        ProfileRejected: a value the specification does not allow.
    """
    schedule = _get(raw, "chargingSchedule")
    if not isinstance(schedule, Mapping):
        raise ProfileRejected("no chargingSchedule")
    purpose = _get(raw, "chargingProfilePurpose")
    kind = _get(raw, "chargingProfileKind")
    unit = _get(schedule, "chargingRateUnit")
    if purpose not in PURPOSES or kind not in KINDS or unit not in ("A", "W"):
        raise ProfileRejected(f"purpose {purpose!r}, kind {kind!r} or unit {unit!r} is unknown")
    periods = []
    for entry in _get(schedule, "chargingSchedulePeriod") or []:
        phases = _get(entry, "numberPhases")
        periods.append(
            Period(
                start_s=int(_get(entry, "startPeriod")),
                limit=_number(_get(entry, "limit")),
                phases=int(phases) if phases is not None else None,
            )
        )
    if not periods or periods[0].start_s != 0:
        raise ProfileRejected("a schedule needs periods, the first starting at 0")
    if [p.start_s for p in periods] != sorted({p.start_s for p in periods}):
        raise ProfileRejected("period starts must increase")
    recurrency = _get(raw, "recurrencyKind")
    start = _time(_get(schedule, "startSchedule"))
    if kind == "Recurring" and (recurrency not in RECURRENCE_S or start is None):
        raise ProfileRejected("a Recurring profile needs recurrencyKind and startSchedule")
    if kind == "Absolute" and start is None:
        raise ProfileRejected("an Absolute profile needs startSchedule")
    duration = _get(schedule, "duration")
    min_rate = _get(schedule, "minChargingRate")
    transaction_id = _get(raw, "transactionId")
    return Profile(
        profile_id=int(_get(raw, "chargingProfileId")),
        connector_id=connector_id,
        stack_level=int(_get(raw, "stackLevel")),
        purpose=purpose,
        kind=kind,
        unit=unit,
        periods=tuple(periods),
        start=start,
        duration_s=int(duration) if duration is not None else None,
        recurrency=recurrency,
        valid_from=_time(_get(raw, "validFrom")),
        valid_to=_time(_get(raw, "validTo")),
        transaction_id=int(transaction_id) if transaction_id is not None else None,
        min_rate=_number(min_rate) if min_rate is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Electrical:
    """What converting amperes to watts needs."""

    voltage_v: float = 230.0
    phases: int = 3


class ProfileStore:
    """The profiles installed on one charge point, and the limits they combine to."""

    def __init__(
        self,
        connectors: int,
        electrical: Electrical,
        *,
        max_stack_level: int = 8,
        max_periods: int = 24,
        allow_negative: bool = False,
    ) -> None:
        self.connectors = connectors
        self.electrical = electrical
        self.max_stack_level = max_stack_level
        self.max_periods = max_periods
        self.allow_negative = allow_negative
        self.profiles: list[Profile] = []

    def install(self, profile: Profile, transactions: Mapping[int, int]) -> None:
        """Install `profile`; `transactions` maps connector id -> running transaction id.

        Raises:
            ProfileRejected: the charge point does not take it.
        """
        if not 0 <= profile.connector_id <= self.connectors:
            raise ProfileRejected(f"no connector {profile.connector_id}")
        if profile.purpose == "ChargePointMaxProfile" and profile.connector_id != 0:
            raise ProfileRejected("ChargePointMaxProfile only on connector 0")
        if profile.purpose == "TxProfile":
            running = transactions.get(profile.connector_id)
            if profile.connector_id == 0 or running is None:
                raise ProfileRejected("TxProfile without a running transaction on its connector")
            if profile.transaction_id is not None and profile.transaction_id != running:
                raise ProfileRejected(
                    f"TxProfile for transaction {profile.transaction_id}, running is {running}"
                )
        if not 0 <= profile.stack_level <= self.max_stack_level:
            raise ProfileRejected(f"stack level {profile.stack_level} > {self.max_stack_level}")
        if len(profile.periods) > self.max_periods:
            raise ProfileRejected(f"{len(profile.periods)} periods > {self.max_periods}")
        if not self.allow_negative and any(p.limit < 0 for p in profile.periods):
            raise ProfileRejected("negative limits (discharge) are not supported")
        self.profiles = [
            p
            for p in self.profiles
            if p.profile_id != profile.profile_id
            and (p.connector_id, p.purpose, p.stack_level)
            != (profile.connector_id, profile.purpose, profile.stack_level)
        ]
        self.profiles.append(profile)

    def clear(
        self,
        profile_id: int | None = None,
        connector_id: int | None = None,
        purpose: str | None = None,
        stack_level: int | None = None,
    ) -> bool:
        """ClearChargingProfile: by id, or by every filter given; True if any was removed."""
        if profile_id is not None:
            keep = [p for p in self.profiles if p.profile_id != profile_id]
        else:
            keep = [
                p
                for p in self.profiles
                if not (
                    (connector_id is None or p.connector_id == connector_id)
                    and (purpose is None or p.purpose == purpose)
                    and (stack_level is None or p.stack_level == stack_level)
                )
            ]
        removed = len(keep) != len(self.profiles)
        self.profiles = keep
        return removed

    def end_transaction(self, connector_id: int) -> None:
        """The transaction on `connector_id` ended: its TxProfiles go."""
        self.profiles = [
            p
            for p in self.profiles
            if not (p.purpose == "TxProfile" and p.connector_id == connector_id)
        ]

    # -- evaluation --

    def _schedule_start(
        self, profile: Profile, at: datetime, tx_start: datetime | None
    ) -> datetime | None:
        if profile.kind == "Relative":
            return tx_start if tx_start is not None else at
        assert profile.start is not None
        if profile.kind == "Recurring":
            cycle = RECURRENCE_S[profile.recurrency or "Daily"]
            elapsed = (at - profile.start).total_seconds()
            return profile.start + timedelta(seconds=cycle * math.floor(elapsed / cycle))
        return profile.start

    def _period_at(
        self, profile: Profile, at: datetime, tx_start: datetime | None
    ) -> Period | None:
        if profile.valid_from is not None and at < profile.valid_from:
            return None
        if profile.valid_to is not None and at >= profile.valid_to:
            return None
        start = self._schedule_start(profile, at, tx_start)
        if start is None:
            return None
        offset = (at - start).total_seconds()
        if offset < 0 or (profile.duration_s is not None and offset >= profile.duration_s):
            return None
        chosen = None
        for period in profile.periods:
            if period.start_s <= offset:
                chosen = period
        return chosen

    def _watts(self, profile: Profile, period: Period) -> float:
        if profile.unit == "W":
            return period.limit
        phases = period.phases or self.electrical.phases
        return period.limit * self.electrical.voltage_v * phases

    def _winner(
        self, candidates: Iterable[Profile], at: datetime, tx_start: datetime | None
    ) -> float | None:
        best: tuple[int, int, float] | None = None
        for profile in candidates:
            period = self._period_at(profile, at, tx_start)
            if period is None:
                continue
            rank = (profile.stack_level, profile.profile_id, self._watts(profile, period))
            if best is None or rank[:2] > best[:2]:
                best = rank
        return None if best is None else best[2]

    def charger_cap_w(self, at: datetime) -> float | None:
        """The ChargePointMaxProfile limit in force (W), None if none is."""
        return self._winner(
            (p for p in self.profiles if p.purpose == "ChargePointMaxProfile"), at, None
        )

    def connector_limit_w(
        self,
        connector_id: int,
        at: datetime,
        *,
        transaction_id: int | None = None,
        tx_start: datetime | None = None,
    ) -> float | None:
        """The combined limit of one connector at `at` (W; negative: discharge), None if none."""
        if connector_id == 0:
            return self.charger_cap_w(at)
        limit = None
        if transaction_id is not None:
            limit = self._winner(
                (
                    p
                    for p in self.profiles
                    if p.purpose == "TxProfile"
                    and p.connector_id == connector_id
                    and p.transaction_id in (None, transaction_id)
                ),
                at,
                tx_start,
            )
        if limit is None:
            for scope in (connector_id, 0):
                limit = self._winner(
                    (
                        p
                        for p in self.profiles
                        if p.purpose == "TxDefaultProfile" and p.connector_id == scope
                    ),
                    at,
                    tx_start,
                )
                if limit is not None:
                    break
        cap = self.charger_cap_w(at)
        if limit is None:
            return cap
        return limit if cap is None else min(limit, cap)

    def breakpoints(
        self, begin: datetime, end: datetime, tx_start: datetime | None = None
    ) -> list[datetime]:
        """Every time in [begin, end) at which some profile's limit may change, sorted."""
        times = {begin}
        for profile in self.profiles:
            for edge in (profile.valid_from, profile.valid_to):
                if edge is not None and begin <= edge < end:
                    times.add(edge)
            starts: list[datetime] = []
            if profile.kind == "Recurring":
                cycle = RECURRENCE_S[profile.recurrency or "Daily"]
                first = self._schedule_start(profile, begin, tx_start)
                assert first is not None
                at = first
                while at < end:
                    starts.append(at)
                    at += timedelta(seconds=cycle)
            else:
                start = self._schedule_start(profile, begin, tx_start)
                if start is not None:
                    starts.append(start)
            for start in starts:
                offsets = [p.start_s for p in profile.periods]
                if profile.duration_s is not None:
                    offsets.append(profile.duration_s)
                for offset in offsets:
                    at = start + timedelta(seconds=offset)
                    if begin <= at < end:
                        times.add(at)
        return sorted(times)
