"""MQTT authentication, topic ACLs and TLS (RELIABILITY.md SEC-07).

Every check runs on two real brokers: the embedded amqtt broker as voltpool starts it off
loopback (password file, ACLs, TLS), and Mosquitto started by the compose file's own
`deploy/mosquitto/entrypoint.sh` from `deploy/mosquitto/mosquitto.conf` (paths and ports moved
into a temporary directory) when the binary is installed. Certificates come from trustme,
passwords from `secrets`, all made per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
import trustme
import yaml

from adapters.bootstrap import broker_endpoint
from adapters.embedded import (
    BrokerTls,
    MqttEndpoint,
    broker_config,
    client_tls_context,
    embedded_broker,
    free_port,
    until_listening,
)
from adapters.security.mqtt_acl import (
    CONTROLLER,
    OPERATOR,
    TELEMETRY,
    MqttCredentials,
    acl,
    add_user,
    generate_credentials,
    mosquitto_acl_rules,
    read_password_lines,
    write_password_file,
)
from controller.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 10.0
DOWNGRADE_WAIT_S = 1.0
CHEAP_ARGON2 = {"time_cost": 1, "memory_cost_kib": 8_192}  # still argon2, quicker to verify
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
# Anywhere but loopback: the embedded broker must then insist on a password file and TLS.
ANY_ADDRESS = "0.0.0.0"  # nosec B104: the tests bind it on purpose, with TLS and passwords


def _certificates(ca: trustme.CA, directory: Path) -> tuple[Path, Path, Path]:
    """ca.pem, server.pem (for localhost and 127.0.0.1), server.key in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca_pem, chain, key = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    server.private_key_pem.write_to_path(str(key))
    with chain.open("wb") as out:
        for blob in server.cert_chain_pems:
            out.write(blob.bytes())
    return ca_pem, chain, key


@contextlib.asynccontextmanager
async def _amqtt(
    workdir: Path, credentials: dict[str, MqttCredentials], ca: trustme.CA
) -> AsyncIterator[MqttEndpoint]:
    """The embedded broker off loopback: password file, ACLs, TLS; clients use TLS."""
    ca_pem, chain, key = _certificates(ca, workdir / "certs")
    password_file = write_password_file(workdir / "passwd", credentials, **CHEAP_ARGON2)
    port = free_port()
    async with embedded_broker(
        ANY_ADDRESS, port, password_file=password_file, tls=BrokerTls(chain, key)
    ):
        yield MqttEndpoint("127.0.0.1", port, tls_context=client_tls_context(ca_pem))


def shipped_mosquitto_config(workdir: Path, tls_port: int, local_port: int) -> Path:
    """deploy/mosquitto/mosquitto.conf with its paths and ports moved into `workdir`."""
    text = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
    moves = {
        "/mosquitto/data/": f"{workdir}/data/",
        "/mosquitto/config/acl": str(ROOT / "deploy/mosquitto/acl"),
        "/mosquitto/certs/": f"{workdir}/certs/",
        "listener 8883\n": f"listener {tls_port} 127.0.0.1\n",
        "listener 1883 127.0.0.1\n": f"listener {local_port} 127.0.0.1\n",
    }
    for old, new in moves.items():
        assert old in text, f"the shipped mosquitto.conf has no {old!r} any more"
        text = text.replace(old, new)
    if os.geteuid() == 0:
        text += "user root\n"  # keep reading the private temporary directory after start-up
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    config = workdir / "mosquitto.conf"
    config.write_text(text)
    return config


@contextlib.asynccontextmanager
async def _mosquitto(
    workdir: Path, credentials: dict[str, MqttCredentials], ca: trustme.CA
) -> AsyncIterator[MqttEndpoint]:
    """Mosquitto as the compose file starts it: entrypoint.sh writes the password file from
    the environment, then runs the shipped configuration."""
    if MOSQUITTO is None or MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto is not installed (Debian package mosquitto): amqtt only")
    ca_pem, _, _ = _certificates(ca, workdir / "certs")
    tls_port, local_port = free_port(), free_port()
    config = shipped_mosquitto_config(workdir, tls_port, local_port)
    path = os.pathsep.join(
        [str(Path(MOSQUITTO).parent), str(Path(MOSQUITTO_PASSWD).parent), "/usr/bin", "/bin"]
    )
    environment = {
        "PATH": path,
        "MOSQUITTO_CONF": str(config),
        "MOSQUITTO_PASSWD_FILE": str(workdir / "data" / "passwd"),
        "MQTT_PASSWORD": credentials[CONTROLLER].password,
        "MQTT_TELEMETRY_PASSWORD": credentials[TELEMETRY].password,
        "MQTT_OPERATOR_PASSWORD": credentials[OPERATOR].password,
    }
    process = await asyncio.create_subprocess_exec(
        "/bin/sh",
        str(ROOT / "deploy/mosquitto/entrypoint.sh"),
        env=environment,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await until_listening(tls_port, timeout_s=TIMEOUT_S)
        yield MqttEndpoint("127.0.0.1", tls_port, tls_context=client_tls_context(ca_pem))
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


@pytest.fixture(params=["amqtt", "mosquitto"])
async def secured(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[MqttEndpoint, dict[str, MqttCredentials]]]:
    credentials = generate_credentials()
    start = _amqtt if request.param == "amqtt" else _mosquitto
    async with start(tmp_path, credentials, trustme.CA()) as endpoint:
        yield endpoint, credentials


def _client(
    endpoint: MqttEndpoint,
    who: MqttCredentials | None,
    ident: str,
    *,
    tls: ssl.SSLContext | bool | None = True,
) -> aiomqtt.Client:
    context = endpoint.tls_context if tls is True else (tls or None)
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        username=None if who is None else who.username,
        password=None if who is None else who.password,
        identifier=ident,
        tls_context=context,
    )


async def test_the_authenticated_broker_refuses_bad_credentials(
    secured: tuple[MqttEndpoint, dict[str, MqttCredentials]],
) -> None:
    """No anonymous, wrong-password, unknown-user or empty-password client gets in (each
    variant on a new connection)."""
    endpoint, credentials = secured
    variants = {
        "anonymous": None,
        "wrong password": MqttCredentials(TELEMETRY, credentials[OPERATOR].password),
        "unknown user": MqttCredentials("mallory", credentials[TELEMETRY].password),
        "empty": MqttCredentials(TELEMETRY, ""),
    }
    let_in = []
    for name, who in variants.items():
        try:
            async with asyncio.timeout(TIMEOUT_S), _client(endpoint, who, f"bad-{len(name)}"):
                let_in.append(name)
        except aiomqtt.MqttError:
            pass
    assert let_in == []
    async with asyncio.timeout(TIMEOUT_S), _client(endpoint, credentials[TELEMETRY], "good"):
        pass  # the control: the right password does get in


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


async def test_a_principal_may_not_read_outside_its_acl(
    secured: tuple[MqttEndpoint, dict[str, MqttCredentials]],
) -> None:
    """Telemetry may not read operator command results. amqtt refuses the subscription
    (SUBACK 0x80); Mosquitto grants it but never delivers a message its read ACL denies. So
    the controller publishes a result, then a schedule: telemetry must see the schedule only."""
    endpoint, credentials = secured
    async with (
        asyncio.timeout(TIMEOUT_S),
        _client(endpoint, credentials[TELEMETRY], "tel-sub") as telemetry,
    ):
        granted = await telemetry.subscribe("voltpool/operator/result/#", qos=1)
        allowed = await telemetry.subscribe("voltpool/schedule", qos=1)
        assert [getattr(g, "value", g) for g in allowed] != [0x80]
        async with _client(endpoint, credentials[CONTROLLER], "ctl-pub") as controller:
            await controller.publish("voltpool/operator/result/op-1", b"secret result", qos=1)
            await controller.publish("voltpool/schedule", b"plan", qos=1)
        async for message in telemetry.messages:
            first = f"{message.topic}={message.payload!r}"
            break
    assert first == "voltpool/schedule=b'plan'"
    codes = [getattr(g, "value", g) for g in granted]
    assert codes in ([0x80], [1]), codes  # refused, or granted at QoS 1 but filtered


# paho leaves the socket of a failed TLS handshake to the garbage collector (ResourceWarning);
# it is collected inside this test so that the warning cannot land on a later one.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_the_network_listener_speaks_tls_only(
    secured: tuple[MqttEndpoint, dict[str, MqttCredentials]],
) -> None:
    """No silent downgrade: a clear-text client, or a TLS client that does not trust the
    broker's CA, gets no session even with the right password."""
    endpoint, credentials = secured
    untrusted = client_tls_context()
    trustme.CA().configure_trust(untrusted)
    let_in = []
    for name, tls in (("clear text", None), ("untrusted CA", untrusted)):
        # Refused (MqttError), or never answered: amqtt waits for a TLS hello that never comes.
        try:
            async with (
                asyncio.timeout(DOWNGRADE_WAIT_S),
                _client(endpoint, credentials[TELEMETRY], f"downgrade-{len(name)}", tls=tls),
            ):
                let_in.append(name)
        except (aiomqtt.MqttError, TimeoutError):
            pass
    gc.collect()
    assert let_in == []


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


def _listeners(conf: str) -> list[tuple[list[str], dict[str, str]]]:
    """Each `listener` line of a Mosquitto config with the options that follow it."""
    out: list[tuple[list[str], dict[str, str]]] = []
    for line in conf.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            out.append((words[1:], {}))
        elif out:
            out[-1][1][words[0]] = " ".join(words[1:])
    return out


def test_the_compose_broker_ships_password_and_acl_files_with_values_from_the_environment() -> None:
    """SEC-07 config test: allow_anonymous false, password_file written at start from three
    environment variables that must be set (no default password anywhere in the compose file),
    the shipped acl_file, and TLS on every listener that is not loopback."""
    conf = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
    options = {
        words[0]: " ".join(words[1:])
        for words in (line.split() for line in conf.splitlines())
        if words and not words[0].startswith("#") and words[0] != "listener"
    }
    assert options["allow_anonymous"] == "false"
    assert options["acl_file"] == "/mosquitto/config/acl"
    assert options["password_file"] == "/mosquitto/data/passwd"
    for address, settings in _listeners(conf):
        if len(address) < 2 or address[1] not in ("127.0.0.1", "::1", "localhost"):
            assert {"certfile", "keyfile"} <= set(settings), address
            assert settings.get("tls_version") in ("tlsv1.2", "tlsv1.3"), address

    compose_text = (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(compose_text)
    mosquitto = compose["services"]["mosquitto"]
    assert mosquitto["entrypoint"][-1] == "/mosquitto/config/entrypoint.sh"
    assert "./deploy/mosquitto:/mosquitto/config:ro" in mosquitto["volumes"]
    for name in ("MQTT_PASSWORD", "MQTT_TELEMETRY_PASSWORD", "MQTT_OPERATOR_PASSWORD"):
        assert mosquitto["environment"][name].startswith(f"${{{name}:?"), name
    assert ":-" not in compose_text  # no variable has a default, so no default password either
    controller = compose["services"]["controller"]["environment"]
    assert controller["MQTT_URL"].startswith("mqtts://")
    entrypoint = (ROOT / "deploy/mosquitto/entrypoint.sh").read_text()
    assert 'PASSWD="${MOSQUITTO_PASSWD_FILE:-/mosquitto/data/passwd}"' in entrypoint
    assert "mosquitto_passwd -b" not in entrypoint  # passwords never on a command line


async def test_voltpool_starts_its_broker_off_loopback_only_with_passwords_and_tls(
    tmp_path: Path,
) -> None:
    """The composition root's broker from settings: refused on 0.0.0.0 without a password
    file or without TLS; with both, the controller connects as its per-run principal (on the
    loopback listener) and receives what telemetry publishes over TLS."""
    ca = trustme.CA()
    ca_pem, chain, key = _certificates(ca, tmp_path / "certs")
    users = tmp_path / "users"
    telemetry = MqttCredentials(TELEMETRY, generate_credentials()[TELEMETRY].password)
    add_user(users, TELEMETRY, telemetry.password)
    assert set(read_password_lines(users)) == {TELEMETRY}
    base = Settings(mqtt_host=ANY_ADDRESS, data_dir=str(tmp_path / "var"))
    for refused in (
        base,
        base.model_copy(update={"mqtt_password_file": str(users)}),
        base.model_copy(update={"mqtt_tls_cert": str(chain), "mqtt_tls_key": str(key)}),
    ):
        with pytest.raises(ValueError, match="loopback"):
            async with broker_endpoint(refused):
                pass
    port = free_port()
    settings = base.model_copy(
        update={
            "mqtt_port": port,
            "mqtt_password_file": str(users),
            "mqtt_tls_cert": str(chain),
            "mqtt_tls_key": str(key),
        }
    )
    async with broker_endpoint(settings) as endpoint:
        runtime = tmp_path / "var" / "mqtt" / "passwd"
        assert runtime.stat().st_mode & 0o777 == 0o600
        assert set(read_password_lines(runtime)) == {TELEMETRY, CONTROLLER}
        assert endpoint.username == CONTROLLER
        assert endpoint.password
        assert endpoint.password not in runtime.read_text()
        remote = MqttEndpoint("127.0.0.1", port, tls_context=client_tls_context(ca_pem))
        async with (
            asyncio.timeout(TIMEOUT_S),
            _client(endpoint, MqttCredentials(CONTROLLER, endpoint.password), "ctl") as ctl,
        ):
            await ctl.subscribe("voltpool/#", qos=1)
            async with _client(remote, telemetry, "gateway") as gateway:
                await gateway.publish("voltpool/vehicle/ev-1/soc", b"tls", qos=1)
            async for message in ctl.messages:
                assert message.payload == b"tls"
                break
