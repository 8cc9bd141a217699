"""Background responses (OpenAI's ``background: true``): generation that outlives its
request, kept in the stream log, retrieved, replayed and cancelled from any process.

``POST /v1/responses`` with ``background: true`` creates the response's stream
(``resp_`` + 128 random bits, owned by the caller's key) with its ``response.created``
frame (status ``queued``) and answers at once: the ``queued`` Response object, or with
``stream: true`` the stream read from the log. A detached producer task runs the model
and appends each event's frames (``response.in_progress`` first); nothing a client does
stops it but a cancel (or the server shutting down): a disconnect only ends a delivery.

* ``GET /v1/responses/{id}``: the Response object rebuilt from the stored frames
  (``response_snapshot.py``): final, or the output so far.
* ``GET /v1/responses/{id}?stream=true&starting_after=N``: frames N+1, … then live, each
  with SSE ``id:`` = ``sequence_number``.
* ``POST /v1/responses/{id}/cancel``: sets the stream's cancel flag (any process sees it;
  the producer closes its upstream and ends the stream ``cancelled``), then answers the
  final object. Cancelling again answers it again; a response that ended otherwise is a
  400, as OpenAI answers (``Cannot cancel a completed response.``).

Another key's response is not found, exactly like an unknown one (404).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from .._stream import AsyncStream
from ..events import ErrorEvent
from .access import log_access
from .encode import SERVER_SHUTDOWN, SHUTDOWN_MESSAGE
from .response_snapshot import ResponseSnapshot, frame
from .responses import ResponsesEncoder
from .routing import label
from .security import ANONYMOUS, GatewayHTTPError, Lease
from .shutdown import SHUTDOWN, is_shutdown
from .sse import SSEResponse
from .streamlog import (
    LeaseLost,
    Producer,
    ProducerLost,
    StreamInfo,
    StreamLogError,
    StreamLogFull,
    StreamNotFound,
    StreamReader,
)
from .takeover import Resumption, TakeOver, record_lost, restart_meta, unlimited_lease

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["BackgroundResponses"]

log = logging.getLogger("tokenrelay.server")

ENDPOINT = "responses"
#: The cancellation of a producer task that a cancel request caused.
_CANCEL = "tokenrelay: response cancelled"
#: How long ``POST …/cancel`` waits for the producer to end the stream (it does within a
#: tick: the upstream read is cancelled where it waits).
CANCEL_WAIT_S = 5.0
_SHUTDOWN_EVENT = ErrorEvent(SERVER_SHUTDOWN, SHUTDOWN_MESSAGE, True)
_LOST_MESSAGE = ("the process generating this response stopped before it was complete;"
                 " send the request again")


def not_found(response_id: str) -> GatewayHTTPError:
    # OpenAI's wording. Unknown, expired, evicted or another key's: never said which.
    return GatewayHTTPError(404, f"Response with id '{response_id[:140]}' not found.",
                            code="not_found", param="response_id")


class BackgroundResponses:
    """The background responses of one gateway: their producer tasks and endpoints."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.log = gateway.streams
        #: The producer tasks running here (strong references: asyncio keeps weak ones).
        self.tasks: set[asyncio.Task[None]] = set()
        #: Finishing responses whose producing process died (takeover.py).
        self.takeover = TakeOver(gateway)

    # -- create --------------------------------------------------------------------------

    async def start(self, request: HTTPRequest, encoder_args: dict[str, Any], *,
                    stream: AsyncStream, lease: Lease, key_id: str, model: str,
                    route: str | None, deliver: bool) -> Response | SSEResponse:
        """Create the response's stream, start its producer, answer the POST."""
        started = time.monotonic()
        try:
            producer = await self.log.create(
                owner=key_id, endpoint=ENDPOINT, id_prefix="resp_", status="queued",
                meta=restart_meta({"model": model, "background": "1"}, stream.request))
            encoder = ResponsesEncoder(**encoder_args, response_id=producer.stream_id,
                                       background=True)
            await producer.append(encoder.start("queued"))
        except StreamLogError as exc:
            lease.release(0)
            await stream.aclose()
            status = 503 if isinstance(exc, StreamLogFull) or exc.retryable else 500
            return self.gateway.rejected(GatewayHTTPError(
                status, f"the stream log cannot take this response now: {exc}",
                type="server_error", code=exc.code,
                headers={"retry-after": "1"} if status == 503 else None), request)
        self._spawn(self._produce(producer, stream, encoder, lease=lease, key_id=key_id,
                                  model=label(model), started=started), producer.stream_id)
        log_access(request.scope, 200, duration=time.monotonic() - started, model=model,
                   key=None if key_id == ANONYMOUS.id else key_id, outcome="queued")
        if not deliver:
            return JSONResponse(encoder.response("queued"))
        reader = await self.log.reader(producer.stream_id, after=-1, owner=key_id)
        return self.gateway.sse(self.deliver(reader))

    def _spawn(self, coro: Any, stream_id: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"background {stream_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _produce(self, producer: Producer, stream: AsyncStream,
                       encoder: ResponsesEncoder, *, lease: Lease, key_id: str, model: str,
                       started: float, progress: bool = True, answer_prefix: str = "",
                       ) -> None:
        """Run the model to the end, a cancel or the shutdown; every frame to the log
        (``progress``: ``response.in_progress`` first; a take-over whose response is in
        progress already continues with ``answer_prefix`` as the text so far)."""
        gw = self.gateway
        task = asyncio.current_task()
        assert task is not None
        gw.drain.add(task)
        gauge = gw.metrics.active_streams.labels(model)
        gauge.inc()
        # A cancel (from any process) or a lost lease sets the signal: cancel this task
        # where it waits (on the upstream, usually), as the drain does at shutdown.
        watcher = asyncio.ensure_future(_cancel_on(producer.signal, task))
        shutdown = False
        try:
            async with producer:
                try:
                    if progress:
                        await producer.append(encoder.progress(), status="in_progress")
                    async for event in stream:
                        frames = encoder.frames(event)
                        if not frames or producer.closed:
                            continue
                        if encoder.final_status is not None:
                            watcher.cancel()  # a cancel from now on finds it ended
                            await producer.finish(encoder.final_status, frames)
                        else:
                            await producer.append(frames)
                except asyncio.CancelledError as exc:
                    reason = exc.args[0] if exc.args else None
                    if not (is_shutdown(exc) or reason == _CANCEL):
                        raise
                    task.uncancel()
                    await stream.aclose()
                    if producer.lease_lost or producer.closed:
                        return  # another process holds the stream now, or it ended
                    if reason == _CANCEL:
                        frames = encoder.cancel()
                        await producer.finish("cancelled", frames)
                    else:
                        shutdown = True
                        await producer.finish("failed", encoder.frames(_SHUTDOWN_EVENT))
                if not producer.closed and not producer.lease_lost:
                    # The stream ended without a final event (it cannot, but never leave
                    # a response in_progress forever).
                    await producer.finish("failed", encoder.frames(ErrorEvent(
                        "stream_incomplete", "the answer ended without its final event",
                        False)))
        except LeaseLost:
            log.warning("background response %s: another process holds it now",
                        producer.stream_id)
        except StreamLogError as exc:
            # The store failed (Redis down, the stream over its cap): its readers learn
            # it from the lease (ProducerLost) once it lapses.
            log.warning("background response %s: the stream log failed: %s",
                        producer.stream_id, exc)
        finally:
            watcher.cancel()
            gw.drain.discard(task)
            gauge.dec()
            await stream.aclose()
            gw.finish(stream=stream, lease=lease, key_id=key_id, endpoint=ENDPOINT,
                      model=model, started=started, http_status=200, shutdown=shutdown,
                      answer_prefix=answer_prefix)

    async def aclose(self) -> None:
        """End the producers still running (the server stops): each ends its response
        ``failed`` with the shutdown error."""
        for task in list(self.tasks):
            task.cancel(SHUTDOWN)
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- deliver -------------------------------------------------------------------------

    async def deliver(self, reader: StreamReader) -> AsyncIterator[bytes]:
        """A response's frames from ``reader``'s cursor to the end (replay, then live).

        A producer that died (its lease lapsed) ends the stream with an ``error`` frame
        (``producer_lost``) and ``response.failed``, appended for every reader at once.
        """
        try:
            while True:
                try:
                    batch = await reader.read()
                except ProducerLost as lost:
                    if not await self.take_over(reader.stream_id):
                        await self._end_lost(reader.stream_id, lost.last_seq)
                    continue
                except StreamNotFound:
                    return  # expired or evicted meanwhile: nothing more to send
                if batch.frames:
                    yield b"".join(batch.frames)
                if reader.ended:
                    return
        finally:
            await reader.aclose()

    async def snapshot(self, stream_id: str, *, upto: int,
                       after: int = -1) -> ResponseSnapshot:
        """The response object rebuilt from frames ``after``+1 … ``upto``."""
        snap = ResponseSnapshot()
        if upto <= after:
            return snap
        reader = await self.log.reader(stream_id, after=after, owner=None)
        try:
            while reader.cursor < upto and not reader.ended:
                try:
                    batch = await reader.read(timeout=1.0)
                except ProducerLost:
                    break
                if not batch.frames:
                    break
                seq = batch.first_seq
                for data in batch.frames:
                    if seq > upto:
                        break
                    snap.feed(data)
                    seq += 1
        finally:
            await reader.aclose()
        return snap

    async def _end_lost(self, stream_id: str, last_seq: int, *,
                        status: str = "failed") -> bool:
        """End a stream whose producer is gone: ``response.failed`` (with an ``error``
        frame, ``producer_lost``) or ``response.cancelled`` when a cancel was asked."""
        snap = await self.snapshot(stream_id, upto=last_seq)
        seq = last_seq + 1
        frames: list[bytes] = []
        if status == "failed":
            error = {"code": "server_error", "message": _LOST_MESSAGE}
            frames.append(frame("error", seq, code="producer_lost", message=_LOST_MESSAGE,
                                param=None))
            frames.append(frame("response.failed", seq + 1,
                                response=snap.ended("failed", error=error)))
        else:
            frames.append(frame("response.cancelled", seq, response=snap.ended("cancelled")))
        ended = await self.log.end_lost(stream_id, last_seq=last_seq, frames=frames,
                                        status=status)  # type: ignore[arg-type]
        if ended and status == "failed":
            info = await self.log.info(stream_id, owner=None)
            if info is not None:
                record_lost(self.gateway, info, endpoint=ENDPOINT, answer=_text_of(snap),
                            message=_LOST_MESSAGE)
        return ended

    async def take_over(self, stream_id: str) -> bool:
        """Finish a response whose producer died here, if it can be (takeover.py): True
        when this process (or another) produces it now; False: end it ``producer_lost``."""
        state: dict[str, Any] = {}

        async def partial_of(info: StreamInfo) -> str | None:
            snap = await self.snapshot(stream_id, upto=info.last_seq)
            obj = snap.object()
            if obj is None or snap.final is not None:
                return None
            items = obj.get("output") or []
            if len(items) > 1 or (items and not _open_message(items[0])):
                return None  # a tool call, or more than one item: not a text to go on
            state["response"] = obj
            return _text_of(snap)

        found = await self.takeover.begin(stream_id, partial_of)
        if not isinstance(found, Resumption):
            return found is True
        response = state["response"]
        encoder = ResponsesEncoder.resumed(response, next_seq=found.producer.next_seq,
                                           route=found.route)
        stream = self.gateway.open(found.request, found.provider)
        self._spawn(self._produce(
            found.producer, stream, encoder, lease=unlimited_lease(),
            key_id=found.info.owner, model=label(found.model), started=time.monotonic(),
            progress=response.get("status") == "queued", answer_prefix=found.partial),
            stream_id)
        return True

    # -- endpoints -----------------------------------------------------------------------

    async def find(self, response_id: str, key_id: str) -> StreamInfo:
        info = await self.log.info(response_id, owner=key_id)
        if info is None or info.endpoint != ENDPOINT:
            raise not_found(response_id)
        return info

    async def retrieve(self, info: StreamInfo) -> dict[str, Any]:
        """The Response object as it stands: the final one, or the output so far."""
        if not info.ended and not info.producer_alive and info.last_seq >= 0:
            # Its producer is gone: finish it here, or end it for everyone, as a reader
            # would.
            if not await self.take_over(info.id):
                await self._end_lost(info.id, info.last_seq)
            info = await self.log.info(info.id, owner=None) or info
        if info.ended:
            # The final event carries the whole response: read just that frame.
            snap = await self.snapshot(info.id, upto=info.last_seq, after=info.last_seq - 1)
            if snap.final is not None:
                return snap.object() or {}
        snap = await self.snapshot(info.id, upto=info.last_seq)
        obj = snap.object()
        if obj is None:
            raise not_found(info.id)
        return obj

    async def stream(self, info: StreamInfo, *, after: int, key_id: str) -> SSEResponse:
        try:
            reader = await self.log.reader(info.id, after=after, owner=key_id)
        except StreamNotFound:
            raise not_found(info.id) from None
        except ValueError as exc:
            raise GatewayHTTPError(400, f"invalid starting_after: {exc}",
                                   param="starting_after", code="invalid_value") from None
        return self.gateway.sse(self.deliver(reader))

    async def cancel(self, response_id: str, key_id: str) -> dict[str, Any]:
        """Cancel (idempotent) and answer the final Response object."""
        before = await self.find(response_id, key_id)
        if before.ended:
            if before.status != "cancelled":
                raise GatewayHTTPError(400, f"Cannot cancel a {before.status} response.",
                                       code="response_not_cancellable")
            return await self.retrieve(before)
        info = await self.log.cancel(response_id, owner=key_id)
        if info is None:
            raise not_found(response_id)
        if not info.ended:
            info = await self._wait_end(info)
        if info.ended and info.status not in ("cancelled",):
            # It ended on its own before the cancel reached it: say so, as OpenAI does.
            raise GatewayHTTPError(400, f"Cannot cancel a {info.status} response.",
                                   code="response_not_cancellable")
        return await self.retrieve(info)

    async def _wait_end(self, info: StreamInfo) -> StreamInfo:
        """Wait (bounded) for the producer to end a cancelled stream; a producer that is
        gone cannot: the stream is ended ``cancelled`` here."""
        reader = await self.log.reader(info.id, after=max(info.last_seq, -1), owner=None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_S
        try:
            while not reader.ended:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await reader.read(timeout=remaining)
                except ProducerLost as lost:
                    await self._end_lost(info.id, lost.last_seq, status="cancelled")
                except StreamNotFound:
                    break
        finally:
            await reader.aclose()
        return await self.log.info(info.id, owner=None) or info


def _open_message(item: Any) -> bool:
    return (isinstance(item, dict) and item.get("type") == "message"
            and item.get("status") == "in_progress")


def _text_of(snap: ResponseSnapshot) -> str:
    """The text of a response's (first) message so far."""
    for item in snap.items:
        if item.get("type") == "message":
            return "".join(str(p.get("text", "")) for p in item.get("content") or []
                           if isinstance(p, dict))
    return ""


def parse_starting_after(value: str | None) -> int:
    """``starting_after`` from the query string: -1 when absent, else an integer ≥ 0."""
    if value is None or value == "":
        return -1
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise GatewayHTTPError(400, f"invalid starting_after {value[:40]!r}: expected the"
                               " sequence number of an event (an integer >= 0)",
                               param="starting_after", code="invalid_value")
    return int(value)


async def _cancel_on(signal: asyncio.Event, task: asyncio.Task[Any]) -> None:
    await signal.wait()
    task.cancel(_CANCEL)



class BackgroundEndpoints:
    """``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel`` (Starlette)."""

    def __init__(self, background: BackgroundResponses) -> None:
        self.background = background
        self.gateway = background.gateway

    async def retrieve(self, request: HTTPRequest) -> Response | SSEResponse:
        """``GET /v1/responses/{id}`` (``?stream=true&starting_after=N`` replays)."""
        response_id = request.path_params["response_id"]
        try:
            key = self.gateway.auth.check(request.headers)  # type: ignore[arg-type]
            query = request.query_params
            stream = _flag(query.get("stream"), "stream")
            after = parse_starting_after(query.get("starting_after"))
            if not stream and "starting_after" in query:
                raise GatewayHTTPError(400, "starting_after needs stream=true",
                                       param="starting_after", code="invalid_value")
            info = await self.background.find(response_id, key.id)
            if stream:
                return await self.background.stream(info, after=after, key_id=key.id)
            return JSONResponse(await self.background.retrieve(info))
        except GatewayHTTPError as exc:
            return self.gateway.rejected(exc, request)
        except StreamLogError as exc:
            return self.gateway.rejected(_unavailable(exc), request)

    async def cancel(self, request: HTTPRequest) -> Response:
        """``POST /v1/responses/{id}/cancel``."""
        response_id = request.path_params["response_id"]
        try:
            key = self.gateway.auth.check(request.headers)  # type: ignore[arg-type]
            return JSONResponse(await self.background.cancel(response_id, key.id))
        except GatewayHTTPError as exc:
            return self.gateway.rejected(exc, request)
        except StreamLogError as exc:
            return self.gateway.rejected(_unavailable(exc), request)


def _flag(value: str | None, name: str) -> bool:
    if value is None or value.lower() in ("", "false", "0"):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise GatewayHTTPError(400, f"invalid {name} {value[:40]!r}: expected true or false",
                           param=name, code="invalid_value")


def _unavailable(exc: StreamLogError) -> GatewayHTTPError:
    return GatewayHTTPError(503, f"the stream log is unavailable: {exc}", type="server_error",
                            code=exc.code, headers={"retry-after": "1"})
