"""The security event log (RELIABILITY.md SEC-11): its records, counts and rate limit, and the
events the central system records for real handshakes, closures and TLS failures.

Certificates are generated at test time (trustme); every connection is a real WebSocket on
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import trustme
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from adapters.ocpp.config import OcppConfig
from adapters.security.events import (
    LOGGER_NAME,
    SecurityEventKind,
    SecurityLog,
    classify_tls_failure,
)
from adapters.security.tls import server_context
from controller.clock import SimClock
from tests.ocpp.conftest import (
    RECV_TIMEOUT_S,
    Harness,
    ask,
    charger,
    fleet,
    frame,
    recv,
    running_central,
)
from tests.ocpp.test_handshake import basic

Kind = SecurityEventKind


# --- the log itself ----------------------------------------------------------------------------


async def test_every_event_is_counted_and_lines_are_rate_limited_per_kind_and_principal(
    clock: SimClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Five failures of CP-1 in one window: five records, one line; CP-2's own line; after the
    window the next line says how many were left out."""
    log = SecurityLog(now=clock.now, interval_s=10.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        for _ in range(5):
            log.record(Kind.AUTH_FAILED, principal="CP-1", remote="10.0.0.1", reason="wrong")
        log.record(Kind.AUTH_FAILED, principal="CP-2", remote="10.0.0.2", reason="wrong")
        log.record(Kind.RATE_LIMITED, principal="CP-1", reason="flood")
    assert (log.counts["auth_failed"], log.logged["auth_failed"]) == (6, 2)
    assert log.suppressed["auth_failed"] == 4
    assert len(caplog.records) == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        await clock.advance(timedelta(seconds=10))
        log.record(Kind.AUTH_FAILED, principal="CP-1", reason="wrong")
    (line,) = caplog.records
    message = line.getMessage()
    assert message.startswith("security: refused CP-1: wrong {")
    record = json.loads(message[message.index("{") :])
    assert record["left_out"] == "4"
    assert len(log.recent(Kind.AUTH_FAILED)) == 7


def test_a_record_is_json_with_the_five_fields_and_no_secret(clock: SimClock) -> None:
    """kind, principal, remote, reason, at; credentials in a reason are redacted; a principal
    with control characters and 200 characters is cleaned and cut."""
    password = secrets.token_hex(16)
    log = SecurityLog(now=clock.now)
    event = log.record(
        Kind.AUTH_FAILED,
        principal="CP\x00-1" + "x" * 200,
        remote="127.0.0.1",
        reason=f"header Authorization: Basic {password}",
    )
    as_json = event.to_json()
    assert set(as_json) == {"kind", "principal", "remote", "reason", "at"}
    assert as_json["at"] == "2024-03-04T16:00:00Z"
    assert as_json["kind"] == "auth_failed"
    assert password not in json.dumps(as_json)
    assert as_json["principal"].startswith("CP?-1")
    assert len(as_json["principal"]) == 64


def test_the_rate_limit_windows_are_bounded(clock: SimClock) -> None:
    """A flood of made-up ids keeps at most `max_keys` windows: the oldest is forgotten, so it
    is logged again (and memory stays bounded)."""
    log = SecurityLog(now=clock.now, max_keys=3)
    for i in range(10):
        log.record(Kind.UNKNOWN_ID, principal=f"X{i}")
    log.record(Kind.UNKNOWN_ID, principal="X9")  # still in its window
    log.record(Kind.UNKNOWN_ID, principal="X0")  # forgotten: logged again
    assert log.logged["unknown_id"] == 11
    assert log.counts["unknown_id"] == 12


def test_tls_failures_are_told_apart() -> None:
    """OpenSSL reasons -> downgrade, certificate, other."""

    def error(reason: str) -> ssl.SSLError:
        failure = ssl.SSLError(1, reason)
        failure.reason = reason
        return failure

    assert classify_tls_failure(error("HTTP_REQUEST"))[0] is Kind.DOWNGRADE
    assert classify_tls_failure(error("UNSUPPORTED_PROTOCOL"))[0] is Kind.DOWNGRADE
    assert classify_tls_failure(error("CERTIFICATE_VERIFY_FAILED"))[0] is Kind.INVALID_CERTIFICATE
    assert classify_tls_failure(error("DECRYPTION_FAILED"))[0] is Kind.TLS_FAILED


# --- events of the central system, over real sockets -------------------------------------------


async def _refused(harness: Harness, path_id: str, headers: dict[str, str]) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            harness.central.url(path_id),
            subprotocols=["ocpp1.6"],  # type: ignore[list-item]
            additional_headers=headers,
            open_timeout=RECV_TIMEOUT_S,
        ):
            pass
    return refused.value.response.status_code


async def test_failed_handshakes_are_security_events_without_the_password(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong password (three times), unknown id, malformed header, bad id in the path: each a
    record with the charger, the peer address and why; the wrong password is in no record and
    no log line; the repeated failure is logged once."""
    wrong = secrets.token_hex(16)
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            assert await _refused(harness, "CP-2", basic("CP-2", wrong)) == 401
        assert await _refused(harness, "CP-99", basic("CP-99", wrong)) == 401
        assert await _refused(harness, "CP-3", {"Authorization": "Basic !!"}) == 401
        assert await _refused(harness, "bad(id)", basic("bad(id)", wrong)) == 404
    security = harness.central.security
    assert security.counts == {"auth_failed": 4, "unknown_id": 1, "invalid_id": 1}
    wrong_password = security.recent(Kind.AUTH_FAILED)[0]
    assert (wrong_password.principal, wrong_password.remote) == ("CP-2", "127.0.0.1")
    assert "wrong password" in wrong_password.reason
    assert security.recent(Kind.UNKNOWN_ID)[0].principal == "CP-99"
    assert "malformed" in security.recent(Kind.AUTH_FAILED)[-1].reason
    assert security.logged["auth_failed"] == 2  # CP-2 once, CP-3 once
    records = json.dumps([e.to_json() for e in security.recent()])
    assert wrong not in records
    assert wrong not in caplog.text
    assert harness.central.metrics["security_auth_failed"] == 4


async def _flood(ws: ClientConnection) -> None:
    """Fifty Heartbeats at once, then read the answers (until the connection closes)."""
    for i in range(50):
        await ws.send(frame(f"h{i}", "Heartbeat", {}))
    for _ in range(50):
        await recv(ws)


async def test_an_oversized_frame_and_a_flood_are_security_events(
    redis: Redis, clock: SimClock
) -> None:
    """A frame over the cap (1009) and a frame flood (1008) each close the connection and are
    recorded with the charger's id."""
    config = OcppConfig(bcrypt_rounds=4, max_frames_per_s=1.0, frame_burst=5)
    state = fleet([charger("CP-1"), charger("CP-2")])
    async with running_central(redis, clock, state, config=config) as h:
        async with h.connect("CP-1") as ws:
            await ws.send(
                json.dumps([2, "big", "DataTransfer", {"vendorId": "v", "data": "x" * 70_000}])
            )
            with pytest.raises(ConnectionClosed):
                await recv(ws)
        async with h.connect("CP-2") as ws:
            with pytest.raises(ConnectionClosed):
                await _flood(ws)
        await h.central.metrics.wait_for(
            lambda: (
                h.central.metrics["security_rate_limited"] == 1
                and h.central.metrics["security_oversized_frame"] == 1
            )
        )
    assert [e.principal for e in h.central.security.recent(Kind.OVERSIZED_FRAME)] == ["CP-1"]
    assert [e.principal for e in h.central.security.recent(Kind.RATE_LIMITED)] == ["CP-2"]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """The CA of the server's and the chargers' certificates."""
    return trustme.CA()


def _server_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path, Path]:
    cert = ca.issue_cert("127.0.0.1")
    chain, key, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(chain))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(chain), append=True)
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return chain, key, ca_file


@pytest.fixture
async def tls(
    redis: Redis, clock: SimClock, ca: trustme.CA, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    """A central system on TLS: profile 2 (`mutual` false) or 3."""
    chain, key, ca_file = _server_files(ca, tmp_path)
    mutual = bool(getattr(request, "param", False))
    context = server_context(chain, key, client_ca=ca_file if mutual else None)
    config = OcppConfig(ssl_context=context, bcrypt_rounds=4)
    async with running_central(redis, clock, fleet([charger("CP-1")]), config=config) as h:
        yield h


async def test_plain_ws_to_the_tls_listener_is_a_downgrade_attempt(tls: Harness) -> None:
    """SEC-03: a charger that tries ws:// on the TLS port gets no session, and the attempt is a
    `downgrade_attempt` event (the TLS layer sees an HTTP request)."""
    plain = tls.central.url("CP-1").replace("wss://", "ws://")
    with pytest.raises((InvalidHandshake, OSError, asyncio.TimeoutError)):
        async with connect(plain, subprotocols=["ocpp1.6"], open_timeout=2):  # type: ignore[list-item]
            pass
    await tls.central.metrics.wait_for(
        lambda: tls.central.metrics["security_downgrade_attempt"] > 0
    )
    (event,) = tls.central.security.recent(Kind.DOWNGRADE)
    assert "plain HTTP" in event.reason
    assert not tls.central.is_online("CP-1")


@pytest.mark.parametrize("tls", [True], indirect=True)
async def test_a_certificate_from_another_ca_is_an_invalid_certificate_event(
    tls: Harness, ca: trustme.CA
) -> None:
    """Profile 3: a client certificate that does not chain to the configured CA fails the TLS
    handshake and is recorded as `invalid_certificate`; a good one opens a session."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    trustme.CA().issue_cert("cp-1.example", common_name="CP-1").configure_cert(context)
    with pytest.raises((ssl.SSLError, InvalidHandshake, OSError, asyncio.TimeoutError)):
        async with connect(
            tls.central.url("CP-1"),
            subprotocols=["ocpp1.6"],  # type: ignore[list-item]
            ssl=context,
            open_timeout=RECV_TIMEOUT_S,
        ) as ws:
            await ask(ws, frame("h", "Heartbeat", {}))
    await tls.central.metrics.wait_for(
        lambda: tls.central.metrics["security_invalid_certificate"] > 0
    )
    (event,) = tls.central.security.recent(Kind.INVALID_CERTIFICATE)
    assert "certificate" in event.reason
    assert tls.central.security.counts["downgrade_attempt"] == 0
