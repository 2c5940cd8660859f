"""The fast path's LP: compact sparse arrays for HiGHS, built with numpy index arithmetic.

Columns (energies in kWh at the grid side of the charger unless said otherwise):

- `x[i,t]` charge energy of car i in slot t, for every slot before its departure;
- `v[i,t]` discharge energy (V2G cars only);
- `e[i,t]` battery content at the end of slot t (V2G cars only, up to departure);
- `y[t]`, `w[t]` the fleet's charge and discharge energy in slot t;
- `g[t]` the chargers' net site power in slot t (kW), bounded by [-export limit, h_t];
- `K` the peak of `g` (kW, >= 0); `u[i]` car i's relative shortfall (0..1); `z` the largest one;
- `r[t]` the ramp |g[t] - g[t-1]| (kW).

A car that cannot discharge never loses energy, so its content is highest at departure: one row,
`sum_t eta_i x[i,t] + a_i u_i` in [goal_i, room_i], stands for all its energy constraints. Only
V2G cars need the per-slot balance `e[i,t] = e[i,t-1] + eta x[i,t] - v[i,t] / eta_dis` with
`e` between the SoC floor and the capacity. Costs sit on the T aggregate columns `y`, `w` and
`K`, so a price change touches T coefficients, not N x T, and the money row stays short.

The model is split in two: the *layout* (which columns and rows exist, and the coefficients that
only depend on the cars' identity, departure and efficiencies) and the *values* (bounds, prices,
head-room, shortfall scales, slot lengths). A new problem with the same layout updates the values
of the loaded HiGHS model in place and re-solves from the last basis.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from controller.optimiser.prepare import TINY, Prepared
from controller.planning.problem import FloatArray, IntArray

INF = float("inf")

# Key kinds for matching columns and rows of one model to the next (warm start).
_KINDS = {
    name: code
    for code, name in enumerate(
        (
            "x",
            "v",
            "e",
            "y",
            "w",
            "g",
            "K",
            "u",
            "z",
            "r",
            "car",
            "bal",
            "tgt",
            "tri",
            "ydef",
            "wdef",
            "gdef",
            "peak",
            "fair",
            "ramp_up",
            "ramp_down",
            "cost",
            "short",
        )
    )
}


def _keys(kind: str, vehicle: IntArray | int, slot: IntArray | int, count: int) -> IntArray:
    """int64 identities (kind, vehicle code, absolute slot) for `count` columns or rows."""
    vehicle_part = np.broadcast_to(np.asarray(vehicle, dtype=np.int64), (count,))
    slot_part = np.broadcast_to(np.asarray(slot, dtype=np.int64), (count,))
    keys: IntArray = (
        (np.int64(_KINDS[kind]) << np.int64(58))
        | (vehicle_part << np.int64(24))
        | (slot_part & np.int64(0xFFFFFF))
    )
    return keys


def layout_key(prepared: Prepared, first_slot: int) -> str:
    """What decides the layout: cars, departures, V2G flags, efficiencies, horizon and its start."""
    p = prepared.problem
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\x1f".join(p.vehicle_ids).encode())
    for array in (p.departure_slot, prepared.v2g, p.eta_ch, p.eta_dis):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(f"{p.n_slots}:{first_slot}".encode())
    return digest.hexdigest()


@dataclass(slots=True)
class _Blocks:
    """Collects column and row blocks and the fixed (row, col, value) triplets."""

    n_cols: int = 0
    n_rows: int = 0
    col_keys: list[IntArray] = field(default_factory=list)
    row_keys: list[IntArray] = field(default_factory=list)
    rows: list[IntArray] = field(default_factory=list)
    cols: list[IntArray] = field(default_factory=list)
    vals: list[FloatArray] = field(default_factory=list)

    def cols_of(self, keys: IntArray) -> int:
        """Add a block of columns; returns the index of its first column."""
        start = self.n_cols
        self.col_keys.append(keys)
        self.n_cols += len(keys)
        return start

    def rows_of(self, keys: IntArray) -> int:
        """Add a block of rows; returns the index of its first row."""
        start = self.n_rows
        self.row_keys.append(keys)
        self.n_rows += len(keys)
        return start

    def entries(self, rows: IntArray, cols: IntArray | int, vals: FloatArray | float) -> None:
        """Add matrix entries (broadcast: one column or one value for all rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        self.rows.append(rows)
        self.cols.append(np.broadcast_to(np.asarray(cols, dtype=np.int64), rows.shape))
        self.vals.append(np.broadcast_to(np.asarray(vals, dtype=float), rows.shape))


@dataclass(slots=True)
class Layout:
    """Which columns and rows exist, where each block starts, and the fixed matrix entries."""

    key: str
    n: int
    t_count: int
    n_cols: int
    n_rows: int
    col_keys: IntArray
    row_keys: IntArray
    fixed_rows: IntArray  # fixed coefficients (row, col, value)
    fixed_cols: IntArray
    fixed_vals: FloatArray
    var_rows: IntArray  # coefficients that follow the values (row, col); see `Values.coeffs`
    var_cols: IntArray
    x_car: IntArray  # (nx,) car and slot of each x column; x columns start at 0
    x_slot: IntArray
    v0: int
    v_car: IntArray  # (nv,) car and slot of each v column (and e column, balance row, ...)
    v_slot: IntArray
    x_of_v: IntArray  # (nv,) the x column of the same car and slot
    e0: int
    y0: int
    w0: int  # -1 without V2G
    g0: int
    k_col: int
    u0: int
    z_col: int
    r0: int
    plain_cars: IntArray  # cars with a total-energy row (no V2G, departure > 0)
    v2g_cars: IntArray  # cars with a target row (V2G, departure > 0)
    car_row: IntArray  # (N,) the car's energy row (total, or V2G target), -1 if none
    bal0: int  # V2G balance rows, in v-column order
    tri0: int  # V2G time-sharing rows, in v-column order
    ydef0: int
    wdef0: int
    gdef0: int
    peak0: int
    fair0: int
    fair_car: IntArray  # car of each fairness row
    ramp0: int  # T-1 "r >= g[t] - g[t-1]" rows, then T-1 "r >= g[t-1] - g[t]" rows
    cost_row: int
    short_row: int

    @property
    def nx(self) -> int:
        """Number of charge columns."""
        return len(self.x_car)

    @property
    def nv(self) -> int:
        """Number of discharge columns."""
        return len(self.v_car)

    @property
    def any_v2g(self) -> bool:
        """Whether the model has discharge columns."""
        return self.w0 >= 0


@dataclass(slots=True)
class Values:
    """The numbers of one problem on a layout."""

    col_lower: FloatArray
    col_upper: FloatArray
    row_lower: FloatArray
    row_upper: FloatArray
    coeffs: FloatArray  # values of the layout's variable coefficients (0: no entry)
    cost_vector: FloatArray  # objective of the money stage
    short_vector: FloatArray  # objective of the shortfall stage


def build_layout(prepared: Prepared, vehicle_codes: IntArray, first_slot: int) -> Layout:
    """The layout of `prepared`'s LP; codes and first slot name columns for warm starts."""
    p = prepared.problem
    n, t_count = p.n_vehicles, p.n_slots
    abs_slot = first_slot + np.arange(t_count, dtype=np.int64)
    b = _Blocks()

    x_car, x_slot = (a.astype(np.int64) for a in np.nonzero(prepared.available))
    nx = len(x_car)
    b.cols_of(_keys("x", vehicle_codes[x_car], abs_slot[x_slot], nx))
    v_car, v_slot = (
        a.astype(np.int64) for a in np.nonzero(prepared.available & prepared.v2g[:, None])
    )
    nv = len(v_car)
    v0 = b.cols_of(_keys("v", vehicle_codes[v_car], abs_slot[v_slot], nv))
    e0 = b.cols_of(_keys("e", vehicle_codes[v_car], abs_slot[v_slot], nv))
    any_v2g = nv > 0
    y0 = b.cols_of(_keys("y", 0, abs_slot, t_count))
    w0 = b.cols_of(_keys("w", 0, abs_slot, t_count)) if any_v2g else -1
    g0 = b.cols_of(_keys("g", 0, abs_slot, t_count))
    k_col = b.cols_of(_keys("K", 0, 0, 1))
    u0 = b.cols_of(_keys("u", vehicle_codes, 0, n))
    z_col = b.cols_of(_keys("z", 0, 0, 1))
    r0 = b.cols_of(_keys("r", 0, abs_slot[1:], t_count - 1))
    x_cols = np.arange(nx, dtype=np.int64)
    v_cols = v0 + np.arange(nv, dtype=np.int64)
    e_cols = e0 + np.arange(nv, dtype=np.int64)
    u_cols = u0 + np.arange(n, dtype=np.int64)
    slot_idx = np.arange(t_count, dtype=np.int64)
    var_rows: list[IntArray] = []
    var_cols: list[IntArray] = []

    departs = p.departure_slot
    plain_cars = np.nonzero(~prepared.v2g & (departs > 0))[0].astype(np.int64)
    v2g_cars = np.nonzero(prepared.v2g & (departs > 0))[0].astype(np.int64)
    car_row = np.full(n, -1, dtype=np.int64)
    start = b.rows_of(_keys("car", vehicle_codes[plain_cars], 0, len(plain_cars)))
    car_row[plain_cars] = start + np.arange(len(plain_cars))
    start = b.rows_of(_keys("tgt", vehicle_codes[v2g_cars], 0, len(v2g_cars)))
    car_row[v2g_cars] = start + np.arange(len(v2g_cars))
    plain_x = ~prepared.v2g[x_car]
    b.entries(car_row[x_car[plain_x]], x_cols[plain_x], p.eta_ch[x_car[plain_x]])
    last = v_slot == departs[v_car] - 1
    b.entries(car_row[v_car[last]], e_cols[last], 1.0)
    rowed = np.nonzero(car_row >= 0)[0]
    var_rows.append(car_row[rowed])
    var_cols.append(u_cols[rowed])

    # V2G balance: e[t] - e[t-1] - eta x[t] + v[t] / eta_dis = (content now if t == 0 else 0).
    bal0 = b.rows_of(_keys("bal", vehicle_codes[v_car], abs_slot[v_slot], nv))
    bal_rows = bal0 + np.arange(nv, dtype=np.int64)
    x_of_v = _x_index(prepared.available, v_car, v_slot)
    b.entries(bal_rows, e_cols, 1.0)
    later = v_slot > 0
    b.entries(bal_rows[later], e_cols[later] - 1, -1.0)
    b.entries(bal_rows, x_of_v, -p.eta_ch[v_car])
    b.entries(bal_rows, v_cols, 1.0 / p.eta_dis[v_car])
    # Time sharing inside a slot: charge and discharge shares of the slot add up to at most 1.
    tri0 = b.rows_of(_keys("tri", vehicle_codes[v_car], abs_slot[v_slot], nv))
    tri_rows = tri0 + np.arange(nv, dtype=np.int64)
    var_rows += [tri_rows, tri_rows]
    var_cols += [x_of_v, v_cols]

    ydef0 = b.rows_of(_keys("ydef", 0, abs_slot, t_count))
    b.entries(ydef0 + x_slot, x_cols, 1.0)
    b.entries(ydef0 + slot_idx, y0 + slot_idx, -1.0)
    wdef0 = -1
    if any_v2g:
        wdef0 = b.rows_of(_keys("wdef", 0, abs_slot, t_count))
        b.entries(wdef0 + v_slot, v_cols, 1.0)
        b.entries(wdef0 + slot_idx, w0 + slot_idx, -1.0)
    gdef0 = b.rows_of(_keys("gdef", 0, abs_slot, t_count))
    b.entries(gdef0 + slot_idx, y0 + slot_idx, 1.0)
    if any_v2g:
        b.entries(gdef0 + slot_idx, w0 + slot_idx, -1.0)
    var_rows.append(gdef0 + slot_idx)
    var_cols.append(g0 + slot_idx)
    peak0 = b.rows_of(_keys("peak", 0, abs_slot, t_count))
    b.entries(peak0 + slot_idx, g0 + slot_idx, 1.0)
    b.entries(peak0 + slot_idx, k_col, -1.0)
    fair_car = rowed
    fair0 = b.rows_of(_keys("fair", vehicle_codes[fair_car], 0, len(fair_car)))
    fair_rows = fair0 + np.arange(len(fair_car), dtype=np.int64)
    b.entries(fair_rows, u_cols[fair_car], 1.0)
    b.entries(fair_rows, z_col, -1.0)
    ramp0 = b.rows_of(_keys("ramp_up", 0, abs_slot[1:], t_count - 1))
    b.rows_of(_keys("ramp_down", 0, abs_slot[1:], t_count - 1))
    later_slots = slot_idx[1:]
    up_rows = ramp0 + later_slots - 1
    down_rows = up_rows + (t_count - 1)
    for rows, sign in ((up_rows, 1.0), (down_rows, -1.0)):
        b.entries(rows, r0 + later_slots - 1, 1.0)
        b.entries(rows, g0 + later_slots, -sign)
        b.entries(rows, g0 + later_slots - 1, sign)

    cost_row = b.rows_of(_keys("cost", 0, 0, 1))
    money_cols = [y0 + slot_idx] + ([w0 + slot_idx] if any_v2g else []) + [np.array([k_col])]
    for cols in money_cols:
        var_rows.append(np.full(len(cols), cost_row, dtype=np.int64))
        var_cols.append(cols.astype(np.int64))
    short_row = b.rows_of(_keys("short", 0, 0, 1))
    var_rows.append(np.full(len(rowed), short_row, dtype=np.int64))
    var_cols.append(u_cols[rowed])

    return Layout(
        key=layout_key(prepared, first_slot),
        n=n,
        t_count=t_count,
        n_cols=b.n_cols,
        n_rows=b.n_rows,
        col_keys=np.concatenate(b.col_keys),
        row_keys=np.concatenate(b.row_keys),
        fixed_rows=np.concatenate(b.rows),
        fixed_cols=np.concatenate(b.cols),
        fixed_vals=np.concatenate(b.vals),
        var_rows=np.concatenate(var_rows),
        var_cols=np.concatenate(var_cols),
        x_car=x_car,
        x_slot=x_slot,
        v0=v0,
        v_car=v_car,
        v_slot=v_slot,
        x_of_v=x_of_v,
        e0=e0,
        y0=y0,
        w0=w0,
        g0=g0,
        k_col=k_col,
        u0=u0,
        z_col=z_col,
        r0=r0,
        plain_cars=plain_cars,
        v2g_cars=v2g_cars,
        car_row=car_row,
        bal0=bal0,
        tri0=tri0,
        ydef0=ydef0,
        wdef0=wdef0,
        gdef0=gdef0,
        peak0=peak0,
        fair0=fair0,
        fair_car=fair_car,
        ramp0=ramp0,
        cost_row=cost_row,
        short_row=short_row,
    )


def build_values(layout: Layout, prepared: Prepared) -> Values:
    """Bounds, objective vectors and variable coefficients of `prepared` on `layout`.

    Shortfall columns `u` are fixed at 0 here (every target hard); the solve frees them when
    that turns out infeasible.
    """
    p = prepared.problem
    dt = p.dt_h
    t_count = layout.t_count
    x_car, x_slot, v_car, v_slot = layout.x_car, layout.x_slot, layout.v_car, layout.v_slot
    col_lower = np.zeros(layout.n_cols)
    col_upper = np.full(layout.n_cols, INF)
    nx, nv = layout.nx, layout.nv
    col_lower[:nx] = prepared.lower_kw[x_car, x_slot] * dt[x_slot]
    col_upper[:nx] = prepared.upper_kw[x_car, x_slot] * dt[x_slot]
    col_upper[layout.v0 : layout.v0 + nv] = prepared.discharge_upper_kw[v_car, v_slot] * dt[v_slot]
    col_lower[layout.e0 : layout.e0 + nv] = prepared.floor_kwh[v_car]
    col_upper[layout.e0 : layout.e0 + nv] = p.capacity_kwh[v_car]
    g = slice(layout.g0, layout.g0 + t_count)
    col_lower[g] = -p.export_limit_kw if layout.any_v2g else 0.0
    col_upper[g] = prepared.headroom_kw
    col_upper[layout.u0 : layout.u0 + layout.n] = 0.0
    col_upper[layout.z_col] = 1.0

    row_lower = np.zeros(layout.n_rows)
    row_upper = np.zeros(layout.n_rows)
    plain, v2g = layout.plain_cars, layout.v2g_cars
    row_lower[layout.car_row[plain]] = prepared.goal_kwh[plain]
    row_upper[layout.car_row[plain]] = prepared.room_kwh[plain]
    row_lower[layout.car_row[v2g]] = p.energy_kwh[v2g] + prepared.goal_kwh[v2g]
    row_upper[layout.car_row[v2g]] = INF
    bal = slice(layout.bal0, layout.bal0 + nv)
    row_lower[bal] = np.where(v_slot == 0, p.energy_kwh[v_car], 0.0)
    row_upper[bal] = row_lower[bal]
    tri = slice(layout.tri0, layout.tri0 + nv)
    row_lower[tri] = -INF
    row_upper[tri] = dt[v_slot]
    peak = slice(layout.peak0, layout.peak0 + t_count)
    row_lower[peak] = -INF
    fair = slice(layout.fair0, layout.fair0 + len(layout.fair_car))
    row_lower[fair] = -INF
    ramps = slice(layout.ramp0, layout.ramp0 + 2 * (t_count - 1))
    row_upper[ramps] = INF
    for row in (layout.cost_row, layout.short_row):
        row_lower[row], row_upper[row] = -INF, INF

    scale = prepared.scale_kwh
    rowed = np.nonzero(layout.car_row >= 0)[0]
    u_coeff = np.where(scale[rowed] > 0.0, scale[rowed], 1.0)  # u is fixed at 0 where scale is 0
    tri_x = 1.0 / prepared.unit_kw[v_car]
    tri_v = 1.0 / prepared.discharge_unit_kw[v_car]
    money = [p.price_eur_per_kwh]
    if layout.any_v2g:
        money.append(p.degradation_eur_per_kwh - p.export_price_eur_per_kwh)
    money.append(np.array([p.demand_charge_eur_per_kw]))
    coeffs = np.concatenate([u_coeff, tri_x, tri_v, -dt, *money, u_coeff])

    cost_vector = np.zeros(layout.n_cols)
    cost_vector[layout.y0 : layout.y0 + t_count] = p.price_eur_per_kwh
    if layout.any_v2g:
        cost_vector[layout.w0 : layout.w0 + t_count] = money[1]
    cost_vector[layout.k_col] = p.demand_charge_eur_per_kw
    short_vector = np.zeros(layout.n_cols)
    short_vector[layout.u0 + rowed] = np.where(scale[rowed] > 0.0, scale[rowed], 0.0)
    return Values(
        col_lower=col_lower,
        col_upper=col_upper,
        row_lower=row_lower,
        row_upper=row_upper,
        coeffs=coeffs,
        cost_vector=cost_vector,
        short_vector=short_vector,
    )


def _x_index(available: np.ndarray, cars: IntArray, slots: IntArray) -> IntArray:
    """Column index of x[cars, slots] (x columns are the row-major `available` cells)."""
    position = np.cumsum(available.ravel()) - 1
    index: IntArray = position[cars * available.shape[1] + slots].astype(np.int64)
    return index


def shortfall_scaled(layout: Layout, prepared: Prepared) -> IntArray:
    """Columns of the `u` that may move when targets turn soft (cars with a reachable need)."""
    rowed = np.nonzero(layout.car_row >= 0)[0]
    cars = rowed[prepared.scale_kwh[rowed] > TINY]
    result: IntArray = layout.u0 + cars
    return result
