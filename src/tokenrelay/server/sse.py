"""A server-sent-events ASGI response that survives disconnects and slow clients.

sse-starlette does the same job; measured on this machine class it adds ~30 µs per relayed
chunk (DEVELOPERS.md, "Relay costs"), close to the whole 50 µs budget of the gateway, so
this small response is hand-written. What it guarantees (sse-starlette ``sse.py`` and its
issues are the reference):

* headers: ``text/event-stream``, ``Cache-Control: no-store``, ``X-Accel-Buffering: no``
  (nginx would buffer otherwise), no compression;
* ``:`` comment heartbeats while the source is quiet (waiting for a first token);
* the client going away (``http.disconnect``) cancels the source at once, so the upstream
  request is aborted / local decoding stops (the source's ``finally`` blocks run);
* a client that stops reading is dropped after ``send_timeout`` instead of holding the
  stream (and its limits) forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

__all__ = ["SSE_HEADERS", "EarlyResponse", "SSEResponse"]

SSE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
]

_END = object()


class EarlyResponse(Exception):
    """Raised by a source before its first frame: answer with this plain response instead.

    Lets a failure that happens before anything was streamed (upstream 429, unknown
    model, connection refused) keep a real HTTP status instead of a 200 event stream.
    """

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]], *,
                 frame: bytes = b"") -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers
        #: What to send instead when the stream has already started (an error frame).
        self.frame = frame


class SSEResponse:
    """Send the byte frames of ``source`` as an event stream.

    Args:
        source: async iterator of complete SSE frames (bytes).
        heartbeat: seconds of silence before a ``: ping`` comment is sent.
        send_timeout: seconds one send may block (client not reading) before the
            connection is dropped.
        wait_first: seconds to wait for the first frame before the response starts, so
            that a source failing at once (``EarlyResponse``) gets a real HTTP status;
            after it, heartbeats keep the started stream alive.
        on_close: awaited once the response is over, with the reason:
            "complete", "disconnect" or "send_timeout".
    """

    def __init__(
        self,
        source: AsyncIterator[bytes],
        *,
        heartbeat: float = 15.0,
        send_timeout: float = 30.0,
        wait_first: float = 0.0,
        headers: list[tuple[bytes, bytes]] | None = None,
        on_close: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.source = source
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.wait_first = wait_first
        self.headers = SSE_HEADERS + (headers or [])
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        reason = "complete"
        stream_task = asyncio.ensure_future(self._stream(send))
        watch_task = asyncio.ensure_future(self._watch_disconnect(receive))
        try:
            done, _ = await asyncio.wait(
                {stream_task, watch_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if watch_task in done:
                reason = "disconnect"
                stream_task.cancel()
            else:
                watch_task.cancel()
            try:
                await stream_task
            except asyncio.CancelledError:
                if reason == "complete":  # we were cancelled ourselves
                    raise
            except TimeoutError:
                reason = "send_timeout"
            except OSError:
                reason = "disconnect"
        finally:
            for task in (stream_task, watch_task):
                if not task.done():
                    task.cancel()
            await asyncio.gather(stream_task, watch_task, return_exceptions=True)
            if self.on_close is not None:
                await self.on_close(reason)
        if reason == "send_timeout":
            # Raising after the response started makes the server close the connection.
            raise ConnectionAbortedError("SSE client stopped reading (send timeout)")

    async def _watch_disconnect(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def _send(self, send: Any, body: bytes, more: bool = True) -> None:
        async with asyncio.timeout(self.send_timeout):
            await send({"type": "http.response.body", "body": body, "more_body": more})

    async def _stream(self, send: Any) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        source = self.source

        async def produce() -> None:
            try:
                async for frame in source:
                    await queue.put(frame)
            except EarlyResponse as early:
                await queue.put(early)
            except Exception:
                await queue.put(_END)  # the consumer re-raises it from producer.result()
                raise
            finally:
                # Runs on cancellation too (client gone): closes the source, which aborts
                # the upstream request / stops local decoding.
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()
            await queue.put(_END)

        producer = asyncio.ensure_future(produce())
        try:
            first: Any = None
            if self.wait_first > 0:
                try:
                    async with asyncio.timeout(self.wait_first):
                        first = await queue.get()
                except TimeoutError:
                    first = None
            if isinstance(first, EarlyResponse):
                await send({"type": "http.response.start", "status": first.status,
                            "headers": first.headers})
                await self._send(send, first.body, more=False)
                return
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            if first is None:
                # Flush the headers at once so clients and proxies see the stream start.
                await self._send(send, b": stream open\n\n")
            item = first
            while True:
                if item is None:
                    try:
                        item = queue.get_nowait()  # fast path: no timer per frame
                    except asyncio.QueueEmpty:
                        try:
                            async with asyncio.timeout(self.heartbeat):
                                item = await queue.get()
                        except TimeoutError:
                            await self._send(send, b": ping\n\n")
                            continue
                if item is _END:
                    break
                if isinstance(item, EarlyResponse):
                    # Too late for a status (heartbeats started): send its error frame.
                    if item.frame:
                        await self._send(send, item.frame)
                    break
                await self._send(send, item)
                item = None
            if producer.done():
                producer.result()
            else:
                await producer
            await self._send(send, b"", more=False)
        finally:
            if not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
