"""A TCP proxy, on the test's event loop, whose open connections can go silent.

`silence()` turns every connection open now into a black hole: both sockets stay
open, nothing is forwarded either way, nothing is closed (a NAT that forgot the flow,
a peer whose machine froze). Connections accepted afterwards are forwarded normally,
so a client that gives up on the silent one and reconnects gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

READ_CHUNK = 65_536


@dataclass(eq=False)
class _Link:
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    silent: bool = False


class BlackholeProxy:
    """127.0.0.1:`port` -> upstream. `await start()`, then `await close()`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self.accepted = 0
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def silence(self) -> int:
        """Black-hole every connection open now; returns how many."""
        for link in self._links:
            link.silent = True
        return len(self._links)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            for writer in link.writers:
                writer.transport.abort()
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writers=[writer, upstream_writer])
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, upstream_writer)),
            asyncio.create_task(self._pump(link, upstream_reader, writer)),
        ]

    async def _pump(
        self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(READ_CHUNK):
                if link.silent:
                    continue  # swallowed: the peer hears nothing, and no FIN or RST
                sink.write(data)
                await sink.drain()
        if not link.silent:
            for writer in link.writers:
                writer.transport.abort()
