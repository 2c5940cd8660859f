"""Profiles as the dispatcher builds them: units, the minimum rate, lease shape, V2G, deadband."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from adapters.ocpp.config import LeaseConfig
from adapters.ocpp.profiles import (
    apply_guard,
    differs,
    safe_share_kw,
    safe_share_per_connector_kw,
    to_limit,
    tx_profile,
)
from controller.domain import ChargePoint
from tests.conftest import T0
from tests.ocpp.conftest import charger, fleet, plan_for

W3 = charger("W3", rate_unit="W", phases=3)
A3 = charger("A3", rate_unit="A", phases=3)
A1 = charger("A1", rate_unit="A", phases=1)


@pytest.mark.parametrize(
    ("kw", "cp", "expected"),
    [
        (11.0, W3, 11000.0),
        (7.36, W3, 7360.0),  # 7.36 * 1000 is 7359.999...: still 7360.0
        (11.0, A3, 15.9),  # 11,000 W / (230 V * 3) = 15.94 A, towards zero
        (3.0, A1, 13.0),  # 3,000 W / 230 V = 13.04 A
        (4.14, W3, 4140.0),  # exactly 6 A on 3 phases: allowed
        (4.13, W3, 0.0),  # just under 6 A on 3 phases: nothing
        (1.38, A1, 6.0),  # exactly 6 A on one phase
        (1.3, A1, 0.0),  # 5.65 A: nothing
        (3.0, A3, 0.0),  # 4.35 A: nothing
        (0.0, W3, 0.0),
        (-7.0, W3, -7000.0),  # discharge keeps its sign
        (-2.0, W3, 0.0),  # the minimum rate holds for discharge too
        (-11.0, A3, -15.9),
    ],
)
def test_limits_in_w_or_a_with_the_minimum_rate(
    kw: float, cp: ChargePoint, expected: float
) -> None:
    """A = W / (V * phases), towards zero to 0.1; below the minimum current, 0."""
    assert to_limit(kw, cp) == expected


def test_the_safe_share_is_proportional_to_circuit_limits_and_split_per_connector() -> None:
    """Site safe limit 30 kW over chargers of 22 kW and 11 kW (2 connectors): 20 and 10 kW,
    the second 5 kW per connector."""
    state = fleet(
        [charger("big", max_power_kw=22.0), charger("two", max_power_kw=11.0, connectors=2)],
        safe_limit_kw=30.0,
    )
    assert safe_share_kw(state, "big") == pytest.approx(20.0)
    assert safe_share_kw(state, "two") == pytest.approx(10.0)
    assert safe_share_per_connector_kw(state, "two") == pytest.approx(5.0)
    assert safe_share_kw(state, "nobody") == 0.0


CFG = LeaseConfig()


def test_a_tx_lease_carries_the_plan_then_falls_back_to_min_plan_and_safe_share() -> None:
    """Made 5 min into a slot: plan 7 then 11 kW inside the 15-min lease; after it
    min(plan, 8 kW safe share), and 3 kW after that is under the minimum rate: 0."""
    now = T0 + timedelta(minutes=5)
    plan = plan_for(now, {("W3", 1): [7.0, 11.0, 3.0, 9.0]})
    lease = tx_profile(W3, 1, 42, plan.setpoints[0], plan, 8.0, now, CFG)
    assert lease.offsets_s == (0, 600, 900, 1500, 2400)
    assert lease.limits == (7000.0, 11000.0, 8000.0, 0.0, 8000.0)
    assert lease.lease_end == now + timedelta(minutes=15)
    wire = lease.to_ocpp()
    assert wire["transactionId"] == 42
    assert wire["chargingProfilePurpose"] == "TxProfile"
    assert wire["chargingSchedule"]["startSchedule"] == "2024-03-04T16:05:00Z"
    assert wire["chargingSchedule"]["chargingSchedulePeriod"][1] == {
        "startPeriod": 600,
        "limit": 11000.0,
        "numberPhases": 3,
    }


def test_a_plan_made_a_fraction_of_a_second_after_the_lease_start_gives_whole_periods() -> None:
    """A plan made at 16:00:00.2 (the coalescing window) and sent at 16:00:00.5: periods are
    whole seconds, so the plan's first value takes period 0 and offsets still increase."""
    plan = plan_for(T0 + timedelta(milliseconds=200), {("W3", 1): [7.0, 11.0]})
    lease = tx_profile(
        W3, 1, 7, plan.setpoints[0], plan, 8.0, T0 + timedelta(milliseconds=500), CFG
    )
    assert lease.offsets_s[0] == 0
    assert list(lease.offsets_s) == sorted(set(lease.offsets_s))
    assert lease.limits[0] == 7000.0


def test_without_a_setpoint_the_lease_is_the_safe_share() -> None:
    """A running transaction the plan does not mention gets the safe share, flat."""
    lease = tx_profile(A3, 1, 1, None, None, 11.0, T0, CFG)
    assert (lease.offsets_s, lease.limits) == ((0,), (15.9,))


def test_a_lease_never_holds_more_periods_than_allowed_and_ends_on_a_fallback() -> None:
    """Truncated to max_periods; the last period (which holds for ever) is <= safe share."""
    setpoint = [float(x % 2) * 11.0 + 5.0 for x in range(40)]
    plan = plan_for(T0, {("W3", 1): setpoint}, slots=40)
    lease = tx_profile(W3, 1, 1, plan.setpoints[0], plan, 6.0, T0, replace(CFG, max_periods=4))
    assert len(lease.limits) == 4
    assert lease.limits[-1] <= 6000.0


@pytest.mark.parametrize(
    ("mode", "limits", "discharge"),
    [
        ("none", (0.0, 8000.0), None),
        ("negative_limit", (-5000.0, 8000.0), None),
        ("data_transfer", (0.0, 8000.0), (5000.0, 0.0)),
    ],
)
def test_a_discharge_setpoint_per_v2g_mode_and_never_after_the_lease(
    mode: str, limits: tuple[float, ...], discharge: tuple[float, ...] | None
) -> None:
    """-5 kW in the lease: 0 (none), -5 kW (negative limit), or 0 + a 5 kW discharge lease
    (DataTransfer); after the lease min(plan, safe) >= 0 and no discharge."""
    cp = replace(W3, v2g_mode=mode)  # type: ignore[arg-type]
    plan = plan_for(T0, {("W3", 1): [-5.0, 9.0]})
    lease = tx_profile(cp, 1, 1, plan.setpoints[0], plan, 8.0, T0, CFG)
    assert lease.limits == limits
    assert lease.discharge == discharge
    if discharge is not None:
        data = lease.discharge_data()
        assert data is not None
        assert '"chargingSchedulePeriod":[{"startPeriod":0,"limit":5000.0}' in data


def test_the_deadband_ignores_small_moves_but_not_on_off_switches_or_lease_renewal() -> None:
    """0.3 kW change: not sent; 0.8 kW: sent; on -> off: sent; a later lease alone: not sent."""
    plan = plan_for(T0, {("W3", 1): [7.0]})
    old = tx_profile(W3, 1, 1, plan.setpoints[0], plan, 22.0, T0, CFG)

    def at(kw: float, when: float = 0.0) -> bool:
        """Whether a lease for `kw`, built `when` minutes later, is worth sending."""
        other = plan_for(T0, {("W3", 1): [kw]})
        new = tx_profile(
            W3, 1, 1, other.setpoints[0], other, 22.0, T0 + timedelta(minutes=when), CFG
        )
        return differs(old, new, T0 + timedelta(minutes=when), 500.0)

    assert at(7.3) is False
    assert at(7.8) is True
    assert at(0.0) is True
    assert at(7.0, when=3) is False
    assert differs(old, replace(old, transaction_id=2), T0, 500.0) is True


def test_the_guard_time_holds_a_switch_on_back_but_never_a_reduction() -> None:
    """Switched off 2 min ago, guard 5 min: a lease 7 kW now, 0 from 10 min, 9 kW from 12 min
    gets 0 for the first 3 min, then 7 kW; the 0 at 10 min stays (a reduction); the switch on
    at 12 min waits until 15 min. Without a recent switch off nothing is held at the start."""
    now = T0
    plan = plan_for(now, {("W3", 1): [7.0]})
    lease = tx_profile(W3, 1, 1, plan.setpoints[0], plan, 22.0, now, CFG)
    lease = replace(lease, offsets_s=(0, 600, 720), limits=(7000.0, 0.0, 9000.0))
    held = apply_guard(lease, now - timedelta(minutes=2), 300.0, 24)
    assert (held.offsets_s, held.limits) == ((0, 180, 600, 900), (0.0, 7000.0, 0.0, 9000.0))
    free = apply_guard(lease, None, 300.0, 24)
    assert (free.offsets_s, free.limits) == ((0, 600, 900), (7000.0, 0.0, 9000.0))
    assert apply_guard(lease, now - timedelta(minutes=2), 0.0, 24) == lease
    cut = apply_guard(lease, now - timedelta(minutes=2), 300.0, 3)
    assert len(cut.limits) == 3
    assert cut.limits[-1] <= lease.limits[-1]  # what holds for ever is never more than before
