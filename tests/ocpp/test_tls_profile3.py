"""OCPP security profile 3: mutual TLS, the client certificate's CN must be the charge point id.

Certificates are generated at test time (trustme); RELIABILITY.md SEC-03, SEC-04.
"""

from __future__ import annotations

import asyncio
import ssl
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from adapters.ocpp.config import OcppConfig
from adapters.security.tls import server_context
from controller.clock import SimClock
from controller.errors import InvalidEvent
from tests.ocpp.conftest import (
    BOOT,
    RECV_TIMEOUT_S,
    Harness,
    ask,
    charger,
    fleet,
    frame,
    running_central,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """The CA that signs the server's and the chargers' certificates."""
    return trustme.CA()


@pytest.fixture
async def mtls(
    redis: Redis, clock: SimClock, ca: trustme.CA, tmp_path: Path
) -> AsyncIterator[Harness]:
    """The central system on mutual TLS for CP-1 and CP-2."""
    server_cert = ca.issue_cert("127.0.0.1")
    chain, key, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(chain))
    for pem in server_cert.cert_chain_pems[1:]:
        pem.write_to_path(str(chain), append=True)
    server_cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    context = server_context(chain, key, client_ca=ca_file)
    config = OcppConfig(ssl_context=context, bcrypt_rounds=4)
    state = fleet([charger("CP-1"), charger("CP-2")])
    async with running_central(redis, clock, state, config=config) as harness:
        yield harness


def client_context(trust: trustme.CA, cert: trustme.LeafCert | None) -> ssl.SSLContext:
    """A charger's context: trusts `trust`, presents `cert` if given."""
    context = ssl.create_default_context()
    trust.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    return context


async def _boot(harness: Harness, charger_id: str, context: ssl.SSLContext) -> str:
    async with connect(
        harness.central.url(charger_id),
        subprotocols=["ocpp1.6"],  # type: ignore[list-item]
        ssl=context,
        open_timeout=RECV_TIMEOUT_S,
    ) as ws:
        return str((await ask(ws, frame("b", "BootNotification", BOOT)))[2]["status"])


async def test_a_charger_with_its_own_certificate_is_served(mtls: Harness, ca: trustme.CA) -> None:
    """CN = CP-1, chained to the CA: accepted without any password."""
    cert = ca.issue_cert("cp-1.example", common_name="CP-1")
    assert await _boot(mtls, "CP-1", client_context(ca, cert)) == "Accepted"


async def test_a_certificate_for_another_charger_is_refused_with_403(
    mtls: Harness, ca: trustme.CA
) -> None:
    """CP-2's certificate cannot open CP-1's session."""
    cert = ca.issue_cert("cp-2.example", common_name="CP-2")
    with pytest.raises(InvalidStatus) as refused:
        await _boot(mtls, "CP-1", client_context(ca, cert))
    assert refused.value.response.status_code == 403
    assert mtls.central.metrics["handshakes_refused_cert"] == 1
    assert not mtls.central.is_online("CP-1")


@pytest.mark.parametrize("variant", ["no certificate", "other CA", "expired", "self-signed"])
async def test_certificates_that_do_not_chain_or_are_expired_fail_the_tls_handshake(
    mtls: Harness, ca: trustme.CA, variant: str
) -> None:
    """The TLS layer refuses them before any HTTP: no session, whatever the path says."""
    now = datetime.now(UTC)
    cert: trustme.LeafCert | None
    if variant == "no certificate":
        cert = None
    elif variant == "other CA":
        cert = trustme.CA().issue_cert("cp-1.example", common_name="CP-1")
    elif variant == "expired":
        cert = ca.issue_cert(
            "cp-1.example",
            common_name="CP-1",
            not_before=now - timedelta(days=30),
            not_after=now - timedelta(days=1),
        )
    else:
        cert = trustme.CA().issue_cert("cp-1.example", common_name="CP-1")  # own root
    with pytest.raises((ssl.SSLError, InvalidHandshake, OSError, asyncio.TimeoutError)):
        await _boot(mtls, "CP-1", client_context(ca, cert))
    assert not mtls.central.is_online("CP-1")


async def test_plain_ws_to_the_mutual_tls_port_gets_no_session(mtls: Harness) -> None:
    """No silent downgrade from profile 3 to plain WebSocket."""
    plain = mtls.central.url("CP-1").replace("wss://", "ws://")
    with pytest.raises((InvalidHandshake, OSError, asyncio.TimeoutError)):
        async with connect(plain, subprotocols=["ocpp1.6"], open_timeout=2):  # type: ignore[list-item]
            pass
    assert not mtls.central.is_online("CP-1")


def test_a_context_that_allows_tls_1_1_is_refused() -> None:
    """SEC-04: TLS >= 1.2 only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python warns about TLS 1.1 itself
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(InvalidEvent, match="below TLS 1.2"):
        OcppConfig(ssl_context=context)
