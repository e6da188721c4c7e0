"""A TCP proxy between the server and PostgreSQL that the test can break.

It runs on its own event loop in its own thread, on 127.0.0.1, so it forwards whatever
the test's event loop is doing (an in-process server opens its journal synchronously on
that loop). Its methods are called from the test and wait for the proxy's loop. Faults:

- `cut()`: the database is unreachable: nobody listens on the port any more and every
  open connection is reset. `listen()` listens again on the same port.
- `lose_next_commit_reply()`: the next COMMIT goes through and PostgreSQL makes it
  durable, but its reply never reaches the server: the proxy drops it and cuts. The
  server cannot know the transaction committed (an ambiguous commit).
- `stall()`: a black hole (a network partition): connections stay open, the listener
  still accepts, but no byte is forwarded either way.

To see a COMMIT the proxy follows the PostgreSQL frontend protocol (length-prefixed
messages after an untyped startup packet), so the server must talk to it without TLS
(`sslmode=disable`, `gssencmode=disable` in the URL).
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

READ_CHUNK = 65_536
CONTROL_TIMEOUT_SECONDS = 10.0  # a call into the proxy's loop
# Untyped requests a client may send before its startup message: SSLRequest, GSSENCRequest.
_PRE_STARTUP_CODES = frozenset({80_877_103, 80_877_104})


def _is_commit(kind: bytes, payload: bytes) -> bool:
    """A simple Query ('Q') or a Parse ('P') of exactly COMMIT."""
    if kind == b"Q":
        query = payload.split(b"\0", 1)[0]
    elif kind == b"P":
        parts = payload.split(b"\0", 2)
        query = parts[1] if len(parts) > 1 else b""
    else:
        return False
    return query.strip().rstrip(b";").strip().upper() == b"COMMIT"


class FrontendParser:
    """Splits what a PostgreSQL client sends into messages; spots COMMIT."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._started = False  # the untyped startup message has gone by

    def feed(self, data: bytes) -> bool:
        """Take the client's next bytes; True if they complete a COMMIT."""
        self._buffer += data
        commit = False
        while True:
            if not self._started:
                if len(self._buffer) < 8:
                    return commit
                length, code = struct.unpack_from("!ii", self._buffer, 0)
                if len(self._buffer) < length:
                    return commit
                del self._buffer[:length]
                self._started = code not in _PRE_STARTUP_CODES
                continue
            if len(self._buffer) < 5:
                return commit
            (length,) = struct.unpack_from("!i", self._buffer, 1)
            if len(self._buffer) < 1 + length:
                return commit
            kind = bytes(self._buffer[:1])
            payload = bytes(self._buffer[5 : 1 + length])
            del self._buffer[: 1 + length]
            commit = _is_commit(kind, payload) or commit


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream twin."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    parser: FrontendParser = field(default_factory=FrontendParser)
    commit_in_flight: bool = False  # a COMMIT whose reply is to be lost went upstream
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        self.client.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """127.0.0.1:`port` -> upstream, until the test breaks it. `close()` when done."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._stalled = False
        self._lose_commit_reply = False
        self.port = 0
        self.commit_reply_lost = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._thread.start()

    # -------------------------------------------------- control (test thread)

    def _on_loop(self, action: Callable[[], T]) -> T:
        async def run() -> T:
            return action()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(CONTROL_TIMEOUT_SECONDS)

    def listen(self) -> None:
        """Listen: on a free port the first time, on the same port after a cut."""
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(CONTROL_TIMEOUT_SECONDS)

    def cut(self) -> None:
        """The database is gone: the port refuses connections, open ones are reset."""
        self._on_loop(self._cut)

    def stall(self) -> None:
        """A black hole: accept, hold, forward nothing (until `cut`)."""
        self._on_loop(lambda: setattr(self, "_stalled", True))

    def lose_next_commit_reply(self) -> None:
        """Let the next COMMIT reach PostgreSQL, drop its reply, then cut."""
        self._on_loop(lambda: setattr(self, "_lose_commit_reply", True))

    def close(self) -> None:
        """Cut, end every task of the proxy, stop its thread."""

        async def shutdown() -> None:
            self._cut()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(CONTROL_TIMEOUT_SECONDS)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_SECONDS)
        self._loop.close()

    # ---------------------------------------------------- the proxy's loop

    async def _listen(self) -> None:
        self._stalled = False
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        links, self._links = self._links, set()
        for link in links:
            link.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        if self._stalled:
            return  # held open, never answered
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        except (OSError, asyncio.CancelledError):  # refused, or the proxy is closing
            link.abort()
            self._links.discard(link)
            return
        link.upstream = upstream_writer
        if link not in self._links:  # cut while connecting
            link.abort()
            return
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, upstream_writer, to_upstream=True)),
            asyncio.create_task(self._pump(link, upstream_reader, writer, to_upstream=False)),
        ]

    async def _pump(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        to_upstream: bool,
    ) -> None:
        try:
            while data := await source.read(READ_CHUNK):
                if self._stalled:
                    continue  # dropped on the floor
                if to_upstream:
                    if link.parser.feed(data) and self._lose_commit_reply:
                        self._lose_commit_reply = False
                        link.commit_in_flight = True
                elif link.commit_in_flight:
                    # PostgreSQL answered the COMMIT, so it is durable; the answer is lost.
                    self.commit_reply_lost.set()
                    self._cut()
                    return
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            link.abort()
            self._links.discard(link)
