"""MQTT authentication and topic ACLs on the embedded amqtt broker (RELIABILITY.md SEC-07)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from adapters.embedded import MqttEndpoint, broker_config, embedded_broker
from adapters.security.mqtt_acl import (
    CONTROLLER,
    OPERATOR,
    TELEMETRY,
    MqttCredentials,
    acl,
    generate_credentials,
    mosquitto_acl_rules,
    write_password_file,
)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 10.0


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[MqttEndpoint, dict[str, MqttCredentials]]]:
    credentials = generate_credentials()
    password_file = write_password_file(tmp_path / "passwd", credentials)
    async with embedded_broker(password_file=password_file) as endpoint:
        yield endpoint, credentials


def _client(endpoint: MqttEndpoint, who: MqttCredentials | None, ident: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        username=None if who is None else who.username,
        password=None if who is None else who.password,
        identifier=ident,
    )


@pytest.mark.parametrize("variant", ["anonymous", "wrong password", "unknown user", "empty"])
async def test_the_authenticated_broker_refuses_bad_credentials(
    secured: tuple[MqttEndpoint, dict[str, MqttCredentials]], variant: str
) -> None:
    """No anonymous, wrong-password, unknown-user or empty-password client gets in."""
    endpoint, credentials = secured
    who = {
        "anonymous": None,
        "wrong password": MqttCredentials(TELEMETRY, credentials[OPERATOR].password),
        "unknown user": MqttCredentials("mallory", credentials[TELEMETRY].password),
        "empty": MqttCredentials(TELEMETRY, ""),
    }[variant]
    with pytest.raises(aiomqtt.MqttError):
        async with asyncio.timeout(TIMEOUT_S), _client(endpoint, who, f"bad-{len(variant)}"):
            pass


async def test_topic_acls_let_through_only_what_each_principal_may_publish(
    secured: tuple[MqttEndpoint, dict[str, MqttCredentials]],
) -> None:
    """Telemetry cannot forge commands or schedules; the operator cannot forge telemetry."""
    endpoint, credentials = secured
    received: list[str] = []
    async with asyncio.timeout(TIMEOUT_S):
        async with _client(endpoint, credentials[CONTROLLER], "ctl") as controller:
            await controller.subscribe("voltpool/#", qos=1)
            async with _client(endpoint, credentials[TELEMETRY], "tel") as telemetry:
                await telemetry.publish("voltpool/operator/command", b"{}", qos=1)
                await telemetry.publish("voltpool/schedule", b"{}", qos=1)
                await telemetry.publish("voltpool/vehicle/ev-1/soc", b"1", qos=1)
            async with _client(endpoint, credentials[OPERATOR], "op") as operator:
                await operator.publish("voltpool/vehicle/ev-1/soc", b"2", qos=1)
                await operator.publish("voltpool/operator/command", b"3", qos=1)
            async for message in controller.messages:
                received.append(f"{message.topic}={message.payload!r}")
                if len(received) == 2:
                    break
    # QoS 1 from one client arrives in order: a forbidden message let through would come first.
    assert received == ["voltpool/vehicle/ev-1/soc=b'1'", "voltpool/operator/command=b'3'"]


async def test_a_principal_may_not_subscribe_outside_its_acl(
    secured: tuple[MqttEndpoint, dict[str, MqttCredentials]],
) -> None:
    """Telemetry may not read operator command results (SUBACK 0x80 failure)."""
    endpoint, credentials = secured
    async with (
        asyncio.timeout(TIMEOUT_S),
        _client(endpoint, credentials[TELEMETRY], "tel-sub") as telemetry,
    ):
        granted = await telemetry.subscribe("voltpool/operator/result/#", qos=1)
        allowed = await telemetry.subscribe("voltpool/schedule", qos=1)
    assert [getattr(g, "value", g) for g in granted] == [0x80]
    assert [getattr(g, "value", g) for g in allowed] != [0x80]


def test_an_anonymous_broker_may_only_bind_to_loopback(tmp_path: Path) -> None:
    """SEC-07: a broker without a password file refuses a non-loopback address, and one with
    a password file still needs TLS there."""
    assert broker_config("127.0.0.1", 1883)["plugins"]
    with pytest.raises(ValueError, match="only bind to loopback"):
        broker_config("0.0.0.0", 1883)  # nosec B104: the address being refused
    with pytest.raises(ValueError, match="needs TLS"):
        broker_config("0.0.0.0", 1883, password_file=tmp_path / "p")  # nosec B104
    assert (
        "amqtt.plugins.authentication.FileAuthPlugin"
        in (
            broker_config("127.0.0.1", 1883, password_file=tmp_path / "p")["plugins"]  # type: ignore[operator]
        )
    )


def test_the_password_file_holds_only_slow_hashes_and_is_private(tmp_path: Path) -> None:
    """SEC-10: argon2 hashes, mode 0600, no clear-text password anywhere in the file."""
    credentials = generate_credentials()
    path = write_password_file(tmp_path / "passwd", credentials)
    text = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert all(line.split(":", 1)[1].startswith("$argon2") for line in text.splitlines())
    assert not any(c.password in text for c in credentials.values())
    assert "password=<redacted>" in repr(credentials[CONTROLLER])
    endpoint = MqttEndpoint("h", 1, CONTROLLER, credentials[CONTROLLER].password)
    assert credentials[CONTROLLER].password not in repr(endpoint)


def test_the_compose_mosquitto_acl_says_what_the_embedded_acl_says() -> None:
    """One policy: deploy/mosquitto/acl grants each principal exactly the embedded rules."""
    mosquitto = mosquitto_acl_rules((ROOT / "deploy/mosquitto/acl").read_text())
    for name, rules in acl("voltpool").items():
        granted = mosquitto[name]
        writes = {t for a, t in granted if a in ("write", "readwrite")}
        reads = {t for a, t in granted if a in ("read", "readwrite")}
        assert writes == set(rules.publish), name
        assert reads == set(rules.subscribe), name
