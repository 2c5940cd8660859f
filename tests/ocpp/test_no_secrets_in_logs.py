"""No secret in a log line (RELIABILITY.md SEC-10): the captured logs of real handshakes are
grepped for the passwords and the Authorization headers that carried them, at DEBUG level."""

from __future__ import annotations

import base64
import logging
import secrets

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from adapters.embedded import MqttEndpoint
from adapters.security.redaction import RedactSecrets
from tests.ocpp.conftest import BOOT, RECV_TIMEOUT_S, Harness, ask, frame, simulated
from tests.ocpp.test_handshake import basic


async def test_passwords_and_authorization_headers_never_reach_the_logs(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A good and a bad Basic-auth handshake, a password rotation and an MQTT URL with a
    password, all logged at DEBUG: none of the secrets, nor their base64 form, is in the text."""
    wrong = secrets.token_hex(16)
    rotated = secrets.token_hex(16)
    mqtt_password = secrets.token_urlsafe(16)
    with caplog.at_level(logging.DEBUG):
        async with harness.connect("CP-1") as ws:
            await ask(ws, frame("h", "Heartbeat", {}))
        with pytest.raises(InvalidStatus):
            async with connect(
                harness.central.url("CP-2"),
                subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                additional_headers=basic("CP-2", wrong),
                open_timeout=RECV_TIMEOUT_S,
            ):
                pass
        await harness.central.credentials.set_password("CP-3", rotated)
        async with harness.connect("CP-3", headers=basic("CP-3", rotated)) as ws:
            assert (await ask(ws, frame("b2", "BootNotification", BOOT)))[2]["status"]
        async with simulated(harness, "CP-1") as sim:
            assert await harness.central.rotate_password("CP-1") == "Accepted"
            rotated_key = sim.authorization_key
        assert rotated_key is not None
        endpoint = MqttEndpoint.from_url(f"mqtt://voltpool:{mqtt_password}@broker:1883")
        logging.getLogger("voltpool.test").info("mqtt endpoint %r", endpoint)
    text = caplog.text
    assert "security: refused CP-2" in text  # the refusal itself is logged...
    assert "AuthorizationKey" in text  # the ocpp library did log the ChangeConfiguration frame
    for secret in (harness.password, wrong, rotated, mqtt_password, rotated_key):
        assert secret not in text  # ...but never the secret
        for user in ("CP-1", "CP-2", "CP-3"):
            assert base64.b64encode(f"{user}:{secret}".encode()).decode() not in text


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("< Authorization: Basic Q1AtMTpzM2NyZXQ=", "Q1AtMTpzM2NyZXQ="),
        ("headers={'Authorization': 'Bearer tok3n-value'}", "tok3n-value"),
        (
            '[2,"m1","ChangeConfiguration",{"key":"AuthorizationKey","value":"a1b2c3d4"}]',
            "a1b2c3d4",
        ),
        ("redis://voltpool:pa55word@redis:6379/0", "pa55word"),  # pragma: allowlist secret
        ("mqtt://telemetry:t0psecret@broker:1883", "t0psecret"),  # pragma: allowlist secret
    ],
)
def test_the_redaction_filter_removes_each_kind_of_credential(line: str, secret: str) -> None:
    """Headers, reprs, the AuthorizationKey of a ChangeConfiguration frame, URL passwords."""
    record = logging.LogRecord("websockets.server", logging.DEBUG, "x", 1, "%s", (line,), None)
    assert RedactSecrets().filter(record) is True
    assert secret not in record.getMessage()
    assert "<redacted>" in record.getMessage()
