"""Charging profiles as voltpool sends them: leases, unit conversion, the minimum-rate rule.

Pure functions from a plan, a charger's electrical data and "now" to `OutgoingProfile`s.

- Units: a charger takes limits in W or A (`ChargePoint.rate_unit`, from its
  `ChargingScheduleAllowedChargingRateUnit`); A = W / (V * phases). Limits are rounded towards
  zero to 0.1 (the 1.6 schema's `multipleOf`), so a limit never exceeds the plan.
- Minimum rate: a charger cannot deliver less than `min_current_a` on every phase (IEC 61851,
  6 A); a smaller non-zero limit is sent as 0, for charging and for discharging alike.
- Leases (DESIGN.md, Contracts): the `TxDefaultProfile` holds the charger's safe share of the
  site's safe limit, the `ChargePointMaxProfile` its circuit limit, both without end. A
  `TxProfile` carries the plan from now to the end of the lease window and `min(plan, safe
  share)` after it, never negative after it: a charger whose controller stops falls back by
  itself, and stops discharging.
- V2G (an extension of OCPP 1.6, which has no discharge command): `negative_limit` sends the
  discharge as a negative limit in the TxProfile; `data_transfer` sends 0 in the TxProfile for
  those periods and the discharge as a vendor DataTransfer (`DischargeLimit`, see docs/ocpp.md);
  `none` sends 0 for a discharge setpoint.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from adapters.ocpp.config import LeaseConfig
from adapters.ocpp.translate import iso
from controller.domain import SLOT, ChargePoint, ChargerId, RateUnit
from controller.planning.plan import Plan, Setpoint
from controller.state import FleetState


def watts_per_unit(charger: ChargePoint, unit: RateUnit) -> float:
    """W per unit of limit: 1 for W, V * phases for A."""
    return 1.0 if unit == "W" else charger.voltage_v * charger.phases


def to_limit(kw: float, charger: ChargePoint, unit: RateUnit | None = None) -> float:
    """A power in kW as the charger's limit (W or A), towards zero to 0.1, min-rate rule applied.

    Negative powers (discharge) keep their sign.
    """
    unit = unit or charger.rate_unit
    value = kw * 1000.0 / watts_per_unit(charger, unit)
    magnitude = math.floor(abs(value) * 10.0 + 1e-6) / 10.0
    minimum = charger.min_current_a * watts_per_unit(charger, "A") / watts_per_unit(charger, unit)
    if magnitude < minimum - 1e-9:
        return 0.0
    return math.copysign(magnitude, value) if magnitude else 0.0


def from_limit(limit: float, charger: ChargePoint, unit: RateUnit | None = None) -> float:
    """A limit in the charger's unit back to kW."""
    return limit * watts_per_unit(charger, unit or charger.rate_unit) / 1000.0


def circuits_kw(state: FleetState) -> float:
    """The sum of every charger's circuit limit: what safe shares are proportioned over."""
    return sum(c.max_power_kw for c in state.chargers.values())


def safe_share_kw(state: FleetState, charger_id: ChargerId, total_kw: float | None = None) -> float:
    """The charger's share of the site's safe limit, in proportion to its circuit limit.

    `total_kw` is `circuits_kw(state)` when the caller has it already (it is a sum over the
    fleet: per charger and per plan it would make the dispatch quadratic in the fleet size).
    """
    charger = state.chargers.get(charger_id)
    if charger is None or state.site is None:
        return 0.0
    total = circuits_kw(state) if total_kw is None else total_kw
    if total <= 0.0:
        return 0.0
    return min(charger.max_power_kw, state.site.safe_limit_kw * charger.max_power_kw / total)


def safe_share_per_connector_kw(
    state: FleetState, charger_id: ChargerId, total_kw: float | None = None
) -> float:
    """The safe share of one connector: a TxDefaultProfile on connector 0 applies to each."""
    charger = state.chargers.get(charger_id)
    count = max(1, len(charger.connectors)) if charger is not None else 1
    return safe_share_kw(state, charger_id, total_kw) / count


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingProfile:
    """One SetChargingProfile voltpool means to have installed on a charger.

    `slot` names what it is for ("default", "max", "tx:{connector}"); limits are in `unit`, one
    per period, period k running from `start + offsets_s[k]`; the last period holds on.
    `discharge` (data_transfer V2G only) gives a discharge limit per period, >= 0.
    """

    slot: str
    connector_id: int
    purpose: str
    profile_id: int
    stack_level: int
    unit: RateUnit
    start: datetime
    offsets_s: tuple[int, ...]
    limits: tuple[float, ...]
    phases: int
    transaction_id: int | None = None
    lease_end: datetime | None = None
    discharge: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.offsets_s or len(self.offsets_s) != len(self.limits):
            raise ValueError(f"{self.slot}: periods and limits must pair up, at least one")
        if self.offsets_s[0] != 0 or list(self.offsets_s) != sorted(set(self.offsets_s)):
            raise ValueError(f"{self.slot}: period offsets must start at 0 and increase")
        if self.discharge is not None and len(self.discharge) != len(self.limits):
            raise ValueError(f"{self.slot}: one discharge limit per period")

    def index_at(self, at: datetime) -> int:
        """The period in force at `at` (the first one before the start)."""
        offset = (at - self.start).total_seconds()
        return max(0, bisect.bisect_right(self.offsets_s, offset) - 1)

    def limit_at(self, at: datetime) -> float:
        """The limit in force at `at`, in `unit`."""
        return self.limits[self.index_at(at)]

    def discharge_at(self, at: datetime) -> float:
        """The discharge limit in force at `at` (0 without one)."""
        return 0.0 if self.discharge is None else self.discharge[self.index_at(at)]

    def changes_after(self, at: datetime) -> list[datetime]:
        """The times at or after `at` when a new period begins."""
        times = (self.start + timedelta(seconds=s) for s in self.offsets_s)
        return [t for t in times if t >= at]

    def to_ocpp(self) -> dict[str, Any]:
        """The `csChargingProfiles` object of SetChargingProfile (camelCase)."""
        profile: dict[str, Any] = {
            "chargingProfileId": self.profile_id,
            "stackLevel": self.stack_level,
            "chargingProfilePurpose": self.purpose,
            "chargingProfileKind": "Absolute",
            "chargingSchedule": {
                "startSchedule": iso(self.start),
                "chargingRateUnit": self.unit,
                "chargingSchedulePeriod": [
                    {"startPeriod": s, "limit": lim, "numberPhases": self.phases}
                    for s, lim in zip(self.offsets_s, self.limits, strict=True)
                ],
            },
        }
        if self.transaction_id is not None:
            profile["transactionId"] = self.transaction_id
        return profile

    def discharge_data(self) -> str | None:
        """The DataTransfer `data` of a data_transfer discharge lease (None without one)."""
        if self.discharge is None:
            return None
        return json.dumps(
            {
                "connectorId": self.connector_id,
                "transactionId": self.transaction_id,
                "startSchedule": iso(self.start),
                "chargingRateUnit": self.unit,
                "chargingSchedulePeriod": [
                    {"startPeriod": s, "limit": d}
                    for s, d in zip(self.offsets_s, self.discharge, strict=True)
                ],
            },
            separators=(",", ":"),
        )


def differs(
    old: OutgoingProfile | None,
    new: OutgoingProfile,
    at: datetime,
    band: float,
    *,
    lease_moves: bool = True,
) -> bool:
    """Whether `new` is worth sending over `old`: another structure, or a limit at some time
    from `at` on that moves by more than `band` (in the profile's unit), or switches on/off.

    With `lease_moves` (the default) the times between the two lease ends are not compared:
    there the profiles differ only because the lease moved on, and the refresh margin decides
    when to extend a lease. `lease_moves=False` compares every time from `at` on: what the
    charger does once `old`'s lease has lapsed (its fallback) against what `new` asks for.
    """
    if old is None:
        return True
    if (old.purpose, old.unit, old.transaction_id, old.connector_id, old.profile_id) != (
        new.purpose,
        new.unit,
        new.transaction_id,
        new.connector_id,
        new.profile_id,
    ):
        return True
    if (old.discharge is None) != (new.discharge is None):
        return True
    # Between the two lease ends the profiles differ only because the lease moved on; the
    # refresh margin, not the deadband, decides when to extend a lease.
    shifted: tuple[datetime, datetime] | None = None
    if lease_moves and old.lease_end is not None and new.lease_end is not None:
        shifted = (min(old.lease_end, new.lease_end), max(old.lease_end, new.lease_end))
    for t in sorted({at, *old.changes_after(at), *new.changes_after(at)}):
        if shifted is not None and shifted[0] <= t < shifted[1]:
            continue
        for a, b in (
            (old.limit_at(t), new.limit_at(t)),
            (old.discharge_at(t), new.discharge_at(t)),
        ):
            if abs(a - b) > band + 1e-9 or (a == 0.0) != (b == 0.0):
                return True
    return False


def band_in_unit(deadband_kw: float, charger: ChargePoint) -> float:
    """The deadband in the charger's unit."""
    return deadband_kw * 1000.0 / watts_per_unit(charger, charger.rate_unit)


def _whole_seconds(at: datetime) -> datetime:
    return at.replace(microsecond=0)


def default_profile(
    charger: ChargePoint, safe_kw: float, now: datetime, cfg: LeaseConfig
) -> OutgoingProfile:
    """TxDefaultProfile on connector 0 at the safe share of one connector, without end."""
    return OutgoingProfile(
        slot="default",
        connector_id=0,
        purpose="TxDefaultProfile",
        profile_id=cfg.default_profile_id,
        stack_level=cfg.stack_level,
        unit=charger.rate_unit,
        start=_whole_seconds(now),
        offsets_s=(0,),
        limits=(max(0.0, to_limit(safe_kw, charger)),),
        phases=charger.phases,
    )


def max_profile(charger: ChargePoint, now: datetime, cfg: LeaseConfig) -> OutgoingProfile:
    """ChargePointMaxProfile on connector 0 at the circuit limit, without end."""
    return OutgoingProfile(
        slot="max",
        connector_id=0,
        purpose="ChargePointMaxProfile",
        profile_id=cfg.max_profile_id,
        stack_level=cfg.stack_level,
        unit=charger.rate_unit,
        start=_whole_seconds(now),
        offsets_s=(0,),
        limits=(max(0.0, to_limit(charger.max_power_kw, charger)),),
        phases=charger.phases,
    )


def _slot_index(slot_starts: Sequence[datetime], at: datetime) -> int | None:
    """The plan slot containing `at`, or None outside the plan."""
    if not slot_starts or at < slot_starts[0]:
        return None
    t = bisect.bisect_right(list(slot_starts), at) - 1
    end = slot_starts[t + 1] if t + 1 < len(slot_starts) else slot_starts[t] + SLOT
    if t == len(slot_starts) - 1 and at >= end:
        return None
    return t


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
SLOT_US = SLOT // _ONE_US


def _micros(at: datetime) -> int:
    """An aware time as integer microseconds since the epoch (exact)."""
    return (at - _EPOCH) // _ONE_US


@functools.lru_cache(maxsize=8)  # the slot starts of the latest plans
def _micros_of(slot_starts: tuple[datetime, ...]) -> tuple[int, ...]:
    """A plan's slot starts as integer microseconds, converted once per plan."""
    return tuple(_micros(s) for s in slot_starts)


def tx_profile(
    charger: ChargePoint,
    connector_id: int,
    transaction_id: int,
    setpoint: Setpoint | None,
    plan: Plan | None,
    safe_kw: float,
    now: datetime,
    cfg: LeaseConfig,
) -> OutgoingProfile:
    """The TxProfile lease of a running transaction.

    From now to now + lease window: the plan's setpoint per slot; then min(plan, safe share),
    at least 0, per slot to the plan's end; without a plan for this connector, the safe share.
    """
    start = _whole_seconds(now)
    lease_end = start + timedelta(seconds=cfg.lease_window_s)
    # (time, planned kW or None) at each change: now, the slot boundaries, the lease end.
    # Built for every running transaction at every plan (1,000 chargers: the dispatcher's
    # largest share of the event loop), so the slots are walked once in order (the times are
    # sorted) and each distinct power is converted once.
    # Times as integer microseconds since the epoch (exact, ordered as the instants are; the
    # plan's slot starts converted once per plan): datetime arithmetic at each of ~100 points
    # was most of a TxProfile's cost.
    starts = _micros_of(plan.slot_starts) if plan is not None and setpoint is not None else ()
    start_us, lease_end_us = _micros(start), _micros(lease_end)
    first = bisect.bisect_right(starts, start_us)  # the first slot start after `start`
    # The sorted distinct times: `start`, the slot starts after it, the lease end among them.
    after = starts[first:]
    cut = bisect.bisect_left(after, lease_end_us)
    known = cut < len(after) and after[cut] == lease_end_us
    lease = [lease_end_us] if lease_end_us > start_us and not known else []
    times = [start_us, *after[:cut], *lease, *after[cut:]]
    t = first - 1  # the plan slot containing `at`: bisect_right(starts, at) - 1, walked forward
    last = len(starts) - 1
    offsets: list[int] = []
    limits: list[float] = []
    discharge: list[float] = []
    mode = charger.v2g_mode
    converted: dict[float, float] = {}
    for at in times:
        while t < last and starts[t + 1] <= at:
            t += 1
        kw = None
        if setpoint is not None and starts and t >= 0:
            past_end = t == last and at >= starts[t] + SLOT_US
            kw = None if past_end else setpoint.kw[t]
        in_lease = at < lease_end_us
        if kw is None:
            kw_now = safe_kw
        elif in_lease:
            kw_now = kw
        else:
            kw_now = max(0.0, min(kw, safe_kw))
        charge = converted.get(kw_now)
        if charge is None:
            charge = converted[kw_now] = to_limit(kw_now, charger)
        dis = 0.0
        if charge < 0.0:
            if mode == "negative_limit":
                pass
            elif mode == "data_transfer":
                dis, charge = -charge, 0.0
            else:
                charge = 0.0
        offset = (at - start_us) // 1_000_000  # at >= start: whole seconds, as int() cut
        if offsets and offsets[-1] == offset:
            # Two changes within one second (a plan made a fraction of a second after `now`):
            # periods are whole seconds, so the later value takes the period.
            offsets.pop()
            limits.pop()
            discharge.pop()
        if limits and limits[-1] == charge and (discharge[-1] == dis):
            continue
        offsets.append(offset)
        limits.append(charge)
        discharge.append(dis)
        if len(limits) > cfg.max_periods:
            break  # everything after the first max_periods periods is cut off below
    if len(limits) > cfg.max_periods:
        offsets, limits, discharge = (
            offsets[: cfg.max_periods],
            limits[: cfg.max_periods],
            discharge[: cfg.max_periods],
        )
        # The last period holds for ever: it must be a fallback value, not a plan value.
        limits[-1] = max(0.0, min(limits[-1], to_limit(safe_kw, charger)))
        discharge[-1] = 0.0
    return OutgoingProfile(
        slot=f"tx:{connector_id}",
        connector_id=connector_id,
        purpose="TxProfile",
        profile_id=cfg.tx_profile_id_base + connector_id,
        stack_level=cfg.stack_level,
        unit=charger.rate_unit,
        start=start,
        offsets_s=tuple(offsets),
        limits=tuple(limits),
        phases=charger.phases,
        transaction_id=transaction_id,
        lease_end=lease_end,
        discharge=tuple(discharge) if mode == "data_transfer" else None,
    )


def in_form(
    profile: OutgoingProfile,
    charger: ChargePoint,
    *,
    stack_level: int,
    unit: RateUnit,
    purpose: str,
) -> OutgoingProfile:
    """The same limits in another form a charger may take (RELIABILITY P-06 fallback ladder):
    another stack level, the other unit (converted, towards zero, minimum rate applied), or a
    TxProfile sent as a TxDefaultProfile on its connector (without the transaction id)."""
    limits, discharge = profile.limits, profile.discharge
    if unit != profile.unit:
        limits = tuple(
            to_limit(from_limit(limit, charger, profile.unit), charger, unit) for limit in limits
        )
        if discharge is not None:
            discharge = tuple(
                abs(to_limit(from_limit(d, charger, profile.unit), charger, unit))
                for d in discharge
            )
    return replace(
        profile,
        stack_level=stack_level,
        unit=unit,
        purpose=purpose,
        limits=limits,
        discharge=discharge,
        transaction_id=profile.transaction_id if purpose == "TxProfile" else None,
    )


def last_off_edge(profile: OutgoingProfile, until: datetime) -> datetime | None:
    """The last time at or before `until` at which the plan in the profile switches its
    connector off (a period with limit 0 after one without), None if it does not. The lease's
    end is not such a switch: a fallback that lapsed (the refresh came late) is no reason to
    hold the next switch on back."""
    edge = None
    end = profile.lease_end
    for k in range(1, len(profile.limits)):
        at = profile.start + timedelta(seconds=profile.offsets_s[k])
        if at > until or (end is not None and at >= end):
            break
        before = profile.limits[k - 1] != 0.0 or profile.discharge_at(at - timedelta(seconds=1))
        if before and profile.limits[k] == 0.0 and not profile.discharge_at(at):
            edge = at
    return edge


def apply_guard(
    profile: OutgoingProfile, off_at: datetime | None, guard_s: float, max_periods: int
) -> OutgoingProfile:
    """The profile with every switch on held until `guard_s` after the switch off before it
    (`off_at`, or one inside the profile): a connector is switched at most once each way per
    guard time (RELIABILITY A7, evcc's guard duration). Only limits go down (to 0), so the lease
    and its fallback stay as safe; cut to `max_periods`, the last period is at most the
    profile's own last (its fallback)."""
    if guard_s <= 0:
        return profile
    guard = timedelta(seconds=guard_s)
    offsets: list[int] = []
    limits: list[float] = []
    discharge: list[float] = []
    last_off = off_at
    was_on = off_at is None
    for k, offset in enumerate(profile.offsets_s):
        at = profile.start + timedelta(seconds=offset)
        limit = profile.limits[k]
        out = profile.discharge[k] if profile.discharge is not None else 0.0
        on = limit != 0.0 or out != 0.0
        if not on and was_on and k > 0:
            last_off = at
        held_until = last_off + guard if last_off is not None else None
        if on and held_until is not None and at < held_until:
            # Off until the guard time is over, then what the profile says.
            offsets.append(offset)
            limits.append(0.0)
            discharge.append(0.0)
            end = profile.offsets_s[k + 1] if k + 1 < len(profile.offsets_s) else None
            release = int((held_until - profile.start).total_seconds() + 0.999)
            if end is None or release < end:
                offsets.append(release)
                limits.append(limit)
                discharge.append(out)
                was_on = True
            else:
                was_on = False
            continue
        offsets.append(offset)
        limits.append(limit)
        discharge.append(out)
        was_on = on
    # Merge equal neighbours the holding made.
    merged_o, merged_l, merged_d = [offsets[0]], [limits[0]], [discharge[0]]
    for o, lim, d in zip(offsets[1:], limits[1:], discharge[1:], strict=True):
        if o == merged_o[-1]:
            merged_l[-1], merged_d[-1] = lim, d
        elif lim != merged_l[-1] or d != merged_d[-1]:
            merged_o.append(o)
            merged_l.append(lim)
            merged_d.append(d)
    if len(merged_l) > max_periods:
        merged_o, merged_l, merged_d = (
            merged_o[:max_periods],
            merged_l[:max_periods],
            merged_d[:max_periods],
        )
        merged_l[-1] = min(merged_l[-1], profile.limits[-1], key=abs)
        merged_d[-1] = 0.0
    return replace(
        profile,
        offsets_s=tuple(merged_o),
        limits=tuple(merged_l),
        discharge=tuple(merged_d) if profile.discharge is not None else None,
    )
