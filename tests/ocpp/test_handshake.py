"""The opening handshake: Basic auth (security profile 1), subprotocol, paths, TLS (profile 2)."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Callable

import pytest
import trustme
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.http11 import Response

from adapters.ocpp.aio import redis_call
from adapters.ocpp.config import OcppConfig
from adapters.ocpp.credentials import CredentialStore
from adapters.ocpp.errors import BadCredential
from controller.clock import SimClock
from tests.ocpp.conftest import (
    BOOT,
    RECV_TIMEOUT_S,
    SITE,
    Harness,
    ask,
    charger,
    fleet,
    frame,
    running_central,
)


def basic(user: str, password: str) -> dict[str, str]:
    """A Basic Authorization header."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def refused_response(harness: Harness, path_id: str, headers: dict[str, str]) -> Response:
    """The HTTP response a refused handshake gets."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            harness.central.url(path_id),
            subprotocols=["ocpp1.6"],  # type: ignore[list-item]
            additional_headers=headers,
            open_timeout=RECV_TIMEOUT_S,
        ):
            pass
    return refused.value.response


async def refused_status(harness: Harness, path_id: str, headers: dict[str, str]) -> int:
    """The HTTP status a refused handshake gets."""
    return (await refused_response(harness, path_id, headers)).status_code


BAD_CREDENTIALS: dict[str, Callable[[str], dict[str, str]]] = {
    "wrong password": lambda pw: basic("CP-1", pw[:-1] + ("0" if pw[-1] != "0" else "1")),
    "empty password": lambda pw: basic("CP-1", ""),
    "other charger's user": lambda pw: basic("CP-2", pw),
    "user differs in case": lambda pw: basic("cp-1", pw),
    "password with suffix": lambda pw: basic("CP-1", pw + "x"),
    "no header": lambda pw: {},
    "not basic": lambda pw: {"Authorization": f"Bearer {pw}"},
    "not base64": lambda pw: {"Authorization": "Basic %%%"},
    "no colon": lambda pw: {"Authorization": "Basic " + base64.b64encode(b"CP-1").decode()},
    "empty header": lambda pw: {"Authorization": ""},
    "password of another site": lambda pw: basic("CP-1", "f" * 32),
    "overlong password": lambda pw: basic("CP-1", pw * 20),
}


@pytest.mark.parametrize("variant", sorted(BAD_CREDENTIALS))
async def test_bad_credentials_are_refused_with_401(harness: Harness, variant: str) -> None:
    """SEC-02: none of the bad-credential variants opens a connection."""
    headers = BAD_CREDENTIALS[variant](harness.password)
    assert await refused_status(harness, "CP-1", headers) == 401
    assert not harness.central.is_online("CP-1")


async def test_an_unknown_charge_point_is_refused_with_401(harness: Harness) -> None:
    """An id without credentials cannot connect, whatever it sends."""
    assert await refused_status(harness, "CP-99", basic("CP-99", harness.password)) == 401
    assert harness.central.metrics["handshakes_refused_auth"] == 1


@pytest.mark.parametrize("path_id", ["CP-1/extra", "CP(1)", "a" * 49, "CP%3A1", ""])
async def test_a_path_without_a_valid_charge_point_id_is_refused_with_404(
    harness: Harness, path_id: str
) -> None:
    """SEC-01: ids with / ( ) : or over 48 characters never reach a credential lookup."""
    assert await refused_status(harness, path_id, basic("CP-1", harness.password)) == 404


async def test_a_handshake_without_subprotocol_is_refused(harness: Harness) -> None:
    """S-01: no subprotocol offered -> HTTP 400, no connection."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            harness.central.url("CP-1"),
            additional_headers=harness.auth("CP-1"),
            open_timeout=RECV_TIMEOUT_S,
        ):
            pass
    assert refused.value.response.status_code == 400
    assert not harness.central.is_online("CP-1")


async def test_a_handshake_offering_only_another_subprotocol_is_refused(harness: Harness) -> None:
    """S-01: only `ocpp0.1` offered -> refused."""
    with pytest.raises(InvalidHandshake):
        async with connect(
            harness.central.url("CP-1"),
            subprotocols=["ocpp0.1"],  # type: ignore[list-item]
            additional_headers=harness.auth("CP-1"),
            open_timeout=RECV_TIMEOUT_S,
        ):
            pass


async def test_ocpp16_is_selected_among_several_offers(harness: Harness) -> None:
    """S-01: `ocpp0.1, ocpp1.6` offered -> `ocpp1.6` selected and served."""
    async with connect(
        harness.central.url("CP-1"),
        subprotocols=["ocpp0.1", "ocpp1.6"],  # type: ignore[list-item]
        additional_headers=harness.auth("CP-1"),
        open_timeout=RECV_TIMEOUT_S,
    ) as ws:
        assert ws.subprotocol == "ocpp1.6"
        assert (await ask(ws, frame("b", "BootNotification", BOOT)))[2]["status"] == "Accepted"


async def test_a_rotated_password_takes_effect_at_once(harness: Harness) -> None:
    """After a new password is stored, the old one (even if checked before) is refused."""
    async with harness.connect("CP-1"):
        pass
    await harness.central.credentials.set_password("CP-1", "n" * 24)
    assert await refused_status(harness, "CP-1", basic("CP-1", harness.password)) == 401
    async with harness.connect("CP-1", headers=basic("CP-1", "n" * 24), boot=False):
        pass


async def test_passwords_are_stored_as_bcrypt_hashes(redis: Redis) -> None:
    """SEC-02/SEC-09: Redis holds a bcrypt hash, never the password."""
    store = CredentialStore(redis, SITE, rounds=4)
    await store.set_password("CP-7", "s3cret-s3cret-s3cret")
    stored = await redis_call(redis.hget(f"vp:{{{SITE}}}:cp_credentials", "CP-7"))
    assert isinstance(stored, str)
    assert stored.startswith("$2b$04$")
    assert "s3cret" not in stored
    assert await store.verify("CP-7", "s3cret-s3cret-s3cret")
    assert not await store.verify("CP-7", "s3cret-s3cret-s3creT")


@pytest.mark.parametrize(
    ("charger_id", "password"),
    [("CP-1", "short"), ("CP-1", "x" * 41), ("CP-1", "with space in it!!"), ("CP/1", "x" * 20)],
)
async def test_bad_ids_and_passwords_are_not_stored(
    redis: Redis, charger_id: str, password: str
) -> None:
    """Passwords are 16-40 printable characters; ids are valid charge point ids."""
    with pytest.raises(BadCredential):
        await CredentialStore(redis, SITE, rounds=4).set_password(charger_id, password)


def test_profile_0_is_refused_off_loopback() -> None:
    """SEC-03: no credentials only on 127.0.0.1."""
    with pytest.raises(ValueError, match="loopback"):
        OcppConfig(host="0.0.0.0", require_auth=False)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A throw-away certificate authority for this module's TLS tests."""
    return trustme.CA()


@pytest.fixture
async def tls_harness(redis: Redis, clock: SimClock, ca: trustme.CA) -> AsyncIterator[Harness]:
    """The central system on TLS with a certificate for 127.0.0.1."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    config = OcppConfig(ssl_context=server, bcrypt_rounds=4)
    async with running_central(redis, clock, fleet([charger("CP-1")]), config=config) as h:
        yield h


async def test_tls_with_basic_auth_serves_a_charger_that_trusts_the_ca(
    tls_harness: Harness, ca: trustme.CA
) -> None:
    """Profile 2: wss:// with the CA trusted, and the right password."""
    client = ssl.create_default_context()
    ca.configure_trust(client)
    url = tls_harness.central.url("CP-1")
    assert url.startswith("wss://")
    async with connect(
        url,
        subprotocols=["ocpp1.6"],  # type: ignore[list-item]
        additional_headers=tls_harness.auth("CP-1"),
        ssl=client,
        open_timeout=RECV_TIMEOUT_S,
    ) as ws:
        assert (await ask(ws, frame("b", "BootNotification", BOOT)))[2]["status"] == "Accepted"


async def test_tls_refuses_a_wrong_password_and_a_client_that_does_not_trust_the_cert(
    tls_harness: Harness, ca: trustme.CA
) -> None:
    """Profile 2: TLS does not replace the password; an untrusted certificate fails."""
    client = ssl.create_default_context()
    ca.configure_trust(client)
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            tls_harness.central.url("CP-1"),
            subprotocols=["ocpp1.6"],  # type: ignore[list-item]
            additional_headers=basic("CP-1", "w" * 32),
            ssl=client,
            open_timeout=RECV_TIMEOUT_S,
        ):
            pass
    assert refused.value.response.status_code == 401
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(
            tls_harness.central.url("CP-1"),
            subprotocols=["ocpp1.6"],  # type: ignore[list-item]
            additional_headers=tls_harness.auth("CP-1"),
            ssl=ssl.create_default_context(),
            open_timeout=RECV_TIMEOUT_S,
        ):
            pass


async def test_plain_ws_to_the_tls_port_does_not_connect(tls_harness: Harness) -> None:
    """No silent downgrade: a ws:// client gets no session on the TLS listener."""
    plain = tls_harness.central.url("CP-1").replace("wss://", "ws://")
    with pytest.raises((InvalidHandshake, OSError, asyncio.TimeoutError)):
        async with connect(
            plain,
            subprotocols=["ocpp1.6"],  # type: ignore[list-item]
            additional_headers=tls_harness.auth("CP-1"),
            open_timeout=2,
        ):
            pass
    assert not tls_harness.central.is_online("CP-1")


async def test_a_handshake_the_credential_store_cannot_answer_gets_503_not_401(
    harness: Harness, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With Redis unreachable the password cannot be checked: the charger is told to come back
    (503 + Retry-After), not that its password is wrong (401, after which some chargers give up),
    and nothing is recorded as a failed authentication."""
    no_socket = str(tmp_path_factory.mktemp("dead") / "no.sock")
    dead = Redis(unix_socket_path=no_socket, retry=Retry(NoBackoff(), 0))
    real = harness.central.credentials
    harness.central.credentials = CredentialStore(dead, SITE, rounds=4)
    try:
        deferred = await refused_response(harness, "CP-1", harness.auth("CP-1"))
    finally:
        harness.central.credentials = real
        await dead.aclose()
    assert deferred.status_code == 503
    assert deferred.headers["Retry-After"] == "10"
    assert harness.central.metrics["handshakes_deferred_store"] == 1
    assert harness.central.metrics["handshakes_refused_auth"] == 0
    async with connect(
        harness.central.url("CP-1"),
        subprotocols=["ocpp1.6"],  # type: ignore[list-item]
        additional_headers=harness.auth("CP-1"),
        open_timeout=RECV_TIMEOUT_S,
    ):
        pass  # the store is back: the same credentials open the connection
