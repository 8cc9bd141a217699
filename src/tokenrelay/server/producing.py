"""Producing one streamed answer: provider events → encoded frames → the stream log, and
to the client that asked for it while it is there.

A :class:`Production` is one generator (:meth:`Production.frames`) that the client's
``SSEResponse`` iterates: each event is encoded, its frames appended to the stream log
(``server/streamlog/``), then yielded to the client. There is no task or queue between
the provider and the socket:

* memory store: the append is a list extend in this task (``append_nowait``), nothing
  awaited, so a client that stays connected pays a few attribute updates per frame;
* other stores (Redis): the append is awaited before the frame is yielded, so a client
  never receives a frame that a resume elsewhere could not replay. The store's writer
  sends every append that is ready in one pipelined call (group commit), never a round
  trip per frame of each stream on its own.

Every stream ends in the log with a final status and a final frame, whatever ends it:
``completed`` / ``incomplete`` (``length``, ``content_filter``) / ``failed`` (an error,
a shutdown, the log failing) / ``cancelled`` (a cancel, the client gone, the grace over)
— or it is *handed off*: at the drain deadline, with a store other processes share
(Redis), a stream still running is given up unfinished (:meth:`Production._hand_off`) and
another process takes it over and ends it (``shutdown.py``, ``takeover.py``).

**Stop.** The producer's ``signal`` (a cancel from any process, or the lease lost) calls
:meth:`Production._signalled` (``Producer.on_signal``: no task waits for it), and once
the client is gone one watcher task times the resume grace; nothing runs per frame for
either. A stop cancels the task that runs the loop with :data:`~.sse.STOP`: the loop
takes the cancellation back, aborts the upstream, ends the stream in the log and gives
the client still attached the typed end (an error frame with ``"code": "cancelled"``).

**Detach.** When the client goes away: without a grace (the default) its response
cancels the loop, the upstream is aborted at once and the stream ends ``cancelled``.
With a grace (``x-tokenrelay-resume-grace``), the response lets go of the generator at
its next frame and hands it to a task of the gateway (:meth:`Production.hand_over`),
which runs it on, appending, until the end, a cancel, or ``grace`` seconds with no
reader attached (``Producer.readers`` / ``readers_seen_at``); then the upstream is
aborted. :meth:`Production.run_detached` starts a production with no client at all
(``background: true``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine, MutableMapping, Sequence
from typing import Any, Protocol

from .._stream import AsyncStream
from ..events import Done, ErrorEvent, StreamEvent, TextDelta
from .encode import (
    PRODUCER_LOST,
    PRODUCER_LOST_MESSAGE,
    SERVER_SHUTDOWN,
    SHUTDOWN_MESSAGE,
    STREAM_CANCELLED,
    dumps,
    error_body,
    error_from_exc,
    error_status,
)
from .metrics import GatewayMetrics
from .security import Lease
from .shutdown import Drain, is_shutdown
from .sse import STOP, BreakConnection, EarlyResponse
from .streamlog import (
    FinalStatus,
    LeaseLost,
    Producer,
    StreamInfo,
    StreamLog,
    StreamLogError,
)

__all__ = ["Encoder", "Production", "ProductionHost", "split_frames"]

log = logging.getLogger("tokenrelay.server")

#: A stream's final status in the log, by the core finish reason.
FINAL_STATUS: dict[str, FinalStatus] = {
    "stop": "completed", "tool_calls": "completed", "length": "incomplete",
    "content_filter": "incomplete", "error": "failed", "cancelled": "cancelled"}

#: How often a detached stream looks again while a reader is attached (the Redis store
#: counts readers at each lease refresh, every 0.5 s).
_READER_RECHECK_S = 0.25

_SHUTDOWN_EVENT = ErrorEvent(SERVER_SHUTDOWN, SHUTDOWN_MESSAGE, True)
_STOP_MESSAGES = {
    "cancel": "the stream was cancelled (POST …/cancel)",
    "gone": "the client went away before the end of the stream",
}


class Encoder(Protocol):
    """An endpoint's encoder: events → SSE frames, numbered from ``next_seq``."""

    next_seq: int

    def encode(self, event: StreamEvent) -> bytes: ...


class ProductionHost(Protocol):
    """What a production needs of its gateway (``gateway.Gateway``)."""

    drain: Drain
    metrics: GatewayMetrics
    streams: StreamLog

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]: ...

    def produced(self, production: Production, *, started: float,
                 shutdown: bool) -> None: ...

    def continuable(self, info: StreamInfo) -> bool: ...


def split_frames(data: bytes, n: int) -> list[bytes]:
    """The ``n`` SSE frames joined in ``data`` (an encoder's answer to one event).

    Frames end with a blank line, and nothing inside one has a raw newline (JSON on one
    ``data:`` line each), so the blank lines are exactly the boundaries.
    """
    if n == 1:
        return [data]
    if n == 0:
        if data:
            raise RuntimeError("an encoder returned frames without numbering them")
        return []
    parts = data.split(b"\n\n")
    if len(parts) != n + 1 or parts[-1]:
        raise RuntimeError(f"an encoder returned {len(parts) - 1} frames numbered as {n}")
    return [part + b"\n\n" for part in parts[:-1]]


class Production:
    """One streamed answer: its core stream, encoder, lease on the stream log, and the
    bookkeeping of its request (limits lease, key, endpoint, model)."""

    def __init__(self, host: ProductionHost, *, stream: AsyncStream, encoder: Encoder,
                 producer: Producer, lease: Lease, key_id: str, endpoint: str, model: str,
                 route: str | None = None, scope: MutableMapping[str, Any] | None = None,
                 grace: float = 0.0, keep: bool = False) -> None:
        self.host = host
        self.stream = stream
        self.encoder = encoder
        self.producer = producer
        #: The stream's id in the log (the chunks' ``id``, the resume / cancel URL's).
        self.id = producer.stream_id
        self.lease = lease
        self.key_id = key_id
        self.endpoint = endpoint
        self.model = model
        self.route = route
        self.scope = scope
        #: Seconds the stream goes on without a reader once its client left (0: none).
        self.grace = grace
        #: Run to the end (or a cancel) without any client: a background response.
        self.keep = keep
        #: The HTTP status the client got (499: it left before the first frame).
        self.http_status = 499
        #: The task running the loop now (the client's response's, then the gateway's).
        self.task: asyncio.Task[Any] | None = None
        #: Why the loop is being stopped: "cancel", "grace", "lost" (None: it is not).
        self.stop_reason: str | None = None
        #: ``time.monotonic()`` when the client left (None: attached, or never had one).
        self.gone_at: float | None = None
        #: Resumes of this stream served by this process while it was produced.
        self.resumes = 0
        #: The partial answer of a taken-over stream (``takeover.py``): written before
        #: this production's text in the request log's row.
        self.answer_prefix = ""
        #: The log has the stream's final frame (or cannot take it any more).
        self.ended = False
        #: Given up unfinished at shutdown for another process to finish (``_hand_off``).
        self.handed_off = False
        #: The frames of the stream's normal end, once known (what its client gets).
        self._final = b""
        self.final_status: FinalStatus | None = None
        self._watcher: asyncio.Task[None] | None = None
        #: Frames numbered by the encoder but not in the log yet: an error event's (sent
        #: with the end) or an append's that failed.
        self._unlogged: list[bytes] = []
        #: The reply of an append in flight (stores whose appends are futures).
        self._inflight: asyncio.Future[Any] | None = None
        self._inflight_frames: Sequence[bytes] = ()
        self._append_soon = getattr(producer, "append_soon", None)
        self._done: asyncio.Future[None] | None = None
        producer.on_signal = self._signalled

    # -- the loop ----------------------------------------------------------------------

    async def frames(self) -> AsyncIterator[bytes]:
        """The frames of the stream, each in the log before it is yielded; bookkeeping
        in ``finally`` (end, error, disconnect, stop)."""
        host, stream, encoder, producer = self.host, self.stream, self.encoder, self.producer
        encode = encoder.encode
        append = getattr(producer, "append_nowait", None)  # memory: no await per frame
        text_delta = TextDelta
        started = time.monotonic()
        gauge = host.metrics.active_streams.labels(self.model)
        gauge.inc()
        shutdown = False
        frame = b""
        if self.task is None:
            self.task = asyncio.current_task()
            host.drain.add(self.task)
        if producer.signal.is_set():  # cancelled before it started
            self._signalled()
        try:
            stream.pin_task()  # one task iterates it at a time (hand_over re-pins)
            events = stream.__aiter__()
            while True:  # (again only after the lease was taken back: _retake)
                try:
                    if self.http_status == 499:
                        async for event in events:  # up to the first frame
                            frame = encode(event)
                            if (type(event) is text_delta and append is not None
                                    and encoder.next_seq - producer.next_seq == 1):
                                append((frame,))
                            else:
                                frame = await self._other(event, frame)
                                if not frame:
                                    continue
                            self.http_status = 200
                            yield frame
                            break
                    async for event in events:
                        frame = encode(event)
                        if (type(event) is text_delta and append is not None
                                and encoder.next_seq - producer.next_seq == 1):
                            append((frame,))  # the hot path: a list extend, then the send
                            yield frame
                        else:
                            frame = await self._other(event, frame)
                            if frame:
                                yield frame
                    break
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if task is not None and is_shutdown(exc):
                        task.uncancel()  # the drain's cancellation
                        if self._final and self.final_status is not None:
                            # It came while the end was written: the end stands.
                            if self.gone_at is None and not self.keep:
                                yield self._final
                            break
                        if await self._hand_off():
                            # Another process finishes it; the attached client resumes
                            # there (its connection broken, never ended as complete).
                            if self.gone_at is None and not self.keep:
                                raise BreakConnection(
                                    f"stream {self.id} handed off at shutdown") from None
                            break
                        shutdown = True  # answer it, as an error
                        frame = await self._stop_with(_SHUTDOWN_EVENT, "failed")
                        if self.http_status == 499:
                            self.http_status = 503
                            body = dumps(error_body(SHUTDOWN_MESSAGE, type="server_error",
                                                    code=SERVER_SHUTDOWN))
                            raise EarlyResponse(503, body, [
                                (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"retry-after", b"1")], frame=frame) from None
                        yield frame
                    elif task is not None and exc.args and exc.args[0] == STOP \
                            and self.stop_reason is not None:
                        task.uncancel()  # ours: a cancel, the grace over, the lease lost
                        if self.stop_reason == "lost" and await self._retake():
                            producer = self.producer
                            frame = await self._append_unlogged()
                            if frame:
                                yield frame
                            continue
                        frame = await self._stopped()
                        if self.gone_at is None and not self.keep:
                            self.http_status = 200
                            yield frame  # the attached client's typed end
                    else:
                        raise  # the client left (no grace): ``finally`` ends the stream
                except StreamLogError as exc:
                    # The log refused a frame (over max_stream_bytes, lease lost, store
                    # down): the stream fails with that error, never a silent end.
                    if frame and encoder.next_seq > producer.next_seq + len(self._unlogged):
                        self._unlogged.append(frame)  # (the hot path's rejected frame)
                    if isinstance(exc, LeaseLost) and await self._retake():
                        producer = self.producer
                        frame = await self._append_unlogged()
                        if frame:
                            yield frame
                        continue
                    log.warning("stream %s: the stream log failed: %s", self.id, exc)
                    frame = await self._stop_with(ErrorEvent(exc.code, exc.message),
                                                  "failed")
                    if self.gone_at is None and not self.keep:
                        yield frame
                break
        finally:
            # From here nothing may cancel this task (a cancel now would cut the
            # bookkeeping short): _stop sees a reason and lets it be.
            self.stop_reason = self.stop_reason or "gone"
            host.drain.discard(self.task)
            gauge.dec()
            self._unwatch()
            await stream.aclose()  # the upstream first: nobody waits for the log
            if not self.ended:
                # The client left without a grace, or an unexpected exception.
                reason = self.stop_reason or "gone"
                status: FinalStatus = "failed" if stream.error is not None else "cancelled"
                await self._settle()
                end = (ErrorEvent(STREAM_CANCELLED, _STOP_MESSAGES.get(reason, reason))
                       if status == "cancelled" else ErrorEvent(
                           stream.error.code, stream.error.message))  # type: ignore[union-attr]
                await self._end(status, encode(end))
            producer.on_signal = None  # (a cycle through the producer otherwise)
            if not producer.closed:
                try:
                    await producer.release()
                except StreamLogError:
                    pass  # unreachable store: the lease expires on its own
            done = self._done
            if done is not None and not done.done():
                done.set_result(None)
            host.produced(self, started=started, shutdown=shutdown)

    async def _other(self, event: StreamEvent, frame: bytes) -> bytes:
        """Anything but a one-frame text delta on the memory store: what to yield."""
        n = self.encoder.next_seq - self.producer.next_seq - len(self._unlogged)
        frames = split_frames(frame, n)
        if isinstance(event, ErrorEvent):
            self._unlogged += frames  # sent with the end, by the Done that follows
            return b""
        if isinstance(event, Done):
            status = FINAL_STATUS.get(event.finish_reason, "completed")
            final = self._unlogged + frames
            if not final:  # (an encoder that writes nothing for this end)
                ended = ErrorEvent(STREAM_CANCELLED, _STOP_MESSAGES["gone"])
                return await self._stop_with(ended, "cancelled")
            self._unlogged = []
            joined = frame if len(final) == len(frames) else b"".join(final)
            error = self.stream.error
            self._final = joined  # (a drain interrupting the write sends it: frames())
            await self._end(status, b"", final)
            if self.http_status == 499 and error is not None and not self.stream.text:
                # Failed before anything was sent: a real HTTP error status.
                self.http_status = error_status(error)
                body = dumps(error_from_exc(error, self.route))
                raise EarlyResponse(self.http_status, body, [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ] + _retry_after(error), frame=joined)
            return joined
        if not frames:
            return b""
        await self._append(frames)
        return frame

    async def _append(self, frames: Sequence[bytes]) -> None:
        producer = self.producer
        try:
            soon = self._append_soon
            if soon is None:
                await producer.append(frames)
                return
            # Shielded: a cancellation of this task leaves the append going, and the
            # stop path waits for it (_settle) so that the stream's numbering holds.
            fut = self._inflight = soon(frames)
            self._inflight_frames = frames
            reply = await asyncio.shield(fut)
            self._inflight = None
            producer.appended(reply)  # type: ignore[attr-defined]
        except StreamLogError:
            self._unlogged += frames
            raise

    async def _settle(self) -> None:
        """Wait for an append in flight (a stop interrupted it)."""
        fut, self._inflight = self._inflight, None
        if fut is None:
            return
        try:
            self.producer.appended(await fut)  # type: ignore[attr-defined]
        except StreamLogError as exc:
            self._unlogged[:0] = self._inflight_frames  # (not in the log: sent at the end)
            log.warning("stream %s: the stream log failed: %s", self.id, exc)

    async def _retake(self, *, ending: bool = False) -> bool:
        """The lease lapsed while this process still produces (a loop stalled past the
        lease, Redis): take the stream back if no other process did and it has not
        ended, and go on (``ending``: to write its end). False: stop."""
        if (self.ended and not ending) or self.producer.cancel_requested:
            return False
        # An append still in flight was sent as the old holder: it fails (its frames go
        # back to _unlogged, appended again below) or it landed; either way first.
        await self._settle()
        try:
            producer = await self.host.streams.acquire(self.id)
        except StreamLogError:
            return False
        if producer is None:
            return False
        old, self.producer = self.producer, producer
        old.on_signal = None
        self._append_soon = getattr(producer, "append_soon", None)
        self.stop_reason = None
        producer.on_signal = self._signalled
        log.warning("stream %s: its lease on the stream log lapsed (the event loop stalled?);"
                    " taken back at frame %d", self.id, producer.next_seq)
        if producer.signal.is_set():  # cancelled meanwhile
            self._signalled()
        return True

    async def _hand_off(self) -> bool:
        """At the drain deadline, with a store other processes share: give the stream up
        unfinished for one of them to take over (``StreamLog.hand_off``: the lease released
        after the last frame appended). False: end it here (the memory store; nothing
        sent yet, so the client gets a real 503; a cancel or stop under way; a stream no
        process could continue: tools, a structured answer, a route without
        ``continue_prefix``; frames the log does not have; the log unreachable)."""
        producer = self.producer
        if (self.ended or self.http_status != 200 or self.stop_reason is not None
                or producer.cancel_requested or not self.host.streams.shared
                or not self.host.continuable(producer.info)):
            return False
        await self.stream.aclose()  # the upstream first: nothing more comes from it
        await self._settle()
        if self._unlogged or producer.closed:
            return False  # (an error's frames wait for their end; or the lease is gone)
        try:
            if not await self.host.streams.hand_off(producer):
                return False
        except StreamLogError as exc:
            # Released or not, its lease lapses within 1.5 s: readers take it over then.
            log.warning("stream %s: handing it off: %s", self.id, exc)
        self.ended = self.handed_off = True
        log.info("stream %s: handed off at frame %d (shutdown)", self.id,
                 producer.next_seq - 1)
        return True

    async def _append_unlogged(self) -> bytes:
        """After :meth:`_retake`: the frames a lost append left out, appended; what to
        yield (an error event's frames stay for the end)."""
        frames, self._unlogged = self._unlogged, []
        if not frames:
            return b""
        await self._append(frames)
        return b"".join(frames)

    async def _stopped(self) -> bytes:
        """The loop was stopped by its watcher: end the stream; the client's frame."""
        reason = self.stop_reason
        if reason == "lost":
            # Another process holds the stream now (or it expired): nothing more may be
            # written here; the attached client gets a typed error.
            await self.stream.aclose()
            self.ended = True
            self.host.metrics.producer_losses.inc()
            return self.encoder.encode(ErrorEvent(PRODUCER_LOST, PRODUCER_LOST_MESSAGE))
        if reason == "grace":
            message = (f"nobody resumed the stream within its {self.grace:g}s grace period"
                       " after the client went away")
        else:
            message = _STOP_MESSAGES.get(reason or "cancel", "the stream was stopped")
        return await self._stop_with(ErrorEvent(STREAM_CANCELLED, message), "cancelled")

    async def _stop_with(self, event: ErrorEvent, status: FinalStatus) -> bytes:
        """Abort the upstream, end the stream with ``event``; its frames."""
        await self.stream.aclose()
        await self._settle()
        frame = self.encoder.encode(event)
        if not self.ended:
            await self._end(status, frame)
        return frame

    async def _end(self, status: FinalStatus, frame: bytes,
                   frames: list[bytes] | None = None) -> None:
        """Write the final frames (the unlogged ones, then ``frame``'s) and the status."""
        self.ended = True
        self.final_status = status
        if frames is None:
            await self._settle()
            n = self.encoder.next_seq - self.producer.next_seq - len(self._unlogged)
            try:
                frames = self._unlogged + split_frames(frame, n)
            except RuntimeError as exc:  # (a bug: say so, but end the request cleanly)
                log.error("stream %s: its end is not written: %s", self.id, exc)
                return
            self._unlogged = []
        if self.producer.closed and not (self.producer.lease_lost
                                         and await self._retake(ending=True)):
            return
        for attempt in (0, 1):
            try:
                if not self.host.streams.shared:
                    await self.producer.finish(status, frames)
                    return
                # Shielded: a stop or the drain arriving meanwhile still finds the end
                # written (the drain then sends the client these frames, not an error).
                finishing = asyncio.ensure_future(self.producer.finish(status, frames))
                try:
                    await asyncio.shield(finishing)
                except asyncio.CancelledError:
                    await asyncio.wait([finishing])
                    if not finishing.cancelled() and finishing.exception() is not None:
                        log.warning("stream %s: its end could not be written to the"
                                    " stream log: %s", self.id, finishing.exception())
                    raise
                return
            except LeaseLost as exc:
                if attempt == 0 and await self._retake(ending=True):
                    continue
                error: StreamLogError = exc
            except StreamLogError as exc:
                error = exc
            log.warning("stream %s: its end could not be written to the stream log: %s",
                        self.id, error)
            return

    # -- the client ----------------------------------------------------------------------

    def client_gone(self) -> bool:
        """The client left (``SSEResponse`` asks): True when the stream goes on, for a
        resume within its grace; False: stop it now (the response cancels the loop)."""
        if self.grace <= 0 or self.ended or self.stop_reason is not None:
            return False
        self.gone_at = time.monotonic()
        self._watch()  # (again: now it times the grace)
        return True

    def hand_over(self, source: AsyncIterator[bytes]) -> None:
        """The client's response stopped iterating ``source`` (this production's
        :meth:`frames`) at a frame boundary: a task of the gateway runs it on."""
        self.host.drain.discard(self.task)
        self.task = None
        self.host.spawn(self._run_on(source), name=f"tokenrelay-detached-{self.id}")

    def run_detached(self) -> None:
        """Produce with no client at all, in a task of the gateway (``background``)."""
        self.gone_at = time.monotonic()
        self.http_status = 200
        self.host.spawn(self._run_on(self.frames()), name=f"tokenrelay-background-{self.id}")

    async def _run_on(self, source: AsyncIterator[bytes]) -> None:
        task = self.task = asyncio.current_task()
        self.host.drain.add(task)
        try:
            if self.stop_reason is not None:  # stopped while being handed over
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()
                return
            self.stream.pin_task()
            async for _ in source:
                pass
        except EarlyResponse:
            pass  # it failed before its first frame: the log has its end
        finally:
            self.host.drain.discard(task)

    async def wait(self) -> None:
        """Until the production has ended (its bookkeeping done)."""
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._done)

    # -- stopping ------------------------------------------------------------------------

    def _signalled(self) -> None:
        """The producer's ``signal``: a cancel (any process) or the lease lost."""
        producer = self.producer
        reason = "lost" if producer.lease_lost and not producer.cancel_requested else "cancel"
        if self.task is not None and self.task is asyncio.current_task():
            # Raised from an append in the loop itself (lease lost): it stops on that.
            self.stop_reason = self.stop_reason or reason
            return
        self._stop(reason)

    def _watch(self) -> None:
        self._unwatch()
        self._watcher = asyncio.get_running_loop().create_task(
            self._watching(), name=f"tokenrelay-watch-{self.id}")

    def _unwatch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()

    async def _watching(self) -> None:
        """The resume grace of a stream whose client left: stop it when ``grace`` seconds
        passed with no reader attached."""
        while True:
            timeout = self._grace_left()
            if timeout <= 0:
                self._stop("grace")
                return
            await asyncio.sleep(timeout)

    def _grace_left(self) -> float:
        producer = self.producer
        if producer.readers > 0:
            return _READER_RECHECK_S
        assert self.gone_at is not None
        seen = producer.readers_seen_at
        since = self.gone_at if seen is None else max(self.gone_at, seen)
        return since + self.grace - time.monotonic()

    def _stop(self, reason: str) -> None:
        if self.stop_reason is not None or self.ended:
            return
        self.stop_reason = reason
        task = self.task
        if task is not None and not task.done():
            task.cancel(STOP)
        # (no task: it is being handed over; _run_on sees stop_reason and closes it)


def _retry_after(exc: Any) -> list[tuple[bytes, bytes]]:
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is None:
        return []
    return [(b"retry-after", str(max(1, int(retry_after + 0.999))).encode())]
