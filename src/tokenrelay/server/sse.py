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
  stream (and its limits) forever;
* with a ``detach`` hook (a stream that may outlive its client: ``server/producing.py``),
  the client going away does not cancel the source: the response stops iterating it at
  the next frame and hands it over (``Detachable.hand_over``) instead of closing it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from .._timer import LazyTimer, TaskDeadline

__all__ = ["SSE_HEADERS", "BreakConnection", "Detachable", "EarlyResponse", "SSEResponse",
           "SendTimeout"]

SSE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
]

_END = object()


class SendTimeout(ConnectionAbortedError):
    """A client stopped reading for longer than the send timeout: its stream is dropped."""


class BreakConnection(Exception):
    """Raised by a source once its stream has started: end the response by closing the
    connection without the body's end (no last chunk), which every HTTP client reads as
    a broken stream, never as a complete one. The gateway does it to a client whose
    stream is handed to another process at shutdown: the client resumes there."""


class Detachable(Protocol):
    """A source that may go on without its client (``SSEResponse(detach=...)``)."""

    def client_gone(self) -> bool:
        """The client left: True when the source goes on producing (do not cancel it)."""

    def hand_over(self, source: AsyncIterator[bytes]) -> None:
        """The response stopped iterating ``source`` (not closed): run it to its end."""


#: The message of a cancellation that stops a stream on request (cancel, grace over): the
#: source answers it; a response interrupted in a send by it just ends.
STOP = "tokenrelay: stream stopped"


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
            "complete", "disconnect", "detached", "stopped", "send_timeout" or "broken"
            (the source raised :class:`BreakConnection`).
        detach: asked when the client leaves whether the source goes on without it; if
            so, the source is handed over at its next frame instead of being closed.
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
        detach: Detachable | None = None,
    ) -> None:
        self.source = source
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.wait_first = wait_first
        self.headers = SSE_HEADERS + (headers or [])
        self.on_close = on_close
        self.detach = detach

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        state = _State(loop, task, send, self.heartbeat)
        watcher = asyncio.ensure_future(self._watch_disconnect(receive, state))
        reason = "complete"
        broken: BreakConnection | None = None
        try:
            await self._stream(state)
        except BreakConnection as exc:
            broken, reason = exc, "broken"
        except asyncio.CancelledError as exc:
            timed_out = state.send_deadline.expired()  # absorbs its own cancellation
            if state.gone:  # the watcher's cancellation: the client left
                task.uncancel()
                reason = "disconnect"
            elif timed_out:
                reason = "send_timeout"
            elif exc.args and exc.args[0] == STOP:
                # A stop request caught this task in a send (a client not reading): the
                # source's own end (its finally) records it.
                task.uncancel()
                reason = "stopped"
            else:
                raise
        except OSError:  # the server reports the client gone on send
            reason = "disconnect"
        finally:
            state.close()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            if state.handed:
                reason = "detached"  # (handed over where this response let go of it)
            else:
                # Runs on cancellation too (client gone): closes the source, which aborts
                # the upstream request / stops local decoding.
                aclose = getattr(self.source, "aclose", None)
                if aclose is not None:
                    await aclose()
            if self.on_close is not None:
                await self.on_close(reason)
        if broken is not None:
            raise broken  # the server closes the connection (run.py: no traceback)
        if reason == "send_timeout":
            # Raising after the response started makes the server close the connection
            # (server/run.py logs it as one warning line, not uvicorn's traceback).
            raise SendTimeout(f"dropped a client that read nothing for {self.send_timeout:g}s"
                              " (send timeout)")

    def _hand_over(self, state: _State) -> None:
        # Here, with the source suspended at a frame boundary and no await since: a stop
        # cannot fall between this response letting go and the new task taking it.
        assert self.detach is not None
        state.handed = True
        self.detach.hand_over(self.source)

    async def _watch_disconnect(self, receive: Any, state: _State) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not state.done:
                    state.gone = True
                    if self.detach is not None and self.detach.client_gone():
                        # The source goes on: the response lets go of it at its next
                        # frame (sends to a gone client are dropped meanwhile).
                        state.detached = True
                    else:
                        state.task.cancel()
                return

    async def _stream(self, state: _State) -> None:
        send = state.send
        source = self.source.__aiter__()
        # This task awaits the first frame itself. If it is slow, a timer opens the
        # stream meanwhile (headers, ": stream open", then heartbeats) from a task of its
        # own; until then a failure keeps its real HTTP status (EarlyResponse). No task
        # or asyncio.wait per request: both sat on the path to the first token.
        if self.wait_first > 0:
            state.open_after(self.wait_first, self.headers)
        else:
            state.opened = True
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            await state.write(b": stream open\n\n", self.send_timeout)
            state.heartbeats()
        first: Any
        try:
            first = await source.__anext__()
        except StopAsyncIteration:
            first = _END
        except EarlyResponse as early:
            if not state.opened:
                state.opened = True
                state.cancel_open()
                await send({"type": "http.response.start", "status": early.status,
                            "headers": early.headers})
                await send({"type": "http.response.body", "body": early.body,
                            "more_body": False})
                return
            # Too late for a status (the stream is open): send its error frame.
            await state.wait_open()
            first = _END
            if early.frame:
                await state.write(early.frame, self.send_timeout)
        if not state.opened:
            state.opened = True
            state.cancel_open()
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        else:
            await state.wait_open()
        if first is not _END and state.detached:
            self._hand_over(state)  # (the frame is in the stream log: a resume has it)
        elif first is not _END:
            await state.write(first, self.send_timeout)
            state.heartbeats()
            # The hot loop: one frame, one send, in this task. State.write inline (no
            # coroutine per frame); the timers are lazy (_timer.py): a frame costs two
            # float stores, no timer operation.
            timeout = self.send_timeout
            deadline = state.send_deadline
            now = state.loop.time
            try:
                async for frame in source:
                    if state.detached:  # the client left; the source goes on without it
                        self._hand_over(state)
                        break
                    state.last_write = when = now()
                    state.sending = True
                    deadline.arm(when + timeout)
                    try:
                        await send({"type": "http.response.body", "body": frame,
                                    "more_body": True})
                    finally:
                        deadline.when = None
                        state.sending = False
            except EarlyResponse as item:
                if item.frame:
                    await state.write(item.frame, self.send_timeout)
        state.done = True
        await state.finish(self.send_timeout)


class _State:
    """One response's shared state: disconnect flag, send deadline, heartbeat timer."""

    __slots__ = ("_open_timer", "_opening", "_ping", "detached", "done", "gone", "handed",
                 "heartbeat", "heartbeat_timer", "last_write", "loop", "opened", "send",
                 "send_deadline", "sending", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], send: Any,
                 heartbeat: float) -> None:
        self.loop = loop
        self.task = task
        self.send = send
        self.heartbeat = heartbeat
        self.gone = False
        #: The client left and the source goes on without it (``SSEResponse.detach``).
        self.detached = False
        #: This response stopped iterating the source, which is to be handed over.
        self.handed = False
        self.done = False
        self.sending = False
        #: Loop time of the last frame or ping sent.
        self.last_write = 0.0
        self.send_deadline = TaskDeadline(loop, task)  # only the stream's task writes
        self.heartbeat_timer: LazyTimer | None = None
        self._ping: asyncio.Task[None] | None = None
        #: The status line went out (or is going out: ``_opening``).
        self.opened = False
        self._open_timer: LazyTimer | None = None
        self._opening: asyncio.Task[None] | None = None

    def open_after(self, seconds: float, headers: list[tuple[bytes, bytes]]) -> None:
        """Open the stream (200, headers, a comment) if no frame came within ``seconds``."""

        def open_now() -> None:
            if self.opened or self.done or self.gone:
                return
            self.opened = True  # decided here, synchronously: the stream's task sees it
            self._opening = asyncio.ensure_future(self._open(headers))

        self._open_timer = LazyTimer(open_now, self.loop)
        self._open_timer.arm(self.loop.time() + seconds)

    def cancel_open(self) -> None:
        if self._open_timer is not None:
            self._open_timer.close()

    async def wait_open(self) -> None:
        """Wait until the opening task has sent the headers (it may still be sending)."""
        if self._opening is not None:
            await self._opening

    async def _open(self, headers: list[tuple[bytes, bytes]]) -> None:
        # Plain sends, no deadline: the stream's own writes carry the send timeout.
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        await self.send({"type": "http.response.body", "body": b": stream open\n\n",
                         "more_body": True})
        self.heartbeats()

    async def write(self, body: bytes, timeout: float) -> None:
        self.last_write = now = self.loop.time()
        self.sending = True
        self.send_deadline.arm(now + timeout)
        try:
            await self.send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            self.send_deadline.disarm()
            self.sending = False

    def heartbeats(self) -> None:
        """From now on, send a ``: ping`` whenever no frame went out for ``heartbeat`` s
        (the timer compares with ``last_write`` when it fires: a frame only stores it)."""
        if self.heartbeat_timer is None:
            self.heartbeat_timer = LazyTimer(self._on_quiet, self.loop)
            self.heartbeat_timer.arm(self.loop.time() + self.heartbeat)

    def _on_quiet(self) -> None:
        if self.done or self.gone:
            return
        assert self.heartbeat_timer is not None
        due = self.last_write + self.heartbeat
        now = self.loop.time()
        if now + 0.001 < due:  # a frame went out meanwhile: wait for the new due time
            self.heartbeat_timer.arm(due)
            return
        if not self.sending and (self._ping is None or self._ping.done()):
            # Sent from a task of its own: the stream's task is waiting on its source.
            self.last_write = now
            self._ping = asyncio.ensure_future(self._send_ping())
        self.heartbeat_timer.arm(now + self.heartbeat)

    async def _send_ping(self) -> None:
        if self.done or self.sending:
            return
        # A broken client is reported by the stream's own next send, not by a ping.
        with contextlib.suppress(Exception):
            await self.send({"type": "http.response.body", "body": b": ping\n\n",
                             "more_body": True})

    async def finish(self, timeout: float) -> None:
        if self._ping is not None and not self._ping.done():
            self._ping.cancel()
            await asyncio.gather(self._ping, return_exceptions=True)
        self.send_deadline.arm(self.loop.time() + timeout)
        try:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.send_deadline.disarm()

    def close(self) -> None:
        self.done = True
        self.send_deadline.close()
        self.cancel_open()
        if self.heartbeat_timer is not None:
            self.heartbeat_timer.close()
        for task in (self._ping, self._opening):
            if task is not None and not task.done():
                task.cancel()
