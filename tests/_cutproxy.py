"""A TCP proxy on loopback that breaks client connections on purpose: after K bytes from
the server it resets the client's connection (RST), closes it (FIN), or stalls it (stops
forwarding, keeps it open). The server's side is closed at the same moment, so the server
sees its client go away exactly as with a real network failure.

    with CutProxy(("127.0.0.1", gw.port), plan=lambda n: Cut(700) if n == 0 else None) as p:
        client(base_url=f"http://127.0.0.1:{p.port}/v1")

``plan(n)`` is asked once per accepted connection (0, 1, 2, …): a :class:`Cut` or None.
A cut with a ``marker`` counts its bytes from the end of the marker's first occurrence in
what the server sent on that connection (a browser reuses connections: the response to
break is found by its bytes); ``max_cuts`` bounds the cuts of the whole proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Self

__all__ = ["Cut", "CutProxy"]


@dataclass(frozen=True)
class Cut:
    """Break a connection after ``after`` bytes from the server reached the client."""

    after: int
    how: Literal["reset", "close", "stall"] = "reset"
    marker: bytes | None = None


class CutProxy:
    def __init__(self, target: tuple[str, int],
                 plan: Callable[[int], Cut | None] = lambda n: None, *,
                 max_cuts: int | None = None) -> None:
        self.target = target
        self.plan = plan
        self.max_cuts = max_cuts
        self.port = 0
        #: Connections accepted, and the cuts made (connection number, bytes sent).
        self.connections = 0
        self.cuts: list[tuple[int, int]] = []
        #: What the server sent on each connection (all of it, cut or not).
        self.received: dict[int, bytearray] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cut-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> Self:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        assert not self._thread.is_alive(), "the cut proxy did not stop"
        self._loop.close()

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = self.connections
        self.connections += 1
        cut = self.plan(number)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            upward = asyncio.ensure_future(_pump(reader, up_writer))
            try:
                if await self._down(number, up_reader, writer, cut):
                    # Stalled: silent and open until the client gives up (closes).
                    await upward
            finally:
                upward.cancel()
                await asyncio.gather(upward, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a connection gone, or the proxy stopping: end quietly
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.transport.abort()
            self._tasks.discard(task)

    async def _down(self, number: int, up: asyncio.StreamReader, client: asyncio.StreamWriter,
                    cut: Cut | None) -> bool:
        """Forward the server's bytes; True when the connection is to stall."""
        sent = 0
        received = self.received[number] = bytearray()
        limit = None if cut is None or cut.marker is not None else cut.after
        while True:
            data = await up.read(65536)
            received += data
            if limit is None and cut is not None and cut.marker is not None:
                found = received.find(cut.marker)
                if found >= 0:
                    limit = found + len(cut.marker) + cut.after
            if limit is not None and self.max_cuts is not None and len(self.cuts) >= self.max_cuts:
                limit = None
                cut = None
            if not data:
                client.write_eof()
                await client.drain()
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(client.wait_closed(), 5)
                return False
            if cut is not None and limit is not None and sent + len(data) >= limit:
                client.write(data[: limit - sent])
                await client.drain()
                sent = limit
                self.cuts.append((number, sent))
                if cut.how == "stall":
                    return True
                if cut.how == "reset":
                    sock = client.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return False  # the caller aborts both connections
            client.write(data)
            await client.drain()
            sent += len(data)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
