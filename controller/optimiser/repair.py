"""Min-rate repair: turn an LP plan into setpoints a charger can follow (0 or >= its minimum).

OCPP chargers cannot run below a minimum current (typically 6 A per phase); the LP does not
know this and often leaves a car a sliver of power in its marginal slot. The repair moves each
such sliver, car by car, into slots where the car charges anyway (cheapest first), else raises
an idle slot to the minimum (cheapest first, possibly delivering a little more than planned if
the battery has room), and checks every constraint before it keeps a move: head-room, export
limit, battery capacity and SoC floor at every slot, and the car's energy at departure not below
the LP's. Forced slots (force-charge, pins) are the operator's and stay as they are. A sliver
that cannot be placed anywhere is dropped (charge) or kept and counted (discharge); the schedule
reports the repair's cost against the LP bound, which no min-rate schedule can beat.
"""

from __future__ import annotations

import numpy as np

from controller.optimiser.prepare import Prepared
from controller.planning.problem import BoolArray, FloatArray

_TOL = 1e-7


def repair_min_rate(
    prepared: Prepared, charge_kw: FloatArray, discharge_kw: FloatArray
) -> tuple[FloatArray, FloatArray, dict[str, float]]:
    """(charge, discharge, figures) with every unforced setpoint 0 or >= the charger's minimum."""
    problem = prepared.problem
    charge = charge_kw.copy()
    discharge = discharge_kw.copy()
    minimum = problem.min_kw
    forced = prepared.lower_kw > 0.0
    small_charge = (charge > _TOL) & (charge < minimum[:, None] - _TOL) & ~forced
    small_discharge = (discharge > _TOL) & (discharge < minimum[:, None] - _TOL)
    cars = np.nonzero(small_charge.any(axis=1) | small_discharge.any(axis=1))[0]
    net = charge.sum(axis=0) - discharge.sum(axis=0)
    moves = 0
    dropped_kwh = 0.0
    # Discharge slivers first (they decide how much room the site has), then charge slivers.
    for discharge_only in (True, False):
        for i in cars:
            car = _CarRepair(prepared, int(i), charge[i].copy(), discharge[i].copy(), net)
            if car.run(discharge_only=discharge_only):
                moves += car.moves
                dropped_kwh += car.dropped_kwh
                net += (car.charge - charge[i]) - (car.discharge - discharge[i])
                charge[i], discharge[i] = car.charge, car.discharge
    left_charge = (charge > _TOL) & (charge < minimum[:, None] - _TOL) & ~forced
    left_discharge = (discharge > _TOL) & (discharge < minimum[:, None] - _TOL)
    return (
        charge,
        discharge,
        {
            "repair_cars": float(len(cars)),
            "repair_moves": float(moves),
            "repair_dropped_kwh": dropped_kwh,
            "min_rate_violations": float(left_charge.sum() + left_discharge.sum()),
        },
    )


class _CarRepair:
    """The repair of one car's row against the rest of the fleet's net site power."""

    def __init__(
        self,
        prepared: Prepared,
        i: int,
        charge: FloatArray,
        discharge: FloatArray,
        net: FloatArray,
    ) -> None:
        problem = prepared.problem
        self.p = prepared
        self.i = i
        self.charge = charge
        self.discharge = discharge
        self.others = net - (charge - discharge)  # net site power without this car
        self.dt = problem.dt_h
        self.minimum = float(problem.min_kw[i])
        self.upper = prepared.upper_kw[i]
        self.discharge_upper = prepared.discharge_upper_kw[i]
        self.unit = float(prepared.unit_kw[i])
        self.discharge_unit = float(prepared.discharge_unit_kw[i])
        self.lower = prepared.lower_kw[i]
        self.headroom = prepared.headroom_kw
        self.export_kw = problem.export_limit_kw if prepared.any_v2g else 0.0
        self.eta = float(problem.eta_ch[i])
        self.eta_dis = float(problem.eta_dis[i])
        self.capacity = float(problem.capacity_kwh[i])
        self.floor = float(prepared.floor_kwh[i])
        self.v2g = bool(prepared.v2g[i])
        self.departure = int(problem.departure_slot[i])
        self.start_kwh = float(problem.energy_kwh[i])
        # V2G never leaves a car with less than min(arrival, target): the repair keeps that.
        self.least_at_departure = min(self.start_kwh, float(problem.target_kwh[i]))
        self.lp_charge = charge.copy()
        self.lp_discharge = discharge.copy()
        self.moves = 0
        self.dropped_kwh = 0.0

    def run(self, *, discharge_only: bool = False) -> bool:
        """Repair the row; False (row untouched) if no valid repair was found."""
        if discharge_only:
            self._discharge_slivers()
            return self.moves > 0
        if self._relocate() and self._valid():
            self._discharge_slivers()
            return True
        self.charge, self.discharge = self.lp_charge.copy(), self.lp_discharge.copy()
        self.moves = 0
        self.dropped_kwh = 0.0
        self._round_each()
        self._discharge_slivers()
        return self.moves > 0

    # -- strategies -------------------------------------------------------------------------

    def _relocate(self) -> bool:
        """Zero every charge sliver and put its energy where the car can run at >= minimum."""
        small = self._small(self.charge)
        if not small.any():
            return True
        net_if_zero = self._net() - np.where(small, self.charge, 0.0)
        if np.any(net_if_zero < -self.export_kw - _TOL):
            return False
        remaining = float((self.charge[small] * self.dt[small]).sum())  # grid kWh
        self.charge[small] = 0.0
        self.moves += int(small.sum())
        order = np.lexsort((np.arange(len(self.dt)), self.p.problem.price_eur_per_kwh))
        usable = self.upper >= self.minimum - _TOL
        for running_only in (True, False):
            for t in order:
                if remaining <= _TOL:
                    break
                if not usable[t] or self.lower[t] > 0.0:
                    continue
                running = self.charge[t] >= self.minimum - _TOL
                if running != running_only:
                    continue
                slack = self.headroom[t] - self._net()[t]
                room_kw = min(self.upper[t] - self.charge[t], slack)
                wanted_kw = remaining / self.dt[t]
                if running:
                    add = min(wanted_kw, room_kw)
                else:
                    if room_kw < self.minimum - _TOL:
                        continue
                    add = min(max(wanted_kw, self.minimum), room_kw)
                if add <= _TOL:
                    continue
                before = self.charge[t]
                self.charge[t] = before + add
                if self._slot_ok(t) and self._battery_ok():
                    remaining -= add * self.dt[t]
                    self.moves += 1
                else:
                    self.charge[t] = before
        self.dropped_kwh += max(0.0, remaining)
        return True

    def _round_each(self) -> None:
        """Fallback: each charge sliver alone to the minimum if that fits, else to 0."""
        for t in np.nonzero(self._small(self.charge))[0]:
            before = self.charge[t]
            for value in (self.minimum, 0.0):
                if value > self.upper[t] + _TOL:
                    continue
                self.charge[t] = value
                if self._valid():
                    self.moves += 1
                    if value == 0.0:
                        self.dropped_kwh += before * self.dt[t]
                    break
            else:
                self.charge[t] = before

    def _discharge_slivers(self) -> None:
        """Each discharge sliver to 0 (keeps the energy) if that fits, else to the minimum."""
        small = (self.discharge > _TOL) & (self.discharge < self.minimum - _TOL)
        for t in np.nonzero(small)[0]:
            before = self.discharge[t]
            for value in (0.0, self.minimum):
                self.discharge[t] = value
                if self._valid():
                    self.moves += 1
                    break
            else:
                self.discharge[t] = before

    # -- checks -----------------------------------------------------------------------------

    def _small(self, row: FloatArray) -> BoolArray:
        result: BoolArray = (row > _TOL) & (row < self.minimum - _TOL) & (self.lower <= 0.0)
        return result

    def _net(self) -> FloatArray:
        result: FloatArray = self.others + self.charge - self.discharge
        return result

    def _energy(self, charge: FloatArray, discharge: FloatArray) -> FloatArray:
        delta = (self.eta * charge - discharge / self.eta_dis) * self.dt
        result: FloatArray = self.start_kwh + np.concatenate([[0.0], np.cumsum(delta)])
        return result

    def _battery_ok(self) -> bool:
        energy = self._energy(self.charge, self.discharge)
        if np.any(energy > max(self.capacity, self.start_kwh) + 1e-6):
            return False
        return not (self.v2g and np.any(energy < self.floor - 1e-6))

    def _slot_ok(self, t: int) -> bool:
        if self.charge[t] > self.upper[t] + _TOL:
            return False
        if self.discharge[t] > self.discharge_upper[t] + _TOL:
            return False
        share = self.charge[t] / self.unit + self.discharge[t] / self.discharge_unit
        return not self.v2g or bool(share <= 1.0 + _TOL)

    def _valid(self) -> bool:
        net = self._net()
        if np.any(net > self.headroom + 1e-6) or np.any(net < -self.export_kw - 1e-6):
            return False
        if not all(self._slot_ok(t) for t in range(len(self.dt))):
            return False
        if not self._battery_ok():
            return False
        at_departure = self._energy(self.charge, self.discharge)[self.departure]
        return not self.v2g or bool(at_departure >= self.least_at_departure - 1e-6)
