"""Delivering a stream from the log by its id: resume (replay, then follow live) and cancel.

``GET …/{id}/stream`` (with ``Last-Event-ID`` or ``?starting_after=N``) replays the
frames after N as stored (their SSE ``id:`` is inside them) and follows the stream live
to its final frame, with the gateway's heartbeat and send timeout. ``POST …/{id}/cancel``
asks the stream's producer to stop, from any process (``StreamLog.cancel``), and answers
the stream's state once it ended (or after a short wait).

Owner binding: only the key that created a stream reads or cancels it; for any other
key, an id that does not exist and one of another endpoint alike, the answer is 404
(existence is never revealed). Without keys every request is the same anonymous owner:
the id (128 random bits) is the capability.

A resume is admitted like any request (key, Host guard) but takes no concurrency slot or
tokens: the stream it reads was admitted once, when it was created.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from .access import log_access
from .encode import PRODUCER_LOST, PRODUCER_LOST_MESSAGE
from .security import GatewayHTTPError
from .shutdown import is_shutdown
from .sse import BreakConnection, SSEResponse
from .streamlog import (
    ProducerLost,
    StreamInfo,
    StreamLogError,
    StreamNotFound,
    StreamReader,
    valid_stream_id,
)
from .takeover import StreamTakeOver

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["Delivery", "parse_after"]

log = logging.getLogger("tokenrelay.server")

#: Builds a stream's error frame numbered ``seq`` the endpoint's way (code, message).
ErrorFrame = Callable[[int, str, str], bytes]

_FRAME_NUMBER = re.compile(r"[0-9]{1,18}")
#: How long a cancel waits for the stream to reach its end before answering.
CANCEL_WAIT_S = 2.0
#: After the drain deadline a follower reads on this long for its stream's last frame.
_SHUTDOWN_READ_S = 1.0


def parse_after(request: HTTPRequest) -> int:
    """The frame a resume starts after: ``Last-Event-ID`` (what a browser's EventSource
    sends on reconnecting; it wins), else ``?starting_after=N``, else -1 (from the start)."""
    raw = request.headers.get("last-event-id")
    name = "Last-Event-ID"
    if raw is None:
        raw = request.query_params.get("starting_after")
        name = "starting_after"
    if raw is None:
        return -1
    value = raw.strip()
    if not _FRAME_NUMBER.fullmatch(value):
        raise GatewayHTTPError(
            400, f"{name} must be a frame number (an integer >= 0, the SSE id of the last"
            f" frame received), got {raw[:40]!r}", param=name, code="invalid_value")
    return int(value)


def _not_found(stream_id: str) -> GatewayHTTPError:
    return GatewayHTTPError(
        404, f"No stream found with id {stream_id[:140]!r} (unknown, expired, or not"
        " created with this API key)", param="id", code="stream_not_found")


class Delivery:
    """Resume and cancel of the streams of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        #: Streams whose producing process died: continued here, or ended typed.
        self.takeover = StreamTakeOver(gateway)

    async def resume(self, request: HTTPRequest, *, endpoint: str,
                     error_frame: ErrorFrame) -> Response | SSEResponse:
        """``GET …/{id}/stream``: the frames after the client's cursor, then live."""
        gw = self.gateway
        stream_id = request.path_params["id"]
        try:
            key = gw.auth.check(request.headers)  # type: ignore[arg-type]
            request.scope["tokenrelay.key"] = key.id
            after = parse_after(request)
            if not valid_stream_id(stream_id):
                raise _not_found(stream_id)
            try:
                reader = await gw.streams.reader(stream_id, after=after, owner=key.id)
            except StreamNotFound:
                raise _not_found(stream_id) from None
            except ValueError as exc:  # ended, and the cursor is beyond its last frame
                name = ("Last-Event-ID" if "last-event-id" in request.headers
                        else "starting_after")
                raise GatewayHTTPError(400, f"{name} {after}: {exc}", param=name,
                                       code="invalid_value") from exc
            except StreamLogError as exc:
                raise _unavailable(exc) from exc
            if reader.info.endpoint != endpoint:
                await reader.aclose()
                raise _not_found(stream_id)
        except GatewayHTTPError as exc:
            return gw.rejected(exc, request)
        gw.metrics.resumes.labels(endpoint).inc()
        production = gw.productions.get(stream_id)
        if production is not None:
            production.resumes += 1
        elif gw.reqlog is not None:
            gw.reqlog.add_resume(stream_id)  # its row is written (or in another process)
        return gw.sse(self._frames(reader, endpoint, error_frame, request.scope),
                      headers=[(b"x-tokenrelay-stream-id", stream_id.encode())],
                      wait_first=0.0)

    async def _frames(self, reader: StreamReader, endpoint: str, error_frame: ErrorFrame,
                      scope: Any) -> AsyncIterator[bytes]:
        gw = self.gateway
        stored = reader.info.last_seq  # frames up to this one are replayed
        replayed = 0
        started = time.monotonic()
        status = 200
        deadline: float | None = None
        task = asyncio.current_task()
        gw.drain.add(task)
        try:
            while not reader.ended:
                try:
                    if deadline is None:
                        batch = await reader.read()
                    else:
                        batch = await reader.read(max(0.0, deadline - time.monotonic()))
                        if not batch.frames and time.monotonic() >= deadline:
                            return
                except ProducerLost as exc:
                    # Its producing process died: finish the answer here if the model can
                    # continue it (takeover.py), else end it with a typed error.
                    if await self.takeover.attempt(reader.stream_id, endpoint):
                        continue  # reads the rest, from this process or another
                    seq = exc.last_seq + 1
                    frame = error_frame(seq, PRODUCER_LOST, PRODUCER_LOST_MESSAGE)
                    if await gw.streams.end_lost(reader.stream_id, last_seq=exc.last_seq,
                                                 frames=[frame]):
                        await self.takeover.lost(reader.stream_id, endpoint,
                                                 message=PRODUCER_LOST_MESSAGE)
                    continue  # reads the end: this one, or another reader's or producer's
                except asyncio.CancelledError as exc:
                    if task is None or not is_shutdown(exc):
                        raise
                    task.uncancel()
                    if gw.streams.shared:
                        # The drain, with other processes sharing the log: the stream
                        # goes on there (or is handed off by this one): the client
                        # resumes on one of them from what it has.
                        raise BreakConnection(f"stream {reader.stream_id}: this process"
                                              " is shutting down") from None
                    # The drain: the stream's own producer (here) ends it now; read on
                    # shortly for that end, then let the client resume elsewhere.
                    gw.drain.discard(task)
                    deadline = time.monotonic() + _SHUTDOWN_READ_S
                    continue
                except StreamLogError as exc:
                    log.warning("resume of stream %s: %s", reader.stream_id, exc)
                    status = 502
                    return  # (no frame: its number would not be the log's)
                if not batch.frames:
                    continue
                if batch.first_seq <= stored:
                    replayed += min(batch.last_seq, stored) - batch.first_seq + 1
                yield b"".join(batch.frames) if len(batch.frames) > 1 else batch.frames[0]
        finally:
            gw.drain.discard(task)
            if replayed:
                gw.metrics.replayed_frames.labels(endpoint).inc(replayed)
            try:
                await reader.aclose()
            except StreamLogError:
                pass
            log_access(scope, status, duration=time.monotonic() - started)

    async def cancel(self, request: HTTPRequest, *, endpoint: str) -> Response:
        """``POST …/{id}/cancel``: stop the stream (idempotent); its state, as JSON."""
        gw = self.gateway
        stream_id = request.path_params["id"]
        try:
            key = gw.auth.check(request.headers)  # type: ignore[arg-type]
            request.scope["tokenrelay.key"] = key.id
            if not valid_stream_id(stream_id):
                raise _not_found(stream_id)
            try:
                info = await gw.streams.info(stream_id, owner=key.id)
                if info is None or info.endpoint != endpoint:
                    raise _not_found(stream_id)
                if not info.ended:
                    info = await gw.streams.cancel(stream_id, owner=key.id) or info
                    if not info.ended:
                        gw.metrics.stream_cancels.labels(endpoint).inc()
                        info = await self._until_ended(info, key.id)
            except StreamLogError as exc:
                raise _unavailable(exc) from exc
        except GatewayHTTPError as exc:
            return gw.rejected(exc, request)
        return JSONResponse(stream_state(info))

    async def _until_ended(self, info: StreamInfo, owner: str) -> StreamInfo:
        """The stream's record once it ended, or as it is after ``CANCEL_WAIT_S``."""
        gw = self.gateway
        production = gw.productions.get(info.id)
        if production is not None:
            try:
                async with asyncio.timeout(CANCEL_WAIT_S):
                    await production.wait()
            except TimeoutError:
                pass
            return await gw.streams.info(info.id, owner=owner) or info
        deadline = time.monotonic() + CANCEL_WAIT_S
        while not info.ended and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # produced by another process: look again
            info = await gw.streams.info(info.id, owner=owner) or info
        return info


def stream_state(info: StreamInfo) -> dict[str, Any]:
    """A stream's state as the cancel endpoint answers it."""
    return {"id": info.id, "object": "stream", "status": info.status,
            "last_event_id": info.last_seq, "created_at": int(info.created_at),
            "cancel_requested": info.cancel_requested}


def _unavailable(exc: StreamLogError) -> GatewayHTTPError:
    return GatewayHTTPError(503, f"the stream log is unavailable now ({exc.code}); try again"
                            " in a moment", type="server_error", code=exc.code,
                            headers={"retry-after": "1"})
