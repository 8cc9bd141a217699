"""The in-memory stream log (the default): one process, nothing to install.

Each stream is a list of frames (the appended ``bytes`` themselves, not copied); a
reader's cursor is an index into it. Followers wait on one future per stream, resolved
by the next append (shared by all of them, made only when someone waits), so appending
costs a list extend and a few integer updates, and no timer or task.

Retention (see README "Streams that outlive their connection"):

* A finished stream is kept ``retention_s`` after its final frame, then dropped.
* Past ``max_bytes`` (frames + ~41 bytes of bookkeeping per frame + 1 KiB per stream),
  finished streams are dropped oldest-finished first until the total fits again.
* A live stream is never dropped. When live streams alone hold ``max_bytes``,
  :meth:`MemoryStreamLog.create` raises :class:`StreamLogFull` (the gateway answers 503)
  while the live ones go on, each up to ``max_stream_bytes``.
* A stream whose producer let go without finishing (an exception, a dropped producer)
  counts as finished for retention from that moment, unless another producer takes it
  over; readers see :class:`ProducerLost` at once.
* A reader already reading a dropped stream keeps what it holds and reads to its end; a
  new lookup finds nothing.

The lease is the producer object itself: held while it lives and has not released.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import cast

from .base import (
    FINAL_STATUSES,
    LIVE_STATUSES,
    FinalStatus,
    FrameBatch,
    LeaseLost,
    LiveStatus,
    Producer,
    ProducerLost,
    StreamInfo,
    StreamLog,
    StreamLogFull,
    StreamNotFound,
    StreamReader,
    StreamStatus,
    StreamTooLarge,
    check_after,
    new_stream_id,
    valid_stream_id,
)

__all__ = ["FRAME_OVERHEAD", "STREAM_OVERHEAD", "MemoryProducer", "MemoryReader",
           "MemoryStreamLog"]

#: Bytes counted per frame besides its payload: the ``bytes`` object's header (33) and
#: its list slot (8). ``bench/bench_streamlog.py`` measures the real figure.
FRAME_OVERHEAD = 41
#: Bytes counted per stream: its record, list and index entries.
STREAM_OVERHEAD = 1024

_EMPTY: tuple[bytes, ...] = ()


class _Stream:
    __slots__ = (
        "cancel_requested",
        "created_at",
        "dropped",
        "endpoint",
        "finalizer",
        "finished_at",
        "frames",
        "holder",
        "id",
        "meta",
        "nbytes",
        "owner",
        "producer",
        "readers",
        "readers_left_at",
        "status",
        "waiter",
    )

    def __init__(self, stream_id: str, owner: str, endpoint: str, created_at: float,
                 meta: Mapping[str, str], status: StreamStatus) -> None:
        self.id = stream_id
        self.owner = owner
        self.endpoint = endpoint
        self.created_at = created_at
        self.meta = dict(meta)
        self.status: StreamStatus = status
        self.frames: list[bytes] = []
        self.nbytes = STREAM_OVERHEAD
        self.finished_at: float | None = None
        self.cancel_requested = False
        #: The lease: the holder token of the live producer, None when there is none.
        self.holder: str | None = None
        self.producer: weakref.ref[MemoryProducer] | None = None
        self.finalizer: weakref.finalize | None = None
        #: Resolved (and cleared) by the next change; awaited by every waiting reader.
        self.waiter: asyncio.Future[None] | None = None
        self.dropped = False
        #: Readers attached now, and when the last one left (time.monotonic()).
        self.readers = 0
        self.readers_left_at: float | None = None

    def detach(self) -> None:
        self.readers -= 1
        if self.readers == 0:
            self.readers_left_at = time.monotonic()

    def wake(self) -> None:
        fut = self.waiter
        if fut is not None:
            self.waiter = None
            if not fut.done():
                fut.set_result(None)

    def info(self) -> StreamInfo:
        return StreamInfo(
            id=self.id, owner=self.owner, endpoint=self.endpoint, created_at=self.created_at,
            status=self.status, last_seq=len(self.frames) - 1, finished_at=self.finished_at,
            cancel_requested=self.cancel_requested, producer_alive=self.holder is not None,
            meta=dict(self.meta))


class MemoryStreamLog(StreamLog):
    """Stream logs held in this process's memory, bounded by age and total bytes.

    Args:
        retention_s: keep a finished stream this long after its final frame.
        max_bytes: total size above which finished streams are dropped, oldest first,
            and new streams refused when only live ones remain.
        max_stream_bytes: cap on one stream's appended frames.
        max_frame_bytes: cap on one frame.
        clock: wall clock (tests pass a fake one).
    """

    def __init__(self, *, retention_s: float = 600.0, max_bytes: int = 256 << 20,
                 max_stream_bytes: int = 64 << 20, max_frame_bytes: int = 1 << 20,
                 clock: Callable[[], float] = time.time) -> None:
        if retention_s <= 0 or max_bytes <= 0 or max_stream_bytes <= 0 or max_frame_bytes <= 0:
            raise ValueError("retention and sizes must be positive")
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.max_stream_bytes = max_stream_bytes
        self.max_frame_bytes = max_frame_bytes
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        #: Streams that may be dropped (finished or without producer) → since when.
        self._done: OrderedDict[str, float] = OrderedDict()
        self._bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    # -- accounting ----------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes counted against ``max_bytes`` now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._streams)

    def _sweep(self, room: int = 0) -> None:
        """Drop finished streams past their age, then oldest first while over max_bytes
        (with ``room`` bytes more to fit)."""
        done = self._done
        if not done:
            return
        horizon = self._clock() - self.retention_s
        limit = self.max_bytes - room
        while done:
            stream_id, since = next(iter(done.items()))
            if since > horizon and self._bytes <= limit:
                break
            del done[stream_id]
            s = self._streams.pop(stream_id)
            s.dropped = True
            self._bytes -= s.nbytes
            s.wake()
        if done and self._timer is None:
            # Free memory on an idle server too: one timer for the oldest finished stream.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            delay = max(next(iter(done.values())) - horizon, 0.0) + 0.01
            self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._sweep()

    def _mark_done(self, s: _Stream) -> None:
        self._done[s.id] = self._clock()
        self._done.move_to_end(s.id)
        self._sweep()

    # -- the contract --------------------------------------------------------------------

    async def create(self, *, owner: str, endpoint: str, meta: Mapping[str, str] | None = None,
                     id_prefix: str = "", status: LiveStatus = "queued") -> MemoryProducer:
        self._check_create(owner, endpoint, meta, id_prefix)
        self._sweep(STREAM_OVERHEAD)
        if self._bytes + STREAM_OVERHEAD > self.max_bytes:
            raise StreamLogFull(f"the stream log holds {self._bytes} bytes of live streams"
                                f" (max_bytes {self.max_bytes}); try again when some finish")
        stream_id = new_stream_id(id_prefix)
        s = _Stream(stream_id, owner, endpoint, self._clock(), meta or {}, status)
        self._streams[stream_id] = s
        self._bytes += s.nbytes
        return self._lease(s)

    def _lease(self, s: _Stream) -> MemoryProducer:
        producer = MemoryProducer(self, s, new_stream_id())
        s.holder = producer.holder
        s.producer = weakref.ref(producer)
        # A producer dropped without finishing or releasing (its task died) lets go too.
        # The garbage collector may run in any thread: hand the release to the loop.
        s.finalizer = weakref.finalize(producer, self._on_collected,
                                       asyncio.get_running_loop(), s, producer.holder)
        return producer

    def _on_collected(self, loop: asyncio.AbstractEventLoop, s: _Stream, holder: str) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._let_go, s, holder)

    def _let_go(self, s: _Stream, holder: str) -> None:
        if s.holder != holder:
            return
        s.holder = None
        s.producer = None
        if s.finalizer is not None:
            s.finalizer.detach()
            s.finalizer = None
        if not s.dropped and s.status not in FINAL_STATUSES:
            self._mark_done(s)
        s.wake()

    def _get(self, stream_id: str, owner: str | None) -> _Stream | None:
        if not valid_stream_id(stream_id):
            return None
        self._sweep()
        s = self._streams.get(stream_id)
        if s is None or (owner is not None and s.owner != owner):
            return None
        return s

    async def info(self, stream_id: str, *, owner: str | None) -> StreamInfo | None:
        s = self._get(stream_id, owner)
        return None if s is None else s.info()

    async def reader(self, stream_id: str, *, after: int = -1,
                     owner: str | None) -> MemoryReader:
        s = self._get(stream_id, owner)
        if s is None:
            raise StreamNotFound(stream_id)
        info = s.info()
        check_after(after, info)
        return MemoryReader(s, info, after)

    async def cancel(self, stream_id: str, *, owner: str | None) -> StreamInfo | None:
        s = self._get(stream_id, owner)
        if s is None:
            return None
        if s.status not in FINAL_STATUSES and not s.cancel_requested:
            s.cancel_requested = True
            producer = s.producer() if s.producer is not None else None
            if producer is not None:
                producer._on_cancel()
        return s.info()

    async def acquire(self, stream_id: str) -> MemoryProducer | None:
        s = self._get(stream_id, None)
        if s is None:
            raise StreamNotFound(stream_id)
        if s.holder is not None or s.status in FINAL_STATUSES:
            return None
        self._done.pop(s.id, None)
        return self._lease(s)

    async def end_lost(self, stream_id: str, *, last_seq: int, frames: Sequence[bytes],
                       status: FinalStatus = "failed") -> bool:
        if not frames:
            raise ValueError("end_lost needs at least one frame")
        s = self._get(stream_id, None)
        if (s is None or s.holder is not None or s.status in FINAL_STATUSES
                or len(s.frames) - 1 != last_seq):
            return False
        self._finish(s, status, frames)
        return True

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- writing (called by MemoryProducer) ------------------------------------------------

    def _finish(self, s: _Stream, status: FinalStatus, frames: Sequence[bytes]) -> int:
        size = self._check_frames(frames) + FRAME_OVERHEAD * len(frames)
        s.frames.extend(frames)
        s.nbytes += size
        self._bytes += size
        s.status = status
        s.finished_at = self._clock()
        s.holder = None
        s.producer = None
        if s.finalizer is not None:
            s.finalizer.detach()
            s.finalizer = None
        self._mark_done(s)
        s.wake()
        return len(s.frames) - 1


class MemoryProducer(Producer):
    """The lease on one in-memory stream (see :class:`~.base.Producer`)."""

    def __init__(self, store: MemoryStreamLog, s: _Stream, holder: str) -> None:
        super().__init__(s.info(), holder)
        self._store = store
        self._s = s

    def append_nowait(self, frames: Sequence[bytes], *, status: LiveStatus | None = None) -> int:
        """:meth:`append` without a coroutine: for a caller on the hot path."""
        if status is not None and status not in LIVE_STATUSES:
            raise ValueError(f"not a live status: {status!r} (finish() ends a stream)")
        s = self._s
        if s.holder != self.holder or s.dropped:
            self._on_lost()
            raise LeaseLost(f"stream {s.id} is no longer this producer's")
        store = self._store
        if len(frames) == 1 and len(frames[0]) <= store.max_frame_bytes:
            size = len(frames[0]) + FRAME_OVERHEAD  # the gateway's hot path: one frame
        else:
            size = store._check_frames(frames) + FRAME_OVERHEAD * len(frames)
        if s.nbytes + size > store.max_stream_bytes + STREAM_OVERHEAD:
            raise StreamTooLarge(f"stream {s.id} would exceed max_stream_bytes"
                                 f" ({store.max_stream_bytes})")
        s.frames.extend(frames)
        s.nbytes += size
        store._bytes += size
        if status is not None:
            s.status = status
        if store._bytes > store.max_bytes:
            store._sweep()
        self.next_seq = last = len(s.frames)
        if s.waiter is not None:
            s.wake()
        return last - 1

    async def append(self, frames: Sequence[bytes], *, status: LiveStatus | None = None) -> int:
        return self.append_nowait(frames, status=status)

    async def finish(self, status: FinalStatus, frames: Sequence[bytes]) -> int:
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status!r}")
        if not frames:
            raise ValueError("finish needs at least one frame: the last one marks the end")
        s = self._s
        if s.holder != self.holder or s.dropped:
            self._on_lost()
            raise LeaseLost(f"stream {s.id} is no longer this producer's")
        last = self._store._finish(s, status, frames)
        self.next_seq = last + 1
        self.closed = True
        return last

    @property
    def readers(self) -> int:
        return self._s.readers

    @property
    def readers_seen_at(self) -> float | None:
        return time.monotonic() if self._s.readers else self._s.readers_left_at

    async def refresh(self) -> bool:
        alive = self._s.holder == self.holder and not self._s.dropped
        if not alive:
            self._on_lost()
        return alive

    async def release(self) -> None:
        if not self.closed:
            self.closed = True
            self._store._let_go(self._s, self.holder)


class MemoryReader(StreamReader):
    """A cursor on one in-memory stream (see :class:`~.base.StreamReader`)."""

    def __init__(self, s: _Stream, info: StreamInfo, after: int) -> None:
        super().__init__(info, after)
        self._s = s
        s.readers += 1
        # A reader dropped without aclose() detaches too.
        self._detach = weakref.finalize(self, s.detach)

    async def aclose(self) -> None:
        self._detach()  # once: a finalizer runs at most once

    def read_nowait(self) -> FrameBatch:
        """What follows the cursor now (possibly nothing), without waiting."""
        s = self._s
        frames = s.frames
        first = self.cursor + 1
        n = len(frames)
        if first < n:
            self.cursor = n - 1
            batch = FrameBatch(first, frames[first:])
        else:
            batch = FrameBatch(first, _EMPTY)
        if s.status in FINAL_STATUSES and self.cursor >= n - 1:
            self.ended = True
            self.status = cast(FinalStatus, s.status)
        return batch

    async def read(self, timeout: float | None = None) -> FrameBatch:
        s = self._s
        deadline: float | None = None
        while True:
            batch = self.read_nowait()
            if batch.frames or self.ended:
                return batch
            if s.dropped:
                raise StreamNotFound(s.id)
            if s.holder is None:
                raise ProducerLost(s.id, len(s.frames) - 1)
            fut = s.waiter
            if fut is None or fut.done():
                fut = s.waiter = asyncio.get_running_loop().create_future()
            if timeout is None:
                try:
                    await fut
                except asyncio.CancelledError:
                    # Another reader's cancellation cancels the future they share: only a
                    # cancellation of this task stops this reader.
                    task = asyncio.current_task()
                    if not fut.cancelled() or (task is not None and task.cancelling()):
                        raise
                continue
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + timeout
            remaining = deadline - loop.time()
            if remaining <= 0:
                return batch
            await asyncio.wait((fut,), timeout=remaining)
