"""From fleet state and "now" to a `PlanningProblem`: horizon, availability, overrides, limits."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np

from controller.domain import SLOT, ChargePoint, Series, Vehicle, slot_floor
from controller.planning.plan import Plan, Setpoint
from controller.planning.problem import FloatArray, IntArray, PlanningProblem, Schedule
from controller.settings import PlanningSettings
from controller.state import FleetState

DEFAULT_TARGET_SOC = 0.8


def slot_starts(now: datetime, horizon_slots: int) -> list[datetime]:
    """Start of each slot of the horizon: `now`, then the following 15-minute boundaries."""
    first = slot_floor(now)
    return [now] + [first + SLOT * k for k in range(1, horizon_slots)]


def slot_lengths_h(now: datetime, horizon_slots: int) -> FloatArray:
    """(T,) slot lengths in hours; the first is what is left of the current slot."""
    dt = np.full(horizon_slots, 0.25)
    dt[0] = (slot_floor(now) + SLOT - now).total_seconds() / 3600.0
    return dt


def _series_values(
    series: Series | None, starts: list[datetime], default: float
) -> tuple[FloatArray, int | None]:
    values = np.full(len(starts), default, dtype=float)
    first_missing: int | None = None
    for t, at in enumerate(starts):
        value = series.value_at(at) if series is not None else None
        if value is None:
            first_missing = t if first_missing is None else first_missing
        else:
            values[t] = value
    return values, first_missing


def _slots_until(starts: list[datetime], when: datetime) -> int:
    """How many slots end at or before `when` (the car is there for all of them)."""
    count = 0
    for t, start in enumerate(starts):
        end = starts[t + 1] if t + 1 < len(starts) else slot_floor(start) + SLOT
        if end <= when:
            count = t + 1
        else:
            break
    return count


# A car leaving inside a slot is planned there only when it is there for at least this share
# of it. Its setpoint there runs it faster until it leaves, up to its bound U, so the plan keeps
# U (1 - share) of the slot's head-room for that: at a full site that is taken from the other
# cars, and below half a slot it would take them more than the car can get (U share).
MIN_LAST_SHARE = 0.5


def _last_slot_reserve_kw(
    upper: FloatArray, lower: FloatArray, departure_slot: IntArray, share: FloatArray
) -> FloatArray:
    """(T,) head-room the raises until departure may take: per car leaving inside slot t with
    share s (free to be steered there), its bound there over s, times 1 - s."""
    reserve = np.zeros(upper.shape[1])
    for i in (int(k) for k in np.flatnonzero(share < 1.0)):
        t = int(departure_slot[i]) - 1
        if 0 <= t < upper.shape[1] and upper[i, t] > 0.0 and lower[i, t] <= 0.0:
            reserve[t] += upper[i, t] / share[i] * (1.0 - share[i])
    return reserve


def departure_share(starts: list[datetime], departure: datetime) -> tuple[int, float]:
    """(slots the car is there for, share of the last of them it is there for).

    A car leaving at a slot boundary is there for whole slots: (count, 1.0). A car leaving
    inside a slot of the horizon is there for that slot too, for the part before it leaves:
    leaving at 07:44 gives the slot 07:30-07:45 with 14/15 of it (and at 07:46 the slot
    07:45-08:00 with 1/15). Its power bound there is scaled by that share, so the energy the
    plan gives it in the slot is what full power until the departure can deliver.
    """
    whole = _slots_until(starts, departure)
    if whole >= len(starts) or departure <= starts[whole]:
        return whole, 1.0
    start = starts[whole]
    end = starts[whole + 1] if whole + 1 < len(starts) else slot_floor(start) + SLOT
    share = (departure - start) / (end - start)
    return whole + 1, float(share)


def _default_departure(now: datetime, settings: PlanningSettings) -> datetime:
    candidate = now.replace(
        hour=settings.default_departure_hour_utc, minute=0, second=0, microsecond=0
    )
    if candidate <= now + timedelta(hours=1):
        candidate += timedelta(days=1)
    return candidate


def _connector_limit_kw(vehicle: Vehicle, charger: ChargePoint | None) -> float:
    limit = vehicle.max_charge_kw
    if charger is not None:
        limit = min(limit, charger.max_power_kw)
        connector = charger.connector(vehicle.connector_id or 0)
        if connector is not None:
            limit = min(limit, connector.max_power_kw)
    return limit


def inputs_expire_at(
    state: FleetState, now: datetime, settings: PlanningSettings
) -> datetime | None:
    """The next moment an input the planner trusts turns stale, so the plan must be redone.

    The site meter's reading stops counting `site_load_fresh_s` after it was taken, and the
    head-room series `headroom_stale_s` after it was received; each turn is a change of the
    problem that no event announces. Returns the earliest such moment after `now` ("just past"
    the limit), or None when no input will turn stale.
    """
    deadlines: list[datetime] = []
    past = timedelta(milliseconds=1)  # "older than", so just after the limit
    if state.site_load is not None:
        deadlines.append(state.site_load.at + timedelta(seconds=settings.site_load_fresh_s) + past)
    if state.headroom is not None:
        deadlines.append(
            state.headroom.received_at + timedelta(seconds=settings.headroom_stale_s) + past
        )
    ahead = [d for d in deadlines if d > now]
    return min(ahead) if ahead else None


def build_problem(
    state: FleetState, now: datetime, settings: PlanningSettings
) -> tuple[PlanningProblem, list[datetime]]:
    """The planning problem for the plugged-in fleet over the horizon that starts at `now`.

    Returns the problem and the start of each of its slots.
    """
    horizon = settings.horizon_slots
    starts = slot_starts(now, horizon)
    dt_h = slot_lengths_h(now, horizon)
    vehicles = sorted(
        (v for v in state.vehicles.values() if v.plugged_in), key=lambda v: v.vehicle_id
    )
    n = len(vehicles)
    capacity_kw = state.site.capacity_kw if state.site is not None else 0.0
    safe_kw = state.site.safe_limit_kw if state.site is not None else 0.0

    prices, price_missing = _series_values(state.prices, starts, settings.default_price_eur_per_kwh)
    headroom_fresh = (
        state.headroom is not None
        and (now - state.headroom.received_at).total_seconds() <= settings.headroom_stale_s
    )
    # Past the series' end (or when it is stale) the planner may only count on the safe limit.
    headroom, _ = _series_values(state.headroom if headroom_fresh else None, starts, safe_kw)
    load = state.site_load
    if load is not None and (now - load.at).total_seconds() <= settings.site_load_fresh_s:
        # What the households draw now is the best forecast of the current slot.
        headroom[0] = capacity_kw - load.load_kw
    elif load is not None:
        # The site meter was reporting and has gone quiet: what runs until the next lease ends
        # may only count on the safe limit (RELIABILITY P-03: never plan on a last value).
        lease_end = now + timedelta(seconds=settings.offline_lease_s)
        for t, start in enumerate(starts):
            if start >= lease_end:
                break
            headroom[t] = min(headroom[t], safe_kw)
    headroom = np.clip(headroom, 0.0, capacity_kw)

    upper = np.zeros((n, horizon))
    lower = np.zeros((n, horizon))
    departure_slot = np.zeros(n, dtype=np.int64)
    target = np.zeros(n)
    v2g = np.zeros(n, dtype=bool)
    min_kw = np.zeros(n)
    last_share = np.ones(n)
    overrides = state.active_overrides(now) + [
        o for o in state.overrides.values() if o.created_at > now
    ]
    for i, vehicle in enumerate(vehicles):
        charger = state.chargers.get(vehicle.charger_id or "")
        departure = vehicle.departure
        if departure is None or departure <= now:
            departure = _default_departure(now, settings)
        if settings.partial_last_slot:
            departure_slot[i], last_share[i] = departure_share(starts, departure)
        else:
            departure_slot[i] = _slots_until(starts, departure)
        wanted = vehicle.target_kwh
        if wanted is None:
            wanted = DEFAULT_TARGET_SOC * vehicle.capacity_kwh
        target[i] = max(wanted, 0.0) + settings.target_margin_kwh
        limit_kw = _connector_limit_kw(vehicle, charger)
        if charger is not None:
            min_kw[i] = min(charger.min_power_kw, limit_kw)
        # Where the car leaves in its 15-minute slot: the same at every re-plan, so a slot one
        # plan counts on is not dropped by the next (in the current slot the share of what is
        # left of it shrinks as time passes).
        position = (departure - slot_floor(departure)) / SLOT
        if last_share[i] < 1.0 and (position < MIN_LAST_SHARE or limit_kw * position < min_kw[i]):
            # Too short to be worth its head-room reserve (see `MIN_LAST_SHARE`), or to be
            # used at all (the minimum rate bounds the slot's average power): the car is
            # planned on its whole slots.
            departure_slot[i] -= 1
            last_share[i] = 1.0
        upper[i, : departure_slot[i]] = limit_kw
        if departure_slot[i] == 0:
            min_kw[i] = 0.0  # never there: no setpoint at all
        if last_share[i] < 1.0:
            # The slot the car leaves in: the average power over the slot is bounded by full
            # power for the part it is still there (`make_plan` runs it faster until it leaves).
            upper[i, departure_slot[i] - 1] *= last_share[i]
            if departure_slot[i] == 1:
                # Its only slot: the minimum rate of its setpoint, m, is m s on average.
                min_kw[i] *= last_share[i]
        v2g[i] = (
            vehicle.v2g_allowed
            and vehicle.max_discharge_kw > 0
            and charger is not None
            and charger.v2g_mode != "none"
        )

    # A charger that was online and dropped off keeps running its last lease: up to the end of
    # the lease window whatever it was given (budgeted at its full limit, as that is unknown
    # here), then its safe share. The plan cannot steer it, so it budgets that for its cars.
    circuits = sum(c.max_power_kw for c in state.chargers.values())
    for i, vehicle in enumerate(vehicles):
        charger = state.chargers.get(vehicle.charger_id or "")
        if charger is None or charger.online or charger.last_seen is None or circuits <= 0:
            continue
        connectors = max(1, len(charger.connectors))
        share_kw = safe_kw * charger.max_power_kw / circuits / connectors
        lease_end = charger.last_seen + timedelta(seconds=settings.offline_lease_s)
        in_lease = np.array([at < lease_end for at in starts], dtype=bool)
        fixed = np.where(in_lease, upper[i], np.minimum(upper[i], share_kw))
        upper[i] = fixed
        lower[i] = fixed

    index = {v.vehicle_id: i for i, v in enumerate(vehicles)}
    for override in overrides:
        window = np.array(
            [override.created_at <= at < override.expires_at for at in starts], dtype=bool
        )
        if override.kind == "cap_site" and override.limit_kw is not None:
            headroom = np.where(window, np.minimum(headroom, override.limit_kw), headroom)
            continue
        rows = _rows_for(override.kind, override.target_id, vehicles, index)
        for i in rows:
            if override.kind in ("pause_vehicle", "pause_charger"):
                upper[i, window] = 0.0
                lower[i, window] = 0.0
            elif override.kind == "force_charge":
                lower[i, window] = upper[i, window]
            elif override.kind == "pin_charger" and override.limit_kw is not None:
                share = override.limit_kw / max(1, len(rows))
                pinned = np.minimum(upper[i, window], share)
                upper[i, window] = pinned
                lower[i, window] = pinned
            elif override.kind == "set_v2g" and override.enabled is not None:
                if window.any():
                    v2g[i] = bool(override.enabled) and vehicles[i].max_discharge_kw > 0

    for i in (int(k) for k in np.flatnonzero(v2g & (last_share < 1.0))):
        # The discharge bound is per car, not per slot, so a partial last slot cannot bound a
        # discharge there: a car that may discharge is planned on its whole slots only.
        departure_slot[i] -= 1
        upper[i, departure_slot[i]] = 0.0
        lower[i, departure_slot[i]] = 0.0
        last_share[i] = 1.0
    # The head-room the raise until departure needs (`until_departure_kw`) is kept out of the
    # plan; where a slot cannot hold it, its partial last slots are not planned.
    reserve = _last_slot_reserve_kw(upper, lower, departure_slot, last_share)
    for t in (int(k) for k in np.flatnonzero(reserve > headroom + 1e-9)):
        for i in (int(k) for k in np.flatnonzero((departure_slot == t + 1) & (last_share < 1.0))):
            departure_slot[i] -= 1
            upper[i, t] = 0.0
            lower[i, t] = 0.0
            last_share[i] = 1.0
        reserve[t] = 0.0
    headroom = np.maximum(headroom - reserve, 0.0)

    def column(name: str) -> FloatArray:
        return np.array([getattr(v, name) for v in vehicles], dtype=float)

    capacity = column("capacity_kwh")
    problem = PlanningProblem(
        start=now,
        dt_h=dt_h,
        vehicle_ids=tuple(v.vehicle_id for v in vehicles),
        charger_ids=tuple(v.charger_id for v in vehicles),
        energy_kwh=np.minimum(column("energy_kwh"), capacity),
        capacity_kwh=capacity,
        target_kwh=np.minimum(target, capacity),
        departure_slot=departure_slot,
        upper_kw=upper,
        lower_kw=np.minimum(lower, upper),
        min_kw=min_kw,
        eta_ch=column("charge_efficiency"),
        eta_dis=column("discharge_efficiency"),
        v2g=v2g,
        max_discharge_kw=np.where(v2g, column("max_discharge_kw"), 0.0),
        floor_kwh=column("soc_floor") * capacity,
        price_eur_per_kwh=prices,
        export_price_eur_per_kwh=prices.copy(),
        headroom_kw=headroom,
        export_limit_kw=state.site.export_limit_kw if state.site is not None else 0.0,
        degradation_eur_per_kwh=settings.degradation_eur_per_kwh,
        demand_charge_eur_per_kw=settings.demand_charge_eur_per_kw,
        price_forecast_from=_first_forecast(state.prices, starts, price_missing),
    )
    return problem, starts


def _first_forecast(
    series: Series | None, starts: list[datetime], missing: int | None
) -> int | None:
    if series is None:
        return 0
    candidates = [t for t in (missing,) if t is not None]
    if series.forecast_from is not None:
        forecast_start = series.start + SLOT * series.forecast_from
        for t, at in enumerate(starts):
            if at >= forecast_start:
                candidates.append(t)
                break
    return min(candidates) if candidates else None


def _rows_for(
    kind: str, target_id: str, vehicles: list[Vehicle], index: dict[str, int]
) -> list[int]:
    if kind in ("pause_charger", "pin_charger"):
        return [i for i, v in enumerate(vehicles) if v.charger_id == target_id]
    row = index.get(target_id)
    return [] if row is None else [row]


def make_plan(
    state: FleetState,
    problem: PlanningProblem,
    starts: list[datetime],
    schedule: Schedule,
    *,
    fallback: bool = False,
    note: str = "",
) -> Plan:
    """Wrap a schedule into a `Plan` with one setpoint per plugged-in connector.

    In the slot a car leaves in, its planned power is an average over the whole slot; its
    setpoint there runs it faster, up to its bound, so that the slot's energy is delivered
    before it leaves, in the head-room `build_problem` kept for that; the plan's head-room is
    the limit with that reserve given back (`until_departure_kw`).
    """
    setpoints = []
    net_kw, headroom = until_departure_kw(state, problem, starts, schedule)
    for i, vehicle_id in enumerate(schedule.vehicle_ids):
        vehicle = state.vehicles[vehicle_id]
        if vehicle.charger_id is None or vehicle.connector_id is None:
            continue
        net = net_kw[i]
        setpoints.append(
            Setpoint(
                charger_id=vehicle.charger_id,
                connector_id=vehicle.connector_id,
                vehicle_id=vehicle_id,
                kw=tuple(float(x) for x in net),
            )
        )
    return Plan(
        made_at=problem.start,
        schedule=schedule,
        setpoints=tuple(setpoints),
        slot_starts=tuple(starts),
        headroom_kw=tuple(float(x) for x in headroom),
        price_eur_per_kwh=tuple(float(x) for x in problem.price_eur_per_kwh),
        fallback=fallback,
        note=note,
    )


def last_slot_shares(
    state: FleetState, problem: PlanningProblem, starts: list[datetime]
) -> FloatArray:
    """(N,) per car of `problem`, the share of its last slot it is planned there for (1.0: its
    last slot is whole, or its partial slot was not planned; see `build_problem`)."""
    shares = np.ones(problem.n_vehicles)
    for row, vehicle_id in enumerate(problem.vehicle_ids):
        vehicle = state.vehicles.get(vehicle_id)
        if vehicle is None or vehicle.departure is None or vehicle.departure <= problem.start:
            continue
        slots, share = departure_share(starts, vehicle.departure)
        if share < 1.0 and slots == int(problem.departure_slot[row]):
            shares[row] = share
    return shares


def until_departure_kw(
    state: FleetState, problem: PlanningProblem, starts: list[datetime], schedule: Schedule
) -> tuple[FloatArray, FloatArray]:
    """((N, T) net setpoints, (T,) head-room): the schedule's power with each car's partial
    last slot run faster, and the head-room with the reserve for that given back.

    A car that leaves inside slot t is planned an average P over the slot, at most its bound
    U times the share s of the slot it is there for (`departure_share`). Held at P it would get
    only P s of the slot's energy before it leaves; its setpoint is P / s (at most U), which
    delivers the planned energy by the departure. Until it leaves the site then draws up to
    U (1 - s) more than the plan's slot total: `build_problem` kept that much of the slot's
    head-room out of the plan, and it is given back here (the plan's head-room is the real
    limit again). The raises are cut, in proportion, to what that head-room leaves above the
    plan (never, unless the plan itself is over it). Forced or pinned cells, discharging cars
    and cars whose last slot is whole keep the schedule's power.
    """
    net: FloatArray = schedule.charge_kw - schedule.discharge_kw
    shares = last_slot_shares(state, problem, starts)
    reserve = _last_slot_reserve_kw(
        problem.upper_kw, problem.lower_kw, problem.departure_slot, shares
    )
    headroom: FloatArray = problem.headroom_kw + reserve
    rows = {vid: i for i, vid in enumerate(problem.vehicle_ids)}
    raise_kw = np.zeros_like(net)
    for i, vehicle_id in enumerate(schedule.vehicle_ids):
        row = rows.get(vehicle_id)
        if row is None or shares[row] >= 1.0:
            continue
        share = float(shares[row])
        t = int(problem.departure_slot[row]) - 1
        power = float(schedule.charge_kw[i, t])
        if power <= 0.0 or schedule.discharge_kw[i, t] > 0.0 or problem.lower_kw[row, t] > 0.0:
            continue
        bound = float(problem.upper_kw[row, t]) / share
        raise_kw[i, t] = max(0.0, min(power / share, bound) - power)
    for t in (int(k) for k in np.flatnonzero(raise_kw.sum(axis=0) > 0.0)):
        room = float(headroom[t]) - float(net[:, t].sum())
        wanted = float(raise_kw[:, t].sum())
        raise_kw[:, t] *= min(1.0, max(0.0, room) / wanted)
    result: FloatArray = net + raise_kw
    return result, headroom
