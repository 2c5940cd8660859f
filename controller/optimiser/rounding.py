"""Min-rate rounding without a solver: slivers removed by moves that cost nothing.

The LP leaves a car a sliver (0 < power < the charger's minimum) in its marginal slot: a basic
solution of the transportation LP has one fractional arc per tree of its basis, and the money
face is wide (many slots share an hourly price). Most slivers can therefore be removed *inside
the same car*, at no cost:

- **merge**: the sliver's energy moves to another slot of the same car and kind (charge or
  discharge) that then runs at >= the minimum, at a price no higher than the sliver's slot;
- **lift**: the sliver is raised to the minimum with energy taken from another slot of the same
  car that keeps running at >= the minimum, at a price no lower than the sliver's slot.

Energy only moves within a car, so every car's energy at departure is what the LP planned (no
shortfall appears, a plain car's capacity row holds); the money of every move is <= 0, so the
plan keeps the LP's cost. Every move is checked before it is kept: the car's bounds and
availability, forced slots (never touched), head-room and export limit per slot, the site cap
(by default the plan's own peak, so flattening and the demand charge are kept), time sharing and
the battery's capacity and floor at every slot for V2G cars. Among the allowed target slots the
cheapest is taken, then the one that adds the least ramping. What is left is counted, and the
caller hands it to a solver round or to the greedy repair (`controller.optimiser.repair`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from controller.domain import SLOT_S, slot_floor
from controller.optimiser.prepare import Prepared
from controller.planning.problem import BoolArray, FloatArray, IntArray

_TOL = 1e-7  # kW: below this a setpoint is 0, within it of the minimum it is at the minimum
_SITE_TOL = 1e-7  # kW of head-room a move may use beyond the cap (solver round-off)
_PRICE_TOL = 1e-12  # EUR/kWh: prices this close are equal
# Rounds of the replay that withdraw one swap per bad setpoint before it withdraws all of them.
_REPLAY_ROUNDS = 30


def slivers(
    prepared: Prepared, charge_kw: FloatArray, discharge_kw: FloatArray
) -> tuple[BoolArray, BoolArray]:
    """(charge, discharge) (N, T) masks of setpoints strictly between 0 and the minimum.

    Forced charge (force-charge, pins) is the operator's and never counts as a sliver.
    """
    minimum = prepared.problem.min_kw[:, None]
    forced = prepared.lower_kw > 0.0
    small_charge: BoolArray = (charge_kw > _TOL) & (charge_kw < minimum - _TOL) & ~forced
    small_discharge: BoolArray = (discharge_kw > _TOL) & (discharge_kw < minimum - _TOL)
    return small_charge, small_discharge


Swaps = dict[tuple[int, str, int], tuple[str, int, bool]]
"""(kind, vehicle, absolute slot) -> (partner vehicle, absolute slot, lift) of a swap that
worked (lift: the sliver went up to the minimum; else down to 0)."""


@dataclass(slots=True)
class Hints:
    """What one solve's rounding leaves to the next: its swaps, and how many slivers it left."""

    swaps: Swaps = field(default_factory=dict)
    left: int = 0


def round_slivers(
    prepared: Prepared,
    charge_kw: FloatArray,
    discharge_kw: FloatArray,
    *,
    site_cap_kw: FloatArray,
    hints: Hints | None = None,
) -> tuple[FloatArray, FloatArray, dict[str, float]]:
    """(charge, discharge, figures): the plan with as many slivers removed as free moves allow.

    `site_cap_kw` (T,) is the most a move may raise a slot's net import to (at most h_t; the
    plan's peak keeps the peak). `hints` are the swaps that worked in the last solve: tried
    first, and replaced by this solve's. Figures: `rounding_moves`, `rounding_left` (slivers
    left for the greedy repair).
    """
    rounding = _Rounding(prepared, charge_kw.copy(), discharge_kw.copy(), site_cap_kw, hints)
    found = [np.nonzero(grid) for grid in slivers(prepared, rounding.power[0], rounding.power[1])]
    kinds = np.concatenate([np.full(len(found[0][0]), 0), np.full(len(found[1][0]), 1)])
    cars = np.concatenate([found[0][0], found[1][0]]).astype(np.int64)
    slots = np.concatenate([found[0][1], found[1][1]]).astype(np.int64)
    done = rounding.replay(kinds, cars, slots)
    moves = int(done.sum())
    for kind, i, t in zip(
        kinds[~done].tolist(), cars[~done].tolist(), slots[~done].tolist(), strict=True
    ):
        if rounding.fix(kind, i, t):
            moves += 1
    # Every move leaves its slots at 0 or >= the minimum: only the slivers found can be left.
    left = rounding.still(kinds, cars, slots)
    for kind, i in sorted(set(zip(kinds[left].tolist(), cars[left].tolist(), strict=True))):
        moves += rounding.gather(kind, i)
    left = rounding.still(kinds, cars, slots)
    if prepared.any_v2g and hints is not None and done.any() and left.sum() > hints.left:
        # The replayed swaps are first-fit choices of another plan; where they leave more
        # slivers than last time, a fresh search is tried and wins if it leaves fewer. (Only
        # with V2G: on the V2G benchmark day it halves what is left to the greedy repair;
        # without V2G it left as many or more on 2 x 60 re-plans and cost ~5 ms when it ran.)
        fresh = round_slivers(prepared, charge_kw, discharge_kw, site_cap_kw=site_cap_kw)
        if fresh[2]["rounding_left"] < left.sum():
            hints.swaps.clear()  # (the fresh search's swaps are not kept: next time, search)
            hints.left = int(fresh[2]["rounding_left"])
            return fresh
    if hints is not None:
        hints.swaps = rounding.learned
        hints.left = int(left.sum())
    return (
        rounding.power[0],
        rounding.power[1],
        {"rounding_moves": float(moves), "rounding_left": float(left.sum())},
    )


class _Rounding:
    """The plan being rounded, with the fleet's net site power kept up to date."""

    def __init__(
        self,
        prepared: Prepared,
        charge: FloatArray,
        discharge: FloatArray,
        cap: FloatArray,
        hints: Hints | None,
    ) -> None:
        p = prepared.problem
        self.hints: Swaps = hints.swaps if hints is not None else {}
        self.learned: Swaps = {}
        self.first_slot = int(slot_floor(p.start).timestamp() // SLOT_S)
        self._index_of: dict[str, int] | None = None
        self.p = prepared
        self.power = (charge, discharge)
        self.net: FloatArray = charge.sum(axis=0) - discharge.sum(axis=0)
        self.cap = np.minimum(cap, prepared.headroom_kw)
        self.export = p.export_limit_kw if prepared.any_v2g else 0.0
        self.dt = p.dt_h
        self.cost = (
            p.price_eur_per_kwh,
            p.degradation_eur_per_kwh - p.export_price_eur_per_kwh,
        )
        self.upper = (prepared.upper_kw, prepared.discharge_upper_kw)
        self.allowed = (
            (prepared.lower_kw <= 0.0) & prepared.available,
            prepared.discharge_available,
        )
        self.minimum: list[float] = p.min_kw.tolist()
        self.v2g: list[bool] = prepared.v2g.tolist()
        self.dt_list: list[float] = p.dt_h.tolist()
        self._grids: tuple[_Grid, ...] = ()

    @property
    def grids(self) -> tuple[_Grid, ...]:
        """The search structures of charge and discharge (built on first use)."""
        if not self._grids:
            self._grids = tuple(
                _Grid(self.power[k], self.upper[k], self.allowed[k]) for k in range(2)
            )
        return self._grids

    def replay(self, kinds: IntArray, cars: IntArray, slots: IntArray) -> BoolArray:
        """Apply the last solve's swaps for these slivers at once, where they still fit.

        All of them are applied together and the *end state* is checked: every setpoint a swap
        touches must be 0 or between the minimum and its bound (and allowed); for each one that
        is not, the latest swap touching it is withdrawn, and the check repeats until none is
        bad (after `_REPLAY_ROUNDS` rounds every swap on a bad setpoint goes at once). In the
        last solve the swaps were found one after another, each on the plan the ones before
        left, so many are valid only together: checked one at a time against the LP's plan (in
        passes) 440 of ~1,700 replayed at 5,000 cars, checked together ~1,050. Every swap keeps
        each car's energy and each slot's net power exactly, so any subset of them does too,
        and the setpoints are all that is left to check. What the replay leaves goes one by
        one. Cars with V2G are left to the one-by-one path (their battery is checked slot by
        slot). Returns which slivers were settled.
        """
        done = np.zeros(len(cars), dtype=bool)
        if not self.hints or not len(cars):
            return done
        ids = self.p.problem.vehicle_ids
        index = self.index_of()
        first = self.first_slot
        partner = np.full(len(cars), -1, dtype=np.int64)
        other = np.full(len(cars), -1, dtype=np.int64)
        lift = np.zeros(len(cars), dtype=bool)
        for k, (kind, i, t) in enumerate(
            zip(kinds.tolist(), cars.tolist(), slots.tolist(), strict=True)
        ):
            hint = self.hints.get((kind, ids[i], first + t))
            if hint is None:
                continue
            found = index.get(hint[0])
            if found is not None:
                partner[k], other[k], lift[k] = found, hint[1] - first, hint[2]
        t_count = len(self.dt)
        v2g = self.p.v2g
        usable = (partner >= 0) & (other >= 0) & (other < t_count) & (other != slots)
        usable &= partner != cars
        usable &= ~v2g[cars] & ~v2g[np.maximum(partner, 0)]
        minimum = self.p.problem.min_kw
        for kind in (0, 1):
            sel = np.nonzero(usable & (kinds == kind))[0]
            if not len(sel):
                continue
            power, upper, allowed = self.power[kind], self.upper[kind], self.allowed[kind]
            i, j, t, u = cars[sel], partner[sel], slots[sel], other[sel]
            change = np.where(lift[sel], minimum[i] - power[i, t], -power[i, t])
            back = change * self.dt[t] / self.dt[u]
            flat = np.concatenate([i, i, j, j]) * t_count + np.concatenate([t, u, t, u])
            delta = np.concatenate([change, -back, -change, back])
            cells, where = np.unique(flat, return_inverse=True)
            cell_car, cell_slot = cells // t_count, cells % t_count
            base = power[cell_car, cell_slot]
            bound, free = upper[cell_car, cell_slot], allowed[cell_car, cell_slot]
            swap = np.tile(np.arange(len(sel)), 4)
            ok = np.ones(len(sel), dtype=bool)
            for rounds in range(len(sel) + 1):
                value = base + np.bincount(where, weights=delta * ok[swap], minlength=len(cells))
                hit = ok[swap] & ~_valid(value, minimum[cell_car], bound, free)[where]
                if not hit.any():
                    break
                if rounds < _REPLAY_ROUNDS:
                    # One swap per bad setpoint (the latest): the others may be fine without it.
                    latest = np.full(len(cells), -1, dtype=np.int64)
                    np.maximum.at(latest, where[hit], swap[hit])
                    ok[latest[latest >= 0]] = False
                else:
                    ok[swap[hit]] = False
            touched = np.bincount(where, weights=ok[swap].astype(float), minlength=len(cells)) > 0
            value = value[touched]
            power[cell_car[touched], cell_slot[touched]] = np.where(
                np.abs(value) <= _TOL, 0.0, value
            )
            done[sel[ok]] = True
            for k in np.nonzero(ok)[0].tolist():
                key = (kind, ids[int(i[k])], first + int(t[k]))
                self.learned[key] = (ids[int(j[k])], first + int(u[k]), bool(lift[sel[k]]))
        return done

    def still(self, kinds: IntArray, cars: IntArray, slots: IntArray) -> BoolArray:
        """Which of these (kind, car, slot) cells are slivers now."""
        value = np.where(kinds == 0, self.power[0][cars, slots], self.power[1][cars, slots])
        minimum = self.p.problem.min_kw[cars]
        result: BoolArray = (value > _TOL) & (value < minimum - _TOL)
        return result

    # -- one sliver ---------------------------------------------------------------------------

    def fix(self, kind: int, i: int, t: int) -> bool:
        """Remove the sliver of car `i` in slot `t` (charge 0, discharge 1); False if none fits."""
        row = self.power[kind][i]
        minimum = float(self.p.problem.min_kw[i])
        if not _TOL < row[t] < minimum - _TOL:
            return False  # an earlier move already settled it
        return (
            self._swap(kind, i, t, minimum - row[t])
            or self._swap(kind, i, t, -row[t])
            or self._merge(kind, i, t, minimum)
            or self._lift(kind, i, t, minimum)
        )

    def _swap(self, kind: int, i: int, t: int, change_kw: float) -> bool:
        """Change car i by `change_kw` in slot t (to the minimum or to 0) and another car j by
        the opposite; the energy goes back the other way in a slot u where both stay valid.

        Every slot's net power stays as it is (peak and ramps too), each car's energy at
        departure too, and the money moves by p_t - p_u for one car and back for the other.
        The partner found for the same car and slot in the last solve is tried first (after an
        event most of the plan is what it was); else the search is short by construction: a
        partner that takes energy in a slot must be *open* there (running or a sliver, below
        its bound), and a basic LP solution has only one or two such slots per car.
        """
        grid = self.grids[kind]
        hint = self._hint(kind, i, t)
        if hint is not None and self._pair(kind, i, hint[0], t, hint[1], change_kw):
            return True
        if change_kw > 0.0:
            # Lift: j gives change_kw in t (it runs there), takes it back in a slot u where
            # it is open and i can give.
            backs = change_kw * self.dt[t] / self.dt
            left = grid.power[i] - backs
            gives = set(
                np.nonzero((left >= self.minimum[i] - _TOL) | (np.abs(left) <= _TOL))[0].tolist()
            )
            gives.discard(t)
            if not gives:
                return False
            for j in grid.donors(t, change_kw, self.p.problem.min_kw):
                if j == i:
                    continue
                for u in grid.open_of(j):
                    if u in gives and self._pair(kind, i, j, t, u, change_kw):
                        return True
            return False
        # Merge: j takes the sliver in t (it is open there), gives it back in a slot u where i
        # is open.
        for j in grid.open_at(t):
            if j == i:
                continue
            for u in grid.open_of(i):
                if u != t and self._pair(kind, i, j, t, u, change_kw):
                    return True
        return False

    def _pair(self, kind: int, i: int, j: int, t: int, u: int, change_kw: float) -> bool:
        """Swap with car j through slot u if all four setpoints stay valid (and apply it)."""
        grid = self.grids[kind]
        minimum = self.minimum
        back = change_kw * self.dt_list[t] / self.dt_list[u]
        mine, my_upper, my_allowed = grid.row(i)
        theirs, their_upper, their_allowed = grid.row(j)
        for value, m, upper, allowed in (
            (mine[t] + change_kw, minimum[i], my_upper[t], my_allowed[t]),
            (mine[u] - back, minimum[i], my_upper[u], my_allowed[u]),
            (theirs[t] - change_kw, minimum[j], their_upper[t], their_allowed[t]),
            (theirs[u] + back, minimum[j], their_upper[u], their_allowed[u]),
        ):
            if -_TOL <= value <= _TOL:
                continue
            if not (allowed and m - _TOL <= value <= upper + _TOL):
                return False
        if not self._exchange(kind, i, j, t, u, change_kw, back):
            return False
        self._remember(kind, i, j, t, u, change_kw > 0.0)
        return True

    def _hint(self, kind: int, i: int, t: int) -> tuple[int, int] | None:
        """(partner, slot) of the last solve's swap for this car and slot, if still here."""
        if not self.hints:
            return None
        ids = self.p.problem.vehicle_ids
        found = self.hints.get((kind, ids[i], self.first_slot + t))
        if found is None:
            return None
        j = self.index_of().get(found[0])
        u = found[1] - self.first_slot
        if j is None or not 0 <= u < len(self.dt_list) or u == t or j == i:
            return None
        return j, u

    def _remember(self, kind: int, i: int, j: int, t: int, u: int, lift: bool) -> None:
        ids = self.p.problem.vehicle_ids
        key = (kind, ids[i], self.first_slot + t)
        self.learned[key] = (ids[j], self.first_slot + u, lift)

    def index_of(self) -> dict[str, int]:
        """Row of each vehicle id (built on first use)."""
        if self._index_of is None:
            self._index_of = {v: k for k, v in enumerate(self.p.problem.vehicle_ids)}
        return self._index_of

    def _exchange(
        self, kind: int, i: int, j: int, t: int, u: int, change_kw: float, back_kw: float
    ) -> bool:
        """Apply a swap if the V2G cars in it keep their battery limits."""
        cars = ((i, change_kw, -back_kw), (j, -change_kw, back_kw))
        power = self.power[kind]
        if self.v2g[i] or self.v2g[j]:
            for car, at_t, at_u in cars:
                if not self.v2g[car]:
                    continue
                row = power[car].copy()
                row[t] = max(0.0, row[t] + at_t)
                row[u] = max(0.0, row[u] + at_u)
                pair = (row, self.power[1][car]) if kind == 0 else (self.power[0][car], row)
                if not self._car_ok(car, *pair):
                    return False
        grid = self.grids[kind]
        for car, at_t, at_u in cars:
            grid.set(car, t, max(0.0, power[car, t] + at_t))
            grid.set(car, u, max(0.0, power[car, u] + at_u))
        return True

    def gather(self, kind: int, i: int) -> int:
        """Pool a car's slivers of one price into as few slots of them as the minimum allows.

        What a flattening stage leaves (a discharge spread thinly over an evening of equal
        prices, say): n = floor(E / (minimum * dt)) of the slivers get E / n each and the others
        0, so money is unchanged; the site and (V2G) the battery are checked as for every move,
        with the latest slots tried first, then the earliest. Returns the slivers removed."""
        row = self.power[kind][i]
        minimum = float(self.p.problem.min_kw[i])
        small = (row > _TOL) & (row < minimum - _TOL) & self.allowed[kind][i]
        cost = self.cost[kind]
        removed = 0
        for price in np.unique(cost[small]):
            group = np.nonzero(small & (np.abs(cost - price) <= _PRICE_TOL))[0]
            energy = float((row[group] * self.dt[group]).sum())
            count = int(energy // (minimum * float(self.dt[group].max())) + 1e-9)
            count = min(count, len(group))
            if count < 1 or len(group) < 2:
                continue
            for chosen in (group[-count:], group[:count]):
                new = row.copy()
                new[group] = 0.0
                new[chosen] = energy / count / self.dt[chosen]
                if self._apply_row(kind, i, new, minimum):
                    removed += len(group)
                    row = self.power[kind][i]
                    break
        return removed

    def _apply_row(self, kind: int, i: int, new: FloatArray, minimum: float) -> bool:
        """Replace a car's row if every slot and the battery allow it."""
        row = self.power[kind][i]
        changed = np.nonzero(new != row)[0]
        if np.any(new[changed] > self.upper[kind][i][changed] + _TOL):
            return False
        if np.any((new[changed] > _TOL) & (new[changed] < minimum - _TOL)):
            return False
        sign = 1.0 if kind == 0 else -1.0
        net = self.net.copy()
        net[changed] += sign * (new[changed] - row[changed])
        if not self._site_ok(net)[changed].all():
            return False
        if self.v2g[i]:
            pair = (new, self.power[1][i]) if kind == 0 else (self.power[0][i], new)
            if not self._car_ok(i, *pair):
                return False
        self.net = net
        self.power[kind][i] = new
        self.grids[kind].refresh(i)
        return True

    def _merge(self, kind: int, i: int, t: int, minimum: float) -> bool:
        """Move the whole sliver into another slot of the car that then runs >= minimum."""
        row = self.power[kind][i]
        sign = 1.0 if kind == 0 else -1.0
        energy = row[t] * self.dt[t]
        add = energy / self.dt
        after = row + add
        cost = self.cost[kind]
        ok = (
            self.allowed[kind][i]
            & (after <= self.upper[kind][i] + _TOL)
            & (after >= minimum - _TOL)
            & (cost <= cost[t] + _PRICE_TOL)
        )
        ok[t] = False
        # The slot the sliver leaves: its net moves by -sign * sliver.
        left = self.net[t] - sign * row[t]
        if left > self.cap[t] + _SITE_TOL or left < -self.export - _SITE_TOL:
            return False
        base = self.net.copy()
        base[t] = left
        ok &= self._site_ok(base + sign * add)
        return self._try(kind, i, ok, base, sign * add, cost, lambda u: ((t, -row[t]), (u, add[u])))

    def _lift(self, kind: int, i: int, t: int, minimum: float) -> bool:
        """Raise the sliver to the minimum with energy from a slot that keeps running."""
        row = self.power[kind][i]
        sign = 1.0 if kind == 0 else -1.0
        raise_kw = minimum - row[t]
        if not self.allowed[kind][i][t] or minimum > self.upper[kind][i][t] + _TOL:
            return False
        raised = self.net[t] + sign * raise_kw
        if raised > self.cap[t] + _SITE_TOL or raised < -self.export - _SITE_TOL:
            return False
        take = raise_kw * self.dt[t] / self.dt
        cost = self.cost[kind]
        ok = self.allowed[kind][i] & (row - take >= minimum - _TOL) & (cost >= cost[t] - _PRICE_TOL)
        ok[t] = False
        base = self.net.copy()
        base[t] = raised
        ok &= self._site_ok(base - sign * take)
        return self._try(
            kind, i, ok, base, -sign * take, -cost, lambda u: ((t, raise_kw), (u, -take[u]))
        )

    # -- choosing and checking ----------------------------------------------------------------

    def _site_ok(self, net: FloatArray) -> BoolArray:
        result: BoolArray = (net <= self.cap + _SITE_TOL) & (net >= -self.export - _SITE_TOL)
        return result

    def _try(
        self,
        kind: int,
        i: int,
        ok: BoolArray,
        base: FloatArray,
        change: FloatArray,
        rank: FloatArray,
        changes: Callable[[int], tuple[tuple[int, float], ...]],
    ) -> bool:
        """Apply the best allowed candidate slot (by `rank`, then least added ramping)."""
        candidates = np.nonzero(ok)[0]
        if not len(candidates):
            return False
        ramp = _ramp_added(base, change)[candidates]
        order = candidates[np.lexsort((ramp, rank[candidates]))]
        v2g = bool(self.p.v2g[i])
        for u in order[: 8 if v2g else 1]:
            edits = changes(int(u))
            rows = (self.power[0][i].copy(), self.power[1][i].copy())
            for slot, delta in edits:
                rows[kind][slot] = max(0.0, rows[kind][slot] + delta)
            if v2g and not self._car_ok(i, rows[0], rows[1]):
                continue
            sign = 1.0 if kind == 0 else -1.0
            for slot, _ in edits:
                self.net[slot] += sign * (rows[kind][slot] - self.power[kind][i][slot])
            self.power[kind][i] = rows[kind]
            self.grids[kind].refresh(i)
            return True
        return False

    def _car_ok(self, i: int, charge: FloatArray, discharge: FloatArray) -> bool:
        """A V2G car's time sharing, capacity and floor at every slot, and its departure rule."""
        p = self.p.problem
        share = charge / self.p.unit_kw[i] + discharge / self.p.discharge_unit_kw[i]
        if np.any(share > 1.0 + _TOL):
            return False
        step = (p.eta_ch[i] * charge - discharge / p.eta_dis[i]) * self.dt
        energy = p.energy_kwh[i] + np.concatenate([[0.0], np.cumsum(step)])
        if np.any(energy > max(p.capacity_kwh[i], p.energy_kwh[i]) + 1e-6):
            return False
        if np.any(energy < self.p.floor_kwh[i] - 1e-6):
            return False
        least = min(p.energy_kwh[i], p.target_kwh[i])
        return bool(energy[p.departure_slot[i]] >= least - 1e-6)


class _Grid:
    """One kind of power (charge or discharge) of the whole fleet, for scalar searches.

    Rows are read as Python lists once per car (numpy scalar access is slow in loops), and
    `open_at(t)` lists the cars that run or have a sliver in slot t with room to take more.
    Every change goes through `set`, which keeps the array, the lists and `open_at` in step.
    """

    def __init__(self, power: FloatArray, upper: FloatArray, allowed: BoolArray) -> None:
        self.power, self.upper, self.allowed = power, upper, allowed
        self._rows: dict[int, tuple[list[float], list[float], list[bool]]] = {}
        self._open = (power > _TOL) & (power < upper - _TOL) & allowed
        self._open_at: dict[int, list[int]] = {}
        self._open_of: dict[int, list[int]] = {}
        self._by_slot = np.ascontiguousarray(power.T)  # (T, N): fast column reads

    def donors(self, slot: int, give_kw: float, minimum: FloatArray) -> list[int]:
        """The cars that run in `slot` and can give `give_kw` there and keep running."""
        column = self._by_slot[slot]
        found: list[int] = np.nonzero(column >= minimum + give_kw - _TOL)[0].tolist()
        return found

    def open_of(self, car: int) -> list[int]:
        """The slots where `car` runs (or has a sliver) with room to take more."""
        found = self._open_of.get(car)
        if found is None:
            found = np.nonzero(self._open[car])[0].tolist()
            self._open_of[car] = found
        return found

    def open_at(self, slot: int) -> list[int]:
        """The cars that run (or have a sliver) in `slot` with room to take more."""
        found = self._open_at.get(slot)
        if found is None:
            found = np.nonzero(self._open[:, slot])[0].tolist()
            self._open_at[slot] = found
        return found

    def row(self, car: int) -> tuple[list[float], list[float], list[bool]]:
        """(power, bound, allowed) of a car's row, as lists."""
        found = self._rows.get(car)
        if found is None:
            found = (
                self.power[car].tolist(),
                self.upper[car].tolist(),
                self.allowed[car].tolist(),
            )
            self._rows[car] = found
        return found

    def set(self, car: int, slot: int, value: float) -> None:
        """Change one setpoint."""
        power, upper, allowed = self.row(car)
        was_open = _TOL < power[slot] < upper[slot] - _TOL and allowed[slot]
        power[slot] = value
        self.power[car, slot] = value
        self._by_slot[slot, car] = value
        is_open = _TOL < value < upper[slot] - _TOL and allowed[slot]
        if was_open != is_open:
            self._open[car, slot] = is_open
            for listed, item in ((self._open_at.get(slot), car), (self._open_of.get(car), slot)):
                if listed is not None and is_open:
                    listed.append(item)
                elif listed is not None:
                    listed.remove(item)

    def refresh(self, car: int) -> None:
        """Re-read a car's row after it was changed in the array directly."""
        cached = self._rows.pop(car, None)
        if cached is None:
            return
        fresh = self.row(car)
        for slot, (old, new) in enumerate(zip(cached[0], fresh[0], strict=True)):
            if old != new:
                fresh[0][slot] = old
                self.set(car, slot, new)


def _valid(
    value: FloatArray, minimum: FloatArray | float, upper: FloatArray, allowed: BoolArray
) -> BoolArray:
    """Where a setpoint of `value` is allowed: 0, or between the minimum and the bound."""
    zero = np.abs(value) <= _TOL
    running = (value >= minimum - _TOL) & (value <= upper + _TOL)
    result: BoolArray = zero | (allowed & running)
    return result


def _ramp_added(base: FloatArray, change: FloatArray) -> FloatArray:
    """(T,) how much sum |g[t] - g[t-1]| grows when slot u alone changes by change[u]."""
    t_count = len(base)
    added = np.zeros(t_count)
    if t_count < 2:
        return added
    moved = base + change
    left = np.abs(moved[1:] - base[:-1]) - np.abs(base[1:] - base[:-1])  # slot u = 1..T-1
    right = np.abs(base[1:] - moved[:-1]) - np.abs(base[1:] - base[:-1])  # slot u = 0..T-2
    added[1:] += left
    added[:-1] += right
    return added
