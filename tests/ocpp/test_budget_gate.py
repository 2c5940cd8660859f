"""Increases gated by the site budget, not by every decrease (RELIABILITY.md P-04, A7
"in-flight reserve").

At every moment the limits the chargers may apply (for a profile in flight the larger of its
old and new limit) must sum to at most the plan's head-room; within that, an increase goes as
soon as it fits, not when the last decrease of the plan is acknowledged. Real central system,
real WebSockets, simulated chargers answering on a `SimClock`.
"""

from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from adapters.ocpp.config import OcppConfig
from controller.clock import SimClock
from simulators.chargepoints.chargepoint import ChargerSpec, SimChargePoint
from simulators.chargepoints.profiles import parse_profile
from tests.ocpp.conftest import RECV_TIMEOUT_S, Harness, charger, connected
from tests.ocpp.test_dispatcher import Rig, a_car, brought_up, rig

# A charger that answers late on the simulated clock must not time out on the wall clock.
PATIENT = OcppConfig(bcrypt_rounds=4, call_timeout_s=120.0)


class Watched(SimChargePoint):
    """A simulated charger that tells `on_arrival` of every SetChargingProfile as it arrives,
    and keeps the one it has not answered yet (`pending`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: tuple[int, dict[str, Any]] | None = None
        self.on_arrival: Callable[[Watched], None] | None = None

    def profile_arrived(self, connector_id: int, raw: dict[str, Any]) -> None:
        """Remember it and let the test check the fleet."""
        self.pending = (connector_id, raw)
        if self.on_arrival is not None:
            self.on_arrival(self)

    def set_profile(self, connector_id: int, raw: dict[str, Any]) -> str:
        """Install it; it is no longer pending."""
        status = super().set_profile(connector_id, raw)
        self.pending = None
        return status

    def may_apply_kw(self) -> float:
        """What connector 1 may draw now by what the charger holds, and for a pending profile
        the larger of that with and without it (the simulator's own profile rules)."""
        now = self.clock.now()
        connector = self.connector(1)
        held = self.limit_kw(connector, now)
        if self.pending is None:
            return held
        trial = copy.copy(self.store)
        trial.profiles = list(self.store.profiles)
        connector_id, raw = self.pending
        trial.install(parse_profile(connector_id, raw), self.running())
        w = trial.connector_limit_w(
            1, now, transaction_id=connector.transaction_id, tx_start=connector.tx_start
        )
        with_it = self.spec.max_power_kw if w is None else min(w / 1000.0, self.spec.max_power_kw)
        return max(held, with_it)


@asynccontextmanager
async def watched(harness: Harness, spec: ChargerSpec) -> AsyncIterator[Watched]:
    """A `Watched` charger connected (and booted) to the harness's central system."""
    async with connected(harness, Watched(spec, harness.clock)) as sim:
        yield sim


def last_tx_w(sim: SimChargePoint) -> float | None:
    """The first period's limit of the last TxProfile the charger took (W)."""
    tx = [r for r in sim.received if r.purpose == "TxProfile"]
    if not tx:
        return None
    return float(tx[-1].profile["charging_schedule"]["charging_schedule_period"][0]["limit"])


async def arrived(*sims: Watched) -> None:
    """Until each charger's SetChargingProfile handler has the profile and waits on the
    simulated clock to answer: its reply is due `reply_delay_s` after *that*, so the clock must
    not move before (a frame received is not enough: the library validates it in a thread
    first). This waits for the socket and the thread, not for simulated time."""
    async with asyncio.timeout(RECV_TIMEOUT_S):
        while not all(s.pending is not None for s in sims):  # noqa: ASYNC110
            await asyncio.sleep(0.002)


async def charging(r: Rig, sims: list[Watched], plan: dict[Any, list[float]]) -> None:
    """Each charger brought up with a car, then `plan` (head-room for all of it) accepted."""
    for s in sims:
        await brought_up(r, s)
        await s.plug_in(1, a_car())
    await r.publish(plan, headroom_kw=sum(kw[0] for kw in plan.values()))
    for s in sims:
        wanted = plan[(s.spec.charger_id, 1)][0] * 1000.0

        def there(s: Watched = s, w: float = wanted) -> bool:
            return last_tx_w(s) == w

        await s.wait_for(there)
        await r.dispatcher.settled(s.spec.charger_id)


async def test_an_increase_that_fits_goes_while_another_chargers_decrease_is_in_flight(
    redis: Redis, clock: SimClock
) -> None:
    """A: 11 -> 4.5 kW, answered 30 simulated seconds later; B: 4.5 -> 11 kW; head-room 30 kW.
    Even with A's old 11 kW booked, B's 11 kW fits (22 <= 30): B is raised while A's answer is
    still pending (the rule before held it until A answered)."""
    async with (
        rig(redis, clock, charger("CP-A"), charger("CP-B"), config=PATIENT) as r,
        watched(r.harness, ChargerSpec(charger_id="CP-A", max_power_kw=22.0)) as a,
        watched(r.harness, ChargerSpec(charger_id="CP-B", max_power_kw=22.0)) as b,
    ):
        await charging(r, [a, b], {("CP-A", 1): [11.0], ("CP-B", 1): [4.5]})
        a.faults.reply_delay_s = 30.0
        await r.publish({("CP-A", 1): [4.5], ("CP-B", 1): [11.0]}, headroom_kw=30.0)
        await arrived(a)
        await b.wait_for(lambda: last_tx_w(b) == 11000.0)
        assert a.pending is not None  # A has not answered yet
        assert last_tx_w(a) == 11000.0
        assert r.dispatcher.counters["increases_fit_early"] >= 1
        now = clock.now()
        assert a.powers_kw(now)[1] + b.powers_kw(now)[1] == pytest.approx(22.0)
        await clock.advance(timedelta(seconds=30))
        await a.wait_for(lambda: last_tx_w(a) == 4500.0)


async def test_an_increase_that_does_not_fit_waits_until_enough_decreases_are_acknowledged(
    redis: Redis, clock: SimClock
) -> None:
    """Head-room 31 kW. Old: A 11, C 11, D 6, B 4.5 kW; new: A 4.5 (answered after 30 s),
    C 9 (after 60 s), D 5 (after 120 s), B 11. B's increase needs 6.5 kW: with A acknowledged
    the booked 26 kW leave 5; with C too, 24 kW leave 7, so B goes then, while D's decrease
    is still in flight. The site's installed limits stay within 31 kW throughout."""
    ids = ("CP-A", "CP-B", "CP-C", "CP-D")
    async with AsyncExitStack() as stack:
        r = await stack.enter_async_context(
            rig(redis, clock, *(charger(i) for i in ids), safe_limit_kw=88.0, config=PATIENT)
        )
        a, b, c, d = [
            await stack.enter_async_context(
                watched(r.harness, ChargerSpec(charger_id=i, max_power_kw=22.0))
            )
            for i in ids
        ]

        def installed_kw() -> float:
            now = clock.now()
            return sum(s.powers_kw(now)[1] for s in (a, b, c, d))

        old = {("CP-A", 1): [11.0], ("CP-B", 1): [4.5], ("CP-C", 1): [11.0], ("CP-D", 1): [6.0]}
        await charging(r, [a, b, c, d], old)
        before = len(b.received)
        a.faults.reply_delay_s, c.faults.reply_delay_s, d.faults.reply_delay_s = 30.0, 60.0, 120.0
        new = {("CP-A", 1): [4.5], ("CP-B", 1): [11.0], ("CP-C", 1): [9.0], ("CP-D", 1): [5.0]}
        await r.publish(new, headroom_kw=31.0)
        await arrived(a, c, d)
        await r.dispatcher.settled("CP-B")
        assert len(b.received) == before  # 32.5 kW booked: no room
        assert r.dispatcher.counters["increases_held"] >= 1

        await clock.advance(timedelta(seconds=30))  # A answers
        await r.dispatcher.wait_for(lambda: r.dispatcher.sent("CP-A")["tx:1"].limits[0] == 4500)
        await r.dispatcher.settled("CP-B")
        assert len(b.received) == before  # 26 + 6.5 > 31: still held
        assert installed_kw() <= 31.0 + 1e-6

        await clock.advance(timedelta(seconds=30))  # C answers
        await b.wait_for(lambda: last_tx_w(b) == 11000.0)
        assert d.pending is not None  # D's decrease is still in flight
        assert last_tx_w(d) == 6000.0
        assert installed_kw() == pytest.approx(4.5 + 11.0 + 9.0 + 6.0)
        await clock.advance(timedelta(seconds=60))
        await d.wait_for(lambda: last_tx_w(d) == 5000.0)
        assert installed_kw() == pytest.approx(29.5)
        assert r.dispatcher.counters["increases_over_budget"] == 0


async def test_a_decrease_that_is_not_answered_does_not_hold_the_increases_for_ever(
    redis: Redis, clock: SimClock
) -> None:
    """A: 11 -> 4.5 kW is never answered (its CALL times out); B: 4.5 -> 11 kW under a
    head-room of 15.5 kW. A stays booked at 11 kW (it may still apply it), so B's increase
    never fits; once A has nothing left to send (its retry waits on the back-off) nothing can
    make room, and B goes as under the rule before the budget, counted over budget."""
    quick = OcppConfig(bcrypt_rounds=4, call_timeout_s=0.5)
    async with (
        rig(redis, clock, charger("CP-A"), charger("CP-B"), config=quick) as r,
        watched(r.harness, ChargerSpec(charger_id="CP-A", max_power_kw=22.0)) as a,
        watched(r.harness, ChargerSpec(charger_id="CP-B", max_power_kw=22.0)) as b,
    ):
        await charging(r, [a, b], {("CP-A", 1): [11.0], ("CP-B", 1): [4.5]})
        a.faults.reply_delay_s = 3600.0  # on the simulated clock, which stands still
        await r.publish({("CP-A", 1): [4.5], ("CP-B", 1): [11.0]}, headroom_kw=15.5)
        await b.wait_for(lambda: last_tx_w(b) == 11000.0)
        assert r.dispatcher.counters["profiles_timed_out"] >= 1
        assert r.dispatcher.counters["increases_held"] >= 1
        assert r.dispatcher.counters["increases_over_budget"] == 1
        assert "tx:1" in r.dispatcher._links["CP-A"].unsure  # booked at max(11, 4.5)
        assert last_tx_w(a) == 11000.0


def random_limits(rng: random.Random, n: int) -> list[float]:
    """A limit per charger: 0 or 5-22 kW by 0.5 (never under the minimum rate, 4.14 kW)."""
    return [0.0 if rng.random() < 0.15 else rng.randrange(10, 45) / 2.0 for _ in range(n)]


@pytest.mark.parametrize("seed", [1, 2])
async def test_at_every_call_a_charger_receives_the_fleet_stays_within_the_head_room(
    redis: Redis, clock: SimClock, seed: int
) -> None:
    """16 chargers (every fourth in amperes), five rounds of random old -> new limits under a
    head-room of max(sum old, sum new) plus 0-3 kW slack, each charger answering after a
    random 0-20 simulated seconds. At every SetChargingProfile a charger receives, the sum
    over the fleet of what each may apply (held limit; max(old, new) with a profile pending)
    stays within the head-room; every round ends with every charger on its new limit, and
    some increases went before the last decrease was acknowledged."""
    rng = random.Random(seed)
    n = 16
    ids = [f"CP-{i:02d}" for i in range(n)]
    units = ["A" if i % 4 == 3 else "W" for i in range(n)]
    records = [charger(i, rate_unit=u) for i, u in zip(ids, units, strict=True)]
    headroom = [10_000.0]
    checked: list[float] = []
    violations: list[str] = []

    def check(_: Watched) -> None:
        try:
            total = sum(s.may_apply_kw() for s in sims)
        except Exception as exc:  # the check's own failure fails the test, not the CALL
            violations.append(repr(exc))
            return
        checked.append(headroom[0] - total)
        if total > headroom[0] + 1e-6:
            violations.append(f"{total:.2f} kW > head-room {headroom[0]:.2f} kW")

    async with AsyncExitStack() as stack:
        r = await stack.enter_async_context(
            rig(redis, clock, *records, safe_limit_kw=22.0 * n, config=PATIENT)
        )
        sims: list[Watched] = []
        for cid, unit in zip(ids, units, strict=True):
            spec = ChargerSpec(charger_id=cid, max_power_kw=22.0, rate_unit=unit)  # type: ignore[arg-type]
            sims.append(await stack.enter_async_context(watched(r.harness, spec)))
        for s in sims:
            await brought_up(r, s)
            await s.plug_in(1, a_car())
        links = r.dispatcher._links

        async def quiet() -> None:
            """Until every worker is idle or waits for its charger's answer, the charger's
            handler waiting on the clock (see `arrived`)."""
            async with asyncio.timeout(RECV_TIMEOUT_S):
                while not all(  # noqa: ASYNC110
                    links[s.spec.charger_id].idle.is_set() or s.pending is not None for s in sims
                ):
                    await asyncio.sleep(0.002)

        old = [22.0] * n  # the safe share: what a new transaction draws by the default
        for s in sims:
            s.on_arrival = check
        try:
            for round_ in range(6):
                new = random_limits(rng, n)
                if round_ == 0:
                    headroom[0] = 22.0 * n
                else:
                    headroom[0] = max(sum(old), sum(new)) + rng.uniform(0.0, 3.0)
                for s in sims:
                    s.faults.reply_delay_s = float(rng.randint(0, 20))
                plan = {(cid, 1): [kw] for cid, kw in zip(ids, new, strict=True)}
                await r.publish(plan, headroom_kw=headroom[0])
                for _ in range(120):
                    await quiet()
                    if all(s.pending is None for s in sims) and all(
                        links[s.spec.charger_id].idle.is_set() for s in sims
                    ):
                        break
                    await clock.advance(timedelta(seconds=1))
                now = clock.now()
                for s, kw in zip(sims, new, strict=True):
                    assert s.limit_kw(s.connector(1), now) == pytest.approx(kw, abs=0.6), (
                        f"round {round_}: {s.spec.charger_id}"
                    )
                old = new
        finally:
            for s in sims:
                s.on_arrival = None
    print(
        f"seed {seed}: {len(checked)} CALLs checked, least head-room left {min(checked):.2f} kW; "
        f"{r.dispatcher.counters['increases_fit_early']} increases early, "
        f"{r.dispatcher.counters['increases_held']} held, "
        f"{r.dispatcher.counters['increases_over_budget']} over budget"
    )
    assert not violations, violations[:5]
    assert len(checked) >= 5 * n
    assert r.dispatcher.counters["increases_fit_early"] > 0
    assert r.dispatcher.counters["increases_over_budget"] == 0


async def test_a_charger_gone_with_its_decrease_in_flight_stays_booked_until_it_is_back(
    redis: Redis, clock: SimClock
) -> None:
    """P-08. A: 11 -> 4.5 kW in flight when A's connection drops; B: 4.5 -> 11 kW under a
    head-room of 15.5 kW. A may have taken its decrease or not: it stays booked at 11 kW and
    its decrease counts as coming, so B waits (not even the rule before the budget lets it go,
    which released B when A went). A comes back without a reboot, gets its decrease, and
    then B is raised."""
    async with (
        rig(redis, clock, charger("CP-A"), charger("CP-B"), config=PATIENT) as r,
        watched(r.harness, ChargerSpec(charger_id="CP-A", max_power_kw=22.0)) as a,
        watched(r.harness, ChargerSpec(charger_id="CP-B", max_power_kw=22.0)) as b,
    ):
        await charging(r, [a, b], {("CP-A", 1): [11.0], ("CP-B", 1): [4.5]})
        a.faults.reply_delay_s = 600.0
        before = len(b.received)
        await r.publish({("CP-A", 1): [4.5], ("CP-B", 1): [11.0]}, headroom_kw=15.5)
        await arrived(a)
        await a.drop()
        await a.wait_for(lambda: a.backing_off)
        async with asyncio.timeout(RECV_TIMEOUT_S):  # the dispatcher has let A go
            while "CP-A" in r.dispatcher._links or "CP-A" not in r.dispatcher._gone:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
        await r.dispatcher.settled("CP-B")
        assert len(b.received) == before
        assert r.dispatcher._booked["CP-A"] == pytest.approx(11.0)
        assert r.dispatcher.counters["increases_over_budget"] == 0

        a.faults.reply_delay_s = 0.0
        await clock.advance(timedelta(seconds=2))  # A reconnects (no reboot)
        await b.wait_for(lambda: last_tx_w(b) == 11000.0)
        assert last_tx_w(a) == 4500.0  # A's decrease was acknowledged first
        assert r.dispatcher.counters["increases_over_budget"] == 0
