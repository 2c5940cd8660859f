"""A TCP proxy in front of a redis-server's unix socket that can lose one reply on the way back.

A real fault, not a stand-in for Redis: the server executes the command (and, with AOF, writes
it to its file), the proxy drops the answer and closes the client's connection, as a server
killed between writing its AOF and sending its reply, or a network cut, does. redis-py's retry
policy (`adapters.embedded.RedisEndpoint.client`) then sends the same command again on a new
connection, and the server executes it a second time.

`lose_reply_containing(marker)` arms it once: the first reply from the server that contains
`marker` (e.g. an event id the consumer's read delivers) is dropped, after `then` (e.g. a kill -9
and restart of the server) has run. `lost` counts the drops, so a test can check that its fault
really happened.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class LostReplyProxy:
    """Forwards 127.0.0.1:`port` to the redis-server at unix socket `upstream`."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream
        self._server: asyncio.Server | None = None
        self._marker: bytes | None = None
        self._then: Callable[[], None] | None = None
        self._connections: set[asyncio.Task[None]] = set()  # one `_serve` per connection
        self.port = 0
        self.lost = 0  # replies dropped so far

    async def start(self) -> int:
        """Listen on an ephemeral port of 127.0.0.1; returns it."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    @property
    def url(self) -> str:
        """The redis URL a client connects to."""
        return f"redis://127.0.0.1:{self.port}/0"

    def lose_reply_containing(self, marker: bytes, then: Callable[[], None] | None = None) -> None:
        """Drop the next reply that contains `marker`, run `then` (blocking), and close the
        client's connection (once)."""
        self._marker, self._then = marker, then

    async def close(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._connections.add(me)
        writers = [client_w]
        try:
            server_r, server_w = await asyncio.open_unix_connection(self._upstream)
            writers.append(server_w)
            up = asyncio.create_task(self._pump(client_r, server_w, watch=False))
            down = asyncio.create_task(self._pump(server_r, client_w, watch=True))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (up, down):
                    task.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        finally:
            self._connections.discard(me)
            for writer in writers:
                writer.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, watch: bool
    ) -> None:
        """Copy until EOF; on the way back (`watch`), drop the armed reply and stop."""
        while chunk := await reader.read(65536):
            if watch and self._marker is not None and self._marker in chunk:
                self._marker = None
                self.lost += 1
                if self._then is not None:
                    self._then()
                return  # the caller closes both sides: the client sees the connection drop
            writer.write(chunk)
            await writer.drain()
