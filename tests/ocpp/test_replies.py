"""Answers from charge points and boot refusals, over real WebSockets (RELIABILITY.md O-13, O-14,
S-03, S-04).

The charge point is a raw WebSocket driven from the test: it answers the central system's CALLs
as scripted (late, with unknown ids, with odd CALLERRORs) and records every frame it receives.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection

from adapters.ocpp.config import OcppConfig
from adapters.ocpp.errors import CallFailed, CallTimedOut, ChargerUnreachable
from controller.clock import SimClock
from tests.ocpp.conftest import BOOT, Harness, ask, charger, fleet, frame, recv, running_central

SEQUENCES = 1_000


@asynccontextmanager
async def fast_central(
    redis: Redis, clock: SimClock, *, call_timeout_s: float = 5.0
) -> AsyncIterator[Harness]:
    """A central system for CP-1 with the frame rate limit out of the way (thousands of frames
    in a few seconds are the point of these tests)."""
    config = OcppConfig(
        bcrypt_rounds=4,
        call_timeout_s=call_timeout_s,
        max_frames_per_s=1e6,
        frame_burst=1_000_000,
    )
    async with running_central(redis, clock, fleet([charger("CP-1")]), config=config) as h:
        yield h


def junk_answers(rng: random.Random, current: str, earlier: list[str]) -> list[tuple[str, str]]:
    """Up to four frames a confused charger sends before its real answer, each with the
    counter it must land in: answers with unknown ids, late answers to earlier CALLs,
    answers without a usable id, a CALLRESULT for the current id that is not an object."""
    frames: list[tuple[str, str]] = []
    for _ in range(rng.randint(0, 4)):
        kind = rng.randrange(6)
        late = rng.choice(earlier) if earlier else str(uuid.uuid4())
        if kind == 0:
            text = json.dumps([3, str(uuid.uuid4()), {"status": "Accepted", "data": "junk"}])
        elif kind == 1:
            text = json.dumps([4, str(uuid.uuid4()), "GenericError", "who?", {}])
        elif kind == 2:
            text = json.dumps([3, late, {"status": "Accepted", "data": "late"}])
        elif kind == 3:
            text = json.dumps([4, late, "InternalError", "late", {}])
        elif kind == 4:
            text = json.dumps(rng.choice([[3], [4, 17], [3, None, {}], [4, "", "X"]]))
        else:
            frames.append((json.dumps([3, current, "not an object"]), "answers_malformed"))
            continue
        frames.append((text, "answers_unmatched"))
    return frames


async def test_late_and_unknown_answers_are_dropped_and_every_call_gets_its_own_reply(
    redis: Redis, clock: SimClock
) -> None:
    """O-13: 1,000 randomised sequences of unknown-id, late, malformed and duplicated answers
    around the real one, with the charger's own Heartbeats in between: every DataTransfer
    returns its own reply (0 desyncs), every stray answer is dropped and counted, the charger
    is never sent a CALLERROR, and its Heartbeats are served meanwhile."""
    rng = random.Random(20261126)
    expected = {"answers_unmatched": 0, "answers_malformed": 0}
    async with fast_central(redis, clock) as h, h.connect("CP-1") as ws:
        earlier: list[str] = []
        desyncs = 0
        for i in range(SEQUENCES):
            calling = asyncio.ensure_future(
                h.central.data_transfer("CP-1", "org.test", "E", f"{i}")
            )
            call = await recv(ws)
            assert call[:3] == [2, call[1], "DataTransfer"]
            assert call[3]["data"] == f"{i}"
            script = junk_answers(rng, call[1], earlier)
            heartbeats = []
            if rng.random() < 0.2:
                heartbeats.append(f"hb{i}")
                script.insert(rng.randint(0, len(script)), (frame(f"hb{i}", "Heartbeat", {}), ""))
            for text, counter in script:
                await ws.send(text)
                if counter:
                    expected[counter] += 1
            await ws.send(json.dumps([3, call[1], {"status": "Accepted", "data": f"re:{i}"}]))
            if rng.random() < 0.1:  # the same answer again: a late duplicate
                await ws.send(json.dumps([3, call[1], {"status": "Accepted", "data": "dup"}]))
                expected["answers_unmatched"] += 1
            status, data = await calling
            desyncs += (status, data) != ("Accepted", f"re:{i}")
            for hb in heartbeats:
                answer = await recv(ws)
                assert answer[:2] == [3, hb], answer  # never a CALLERROR, never out of turn
            earlier.append(call[1])
        # Nothing else is waiting for the charger: the next frame answers its next CALL.
        assert (await ask(ws, frame("last", "Heartbeat", {})))[:2] == [3, "last"]
    assert desyncs == 0
    metrics = h.central.metrics
    assert (metrics["answers_unmatched"], metrics["answers_malformed"]) == (
        expected["answers_unmatched"],
        expected["answers_malformed"],
    )
    assert sum(expected.values()) > SEQUENCES  # the sequences did carry stray answers
    assert metrics["frames_reply"] == 0  # no CALLERROR was sent


async def test_an_answer_after_the_timeout_is_dropped_and_the_next_call_gets_its_own(
    redis: Redis, clock: SimClock
) -> None:
    """O-13 with real time-outs (the library waits on wall time; 0.2 s here): the late answer
    is dropped, counted, not answered, and the following call is not confused by it."""
    async with fast_central(redis, clock, call_timeout_s=0.2) as h, h.connect("CP-1") as ws:
        for i in range(3):
            call_task = asyncio.ensure_future(
                h.central.data_transfer("CP-1", "org.test", "E", f"slow{i}")
            )
            call = await recv(ws)
            with pytest.raises(CallTimedOut):
                await call_task
            await ws.send(json.dumps([3, call[1], {"status": "Accepted", "data": "too late"}]))
            quick = asyncio.ensure_future(h.central.data_transfer("CP-1", "org.test", "E", "q"))
            call = await recv(ws)
            await ws.send(json.dumps([3, call[1], {"status": "Accepted", "data": f"q{i}"}]))
            assert await quick == ("Accepted", f"q{i}")
        assert (await ask(ws, frame("hb", "Heartbeat", {})))[:2] == [3, "hb"]
    assert h.central.metrics["answers_unmatched"] == 3
    assert h.central.metrics["calls_timed_out"] == 3


# (the charger's CALLERROR after the id, the code the caller sees)
ODD_ERRORS: list[tuple[list[Any], str]] = [
    (["Kaputt", "a code OCPP does not have", {}], "GenericError"),
    (["NotSupported", "details as text", "not an object"], "NotSupported"),
    (["InternalError", 42, [1, 2]], "InternalError"),
    (["FormatViolation", "the 2.0.1 spelling", {}], "FormationViolation"),
    (["OccurrenceConstraintViolation", "the 2.0.1 spelling", {}], "OccurenceConstraintViolation"),
    ([], "GenericError"),
    ([None, None, None], "GenericError"),
    (["GenericError", "six elements", {}, "extra"], "GenericError"),
]


async def test_odd_callerrors_from_a_charger_are_tolerated_and_mapped(harness: Harness) -> None:
    """O-14: CALLERRORs with an unknown code, details that are not an object, a description
    that is not a string, missing or extra elements: the caller gets `CallFailed` with a 1.6
    code (GenericError when there is none), the connection keeps working, and the charger is
    never answered."""
    async with harness.connect("CP-1") as ws:
        for tail, code in ODD_ERRORS:
            calling = asyncio.ensure_future(
                harness.central.get_configuration("CP-1", ["HeartbeatInterval"])
            )
            call = await recv(ws)
            await ws.send(json.dumps([4, call[1], *tail]))
            with pytest.raises(CallFailed) as failed:
                await calling
            assert failed.value.code == code, tail
        calling = asyncio.ensure_future(harness.central.get_configuration("CP-1"))
        call = await recv(ws)
        known = [{"key": "HeartbeatInterval", "readonly": False, "value": "300"}]
        await ws.send(json.dumps([3, call[1], {"configurationKey": known}]))
        assert await calling == (known, [])
        assert (await ask(ws, frame("hb", "Heartbeat", {})))[:2] == [3, "hb"]
    assert harness.central.metrics["calls_failed"] == len(ODD_ERRORS)


@asynccontextmanager
async def profile0(redis: Redis, clock: SimClock, status: str) -> AsyncIterator[Harness]:
    """A central system without credentials (loopback) that answers unknown chargers `status`."""
    config = OcppConfig(
        require_auth=False,
        unknown_boot_status=status,  # type: ignore[arg-type]
        pending_retry_s=60,
        bcrypt_rounds=4,
    )
    async with running_central(redis, clock, fleet([]), config=config, passwords=False) as h:
        yield h


async def _no_call_from_the_central(ws: ClientConnection, probe: str) -> None:
    """Send a Heartbeat; the next frame must be its answer, so nothing was sent before it."""
    answer = await ask(ws, frame(probe, "Heartbeat", {}))
    assert answer[:3] == [4, probe, "SecurityError"], answer


async def test_a_rejected_charger_is_sent_nothing_and_its_early_boot_is_rejected_again(
    redis: Redis, clock: SimClock
) -> None:
    """S-04: after Boot Rejected (interval 60 s) every central-system call is withheld (0
    frames reach the charger, also on a new connection before it boots again), its calls get
    SecurityError; a boot 30 s later is Rejected
    without a second look even though the charger was registered meanwhile (and that answer
    restarts the interval); once a full interval has passed the boot is Accepted and calls flow
    again."""
    async with profile0(redis, clock, "Rejected") as h:
        async with h.connect("NEWBIE", headers={}, boot=False) as ws:
            first = await ask(ws, frame("b1", "BootNotification", BOOT))
            assert (first[2]["status"], first[2]["interval"]) == ("Rejected", 60)
            with pytest.raises(ChargerUnreachable):
                await h.central.trigger_message("NEWBIE", "StatusNotification")
            with pytest.raises(ChargerUnreachable):
                await h.central.get_configuration("NEWBIE")
            await _no_call_from_the_central(ws, "h1")
        async with h.connect("NEWBIE", headers={}, boot=False) as ws:  # back, no boot
            with pytest.raises(ChargerUnreachable):
                await h.central.trigger_message("NEWBIE", "StatusNotification")
            await _no_call_from_the_central(ws, "h1b")
            await h.central.credentials.set_password("NEWBIE", secrets.token_hex(12))
            await clock.advance(timedelta(seconds=30))
            early = await ask(ws, frame("b2", "BootNotification", BOOT))
            assert early[2]["status"] == "Rejected"
            await _no_call_from_the_central(ws, "h2")
            await clock.advance(timedelta(seconds=59))  # the early boot's answer restarted the wait
            again = await ask(ws, frame("b3", "BootNotification", BOOT))
            assert again[2]["status"] == "Rejected"
            await clock.advance(timedelta(seconds=60))
            later = await ask(ws, frame("b4", "BootNotification", BOOT))
            assert later[2]["status"] == "Accepted"
            asking = asyncio.ensure_future(h.central.trigger_message("NEWBIE", "Heartbeat"))
            call = await recv(ws)
            assert call[2] == "TriggerMessage"
            await ws.send(json.dumps([3, call[1], {"status": "Accepted"}]))
            assert await asking == "Accepted"
    assert h.central.metrics["calls_withheld_rejected"] == 3
    assert h.central.metrics["boots_before_retry_interval"] == 2


async def test_a_pending_charger_may_be_asked_but_its_other_calls_are_refused(
    redis: Redis, clock: SimClock
) -> None:
    """S-03: Boot Pending keeps the channel; the central system may GetConfiguration; the
    charger's StatusNotification and StartTransaction get SecurityError and change nothing."""
    async with (
        profile0(redis, clock, "Pending") as h,
        h.connect("MAYBE", headers={}, boot=False) as ws,
    ):
        boot = await ask(ws, frame("b", "BootNotification", BOOT))
        assert boot[2]["status"] == "Pending"
        asking = asyncio.ensure_future(h.central.get_configuration("MAYBE", ["NumberOfConnectors"]))
        call = await recv(ws)
        assert call[2:] == ["GetConfiguration", {"key": ["NumberOfConnectors"]}]
        known = [{"key": "NumberOfConnectors", "readonly": True, "value": "2"}]
        await ws.send(json.dumps([3, call[1], {"configurationKey": known}]))
        assert await asking == (known, [])
        status = {"connectorId": 1, "errorCode": "NoError", "status": "Charging"}
        start = {
            "connectorId": 1,
            "idTag": "T",
            "meterStart": 0,
            "timestamp": "2024-03-04T15:00:00Z",
        }
        for uid, action, payload in (
            ("s", "StatusNotification", status),
            ("t", "StartTransaction", start),
        ):
            answer = await ask(ws, frame(uid, action, payload))
            assert answer[:3] == [4, uid, "SecurityError"]
    assert h.recorder.of("connector_status_changed") == []
    assert h.recorder.of("transaction_started") == []
    assert await h.central.transactions.latest_on("MAYBE", 1) is None
