"""Background responses (OpenAI's ``background: true``): generation that outlives its
request, kept in the stream log, retrieved, replayed and cancelled from any process.

``POST /v1/responses`` with ``background: true`` creates the response's stream
(``resp_`` + 128 random bits, owned by the caller's key) with its ``response.created``
frame (status ``queued``) and answers at once: the ``queued`` Response object, or with
``stream: true`` the stream read from the log. The answer is produced by the shared path
(``producing.py``, :meth:`Gateway.produce_detached`) in a task of the gateway's, with no
client: nothing a client does stops it but a cancel (or the server shutting down); a
disconnect only ends a delivery.

* ``GET /v1/responses/{id}``: the Response object rebuilt from the stored frames
  (``response_snapshot.py``): final, or the output so far.
* ``GET /v1/responses/{id}?stream=true&starting_after=N``: frames N+1, … then live, each
  with SSE ``id:`` = ``sequence_number`` (``delivery.py``'s resume, this endpoint's
  error frame).
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
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from .._stream import AsyncStream
from .access import log_access
from .delivery import Delivery
from .encode import PRODUCER_LOST, PRODUCER_LOST_MESSAGE
from .gateway import STREAM_ID_HEADER, Gateway
from .response_snapshot import ResponseSnapshot, frame, response_error_frame
from .responses import ResponsesEncoder
from .routing import label
from .security import ANONYMOUS, GatewayHTTPError, Lease
from .sse import SSEResponse
from .streamlog import (
    FinalStatus,
    ProducerLost,
    StreamInfo,
    StreamLogError,
    StreamNotFound,
    StreamReader,
)
from .takeover import restart_meta

__all__ = ["BackgroundResponses"]

log = logging.getLogger("tokenrelay.server")

ENDPOINT = "responses"
#: How long ``POST …/cancel`` waits for the producer to end the stream (it does within a
#: tick: the upstream read is cancelled where it waits).
CANCEL_WAIT_S = 5.0


def not_found(response_id: str) -> GatewayHTTPError:
    # OpenAI's wording. Unknown, expired, evicted or another key's: never said which.
    return GatewayHTTPError(404, f"Response with id '{response_id[:140]}' not found.",
                            code="not_found", param="response_id")


class BackgroundResponses:
    """The background responses of one gateway: create, deliver, retrieve, cancel."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.log = gateway.streams
        self.delivery = Delivery(gateway)

    # -- create --------------------------------------------------------------------------

    async def start(self, request: HTTPRequest, encoder_args: dict[str, Any], *,
                    stream: AsyncStream, lease: Lease, key_id: str, model: str,
                    route: str | None, deliver: bool) -> Response | SSEResponse:
        """Create the response's stream, start its producer, answer the POST."""
        gw = self.gateway
        started = time.monotonic()
        try:
            producer = await self.log.create(
                owner=key_id, endpoint=ENDPOINT, id_prefix="resp_", status="queued",
                meta=restart_meta({"model": model[:200], "background": "1"},
                                  stream.request, self.log))
            encoder = ResponsesEncoder(**encoder_args, response_id=producer.stream_id,
                                       background=True)
            await producer.append(encoder.start("queued"))
            # No queue in front of the model: it starts now.
            await producer.append(encoder.progress(), status="in_progress")
        except StreamLogError as exc:
            lease.release(0)
            await stream.aclose()
            log.warning("the stream log refused a background response: %s", exc)
            return gw.rejected(GatewayHTTPError(
                503, f"the gateway cannot keep a new response now ({exc.code}); try again"
                " in a moment", type="server_error", code=exc.code,
                headers={"retry-after": "1"}), request)
        # The shared producing path (producing.py), with no client: to the end, a cancel
        # from any process, or the drain; bookkeeping once, when it ends.
        gw.produce_detached(stream, encoder, producer, lease=lease, key_id=key_id,
                            endpoint=ENDPOINT, model=label(model), route=route)
        log_access(request.scope, 200, duration=time.monotonic() - started, model=model,
                   key=None if key_id == ANONYMOUS.id else key_id, outcome="queued")
        if not deliver:
            return JSONResponse(encoder.response("queued"))
        reader = await self.log.reader(producer.stream_id, after=-1, owner=key_id)
        return gw.sse(self.deliver(reader), wait_first=0.0,
                      headers=[(STREAM_ID_HEADER, producer.stream_id.encode())])

    # -- deliver -------------------------------------------------------------------------

    async def deliver(self, reader: StreamReader) -> AsyncIterator[bytes]:
        """A response's frames from ``reader``'s cursor to the end (the answer to a
        ``stream: true`` POST: no resume to count, unlike ``delivery.py``'s).

        A producer that died (its lease lapsed) ends the stream with one ``error`` frame
        (``producer_lost``), appended for every reader at once.
        """
        try:
            while True:
                try:
                    batch = await reader.read()
                except ProducerLost as lost:
                    # Finished here if the model can go on (takeover.py), else ended.
                    if not await self.delivery.takeover.attempt(reader.stream_id, ENDPOINT):
                        await self._end_lost(reader.stream_id, lost.last_seq)
                    continue  # reads the rest or the end: this one, or another reader's
                except StreamNotFound:
                    return  # expired or evicted meanwhile: nothing more to send
                except StreamLogError as exc:
                    # (no frame: its number would not be the log's; the client can
                    # resume from its last id)
                    log.warning("background response %s: %s", reader.stream_id, exc)
                    return
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
                        status: FinalStatus = "failed") -> bool:
        """End a stream whose producer is gone, for every reader: one ``error`` frame
        (``producer_lost``, as ``delivery.py`` ends any stream), or ``response.cancelled``
        (with the output so far) when a cancel is waiting for it."""
        if status == "failed":
            frames = [response_error_frame(last_seq + 1, PRODUCER_LOST,
                                           PRODUCER_LOST_MESSAGE)]
        else:
            snap = await self.snapshot(stream_id, upto=last_seq)
            frames = [frame("response.cancelled", last_seq + 1,
                            response=snap.ended("cancelled"))]
        ended = await self.log.end_lost(stream_id, last_seq=last_seq, frames=frames,
                                        status=status)
        if ended and status == "failed":
            await self.delivery.takeover.lost(stream_id, ENDPOINT,
                                              message=PRODUCER_LOST_MESSAGE)
        return ended

    # -- endpoints -----------------------------------------------------------------------

    async def find(self, response_id: str, key_id: str) -> StreamInfo:
        info = await self.log.info(response_id, owner=key_id)
        if info is None or info.endpoint != ENDPOINT:
            raise not_found(response_id)
        return info

    async def retrieve(self, info: StreamInfo) -> dict[str, Any]:
        """The Response object as it stands: the final one, or the output so far."""
        if (not info.ended and not info.producer_alive and info.last_seq >= 0
                and not self.delivery.takeover.stopping()):
            # Its producer is gone: finish it here (takeover.py) or end it for everyone,
            # as a reader would.
            if not await self.delivery.takeover.attempt(info.id, ENDPOINT):
                await self._end_lost(info.id, info.last_seq)
            info = await self.log.info(info.id, owner=None) or info
        if info.ended:
            # The final event carries the whole response: read just that frame.
            snap = await self.snapshot(info.id, upto=info.last_seq, after=info.last_seq - 1)
            if snap.final is not None:
                return snap.object() or {}
        snap = await self.snapshot(info.id, upto=info.last_seq)
        if snap.response is None:
            raise not_found(info.id)
        if info.ended and snap.final is None:
            # Ended by an error frame alone (its producer lost): the output so far.
            return snap.ended(info.status, error=snap.error)
        return snap.object() or {}

    async def stream(self, request: HTTPRequest) -> Response | SSEResponse:
        """A replay from the request's cursor, then live: ``delivery.py``'s resume (the
        resume metrics, the request log's count), with this endpoint's error frame."""
        return await self.delivery.resume(request, endpoint=ENDPOINT,
                                          error_frame=response_error_frame)

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


def parse_starting_after(value: str | None) -> int:
    """``starting_after`` from the query string: -1 when absent, else an integer ≥ 0."""
    if value is None or value == "":
        return -1
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise GatewayHTTPError(400, f"invalid starting_after {value[:40]!r}: expected the"
                               " sequence number of an event (an integer >= 0)",
                               param="starting_after", code="invalid_value")
    return int(value)


class BackgroundEndpoints:
    """``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel`` (Starlette)."""

    def __init__(self, background: BackgroundResponses) -> None:
        self.background = background
        self.gateway = background.gateway

    async def retrieve(self, request: HTTPRequest) -> Response | SSEResponse:
        """``GET /v1/responses/{id}`` (``?stream=true&starting_after=N`` replays)."""
        response_id = request.path_params["id"]
        try:
            key = self.gateway.auth.check(request.headers)  # type: ignore[arg-type]
            query = request.query_params
            stream = _flag(query.get("stream"), "stream")
            parse_starting_after(query.get("starting_after"))
            if not stream and "starting_after" in query:
                raise GatewayHTTPError(400, "starting_after needs stream=true",
                                       param="starting_after", code="invalid_value")
            info = await self.background.find(response_id, key.id)
            if stream:
                return await self.background.stream(request)
            return JSONResponse(await self.background.retrieve(info))
        except GatewayHTTPError as exc:
            return self.gateway.rejected(exc, request)
        except StreamLogError as exc:
            return self.gateway.rejected(_unavailable(exc), request)

    async def cancel(self, request: HTTPRequest) -> Response:
        """``POST /v1/responses/{id}/cancel``."""
        response_id = request.path_params["id"]
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
