"""The Redis store's handles: a stream's producer (its lease) and a reader (its cursor).

Both talk to Redis through their :class:`~.redis_log.RedisStreamLog`: appends go through
its writer (group commit), reads through its readers' pool.

While Redis cannot be reached, a producer *holds* its frames in memory (see
:meth:`RedisProducer._hold`): its appends succeed at once and keep their numbering, up to
``max_stream_bytes`` held; its store writes them, in order, once Redis answers again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from .base import (
    FINAL_STATUSES,
    LEASE_REFRESH_S,
    LEASE_TTL_S,
    LIVE_STATUSES,
    FinalStatus,
    FrameBatch,
    LeaseLost,
    LiveStatus,
    Producer,
    ProducerLost,
    StreamInfo,
    StreamLogUnavailable,
    StreamNotFound,
    StreamReader,
    StreamTooLarge,
)

if TYPE_CHECKING:
    from .redis_log import RedisStreamLog

__all__ = ["RedisProducer", "RedisReader"]

_EMPTY: tuple[bytes, ...] = ()
LEASE_MS = int(LEASE_TTL_S * 1000)
#: The backoff of every retry towards Redis (the gateway's link probe, the stream log's
#: writing of held frames): first delay and cap, seconds, doubling, jittered.
RETRY_FIRST_S = 0.1
RETRY_CAP_S = 2.0
#: Held frames are written back in calls of about this many bytes (a call is one Lua
#: script: Redis does nothing else while it runs).
HELD_CHUNK_BYTES = 1 << 20
assert RETRY_FIRST_S < LEASE_REFRESH_S


def _pack_py(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


pack: Callable[[tuple[Any, ...]], bytes]
try:
    from hiredis import pack_command
except ImportError:  # hiredis < 2.1, or not installed: the same bytes, packed in Python
    pack = _pack_py
else:
    pack = pack_command


def parse_seq(value: Any) -> int:
    seq = int(value)
    if seq < -1:
        raise ValueError("negative sequence number")
    return seq


def reply_code(reply: Any, store: RedisStreamLog) -> int:
    if (not isinstance(reply, list) or len(reply) != 2
            or not all(isinstance(v, int) for v in reply)):
        raise store._bad("append reply")
    return int(reply[0])


class RecordGone(StreamLogUnavailable):
    """A live stream's record is gone from Redis (restarted empty, or evicted): its
    producer holds its frames and makes the record again (not a lost lease)."""


class PendingAppend(NamedTuple):
    producer: RedisProducer
    nframes: int
    keys_args: list[Any]
    fut: asyncio.Future[Any]


class RedisProducer(Producer):
    """The lease on one stream in Redis (see :class:`~.base.Producer`)."""

    def __init__(self, store: RedisStreamLog, info: StreamInfo, holder: str) -> None:
        super().__init__(info, holder)
        self._store = store
        self._keys = store._keys(info.id)
        #: The live status to give the record if it must be made again (_hold).
        self._live = info.status if info.status in LIVE_STATUSES else "in_progress"
        #: Frames Redis could not take, numbered from ``_held_first`` (None: not holding).
        self._held: list[bytes] | None = None
        self._held_first = 0
        self._held_bytes = 0
        #: The final status among the held frames (the last one carries it), and its time.
        self._held_final = ""
        self._held_finished_at = ""

    def _enqueue(self, frames: Sequence[bytes], live: str, final: str,
                 cap: int) -> asyncio.Future[Any]:
        if self.closed:
            self._on_lost()
            raise LeaseLost(f"stream {self.stream_id} is no longer this producer's")
        store = self._store
        store._check_frames(frames)
        m, x, lease, _, _ = self._keys
        return store._enqueue(self, len(frames), [
            3, m, x, lease, self.holder, self.next_seq, live, final, repr(time.time()),
            store._ttl_ms, LEASE_MS, cap, *frames])

    def append_soon(self, frames: Sequence[bytes], *,
                    status: LiveStatus | None = None) -> asyncio.Future[Any]:
        """:meth:`append` as a future (no coroutine), settled by :meth:`appended`.

        The append is sent with the writer's next batch; cancelling a wait on the
        future (``asyncio.shield`` it) leaves the append going, so a caller that is
        interrupted can still learn where the stream stands.
        """
        if status is not None:
            if status not in LIVE_STATUSES:
                raise ValueError(f"not a live status: {status!r}")
            self._live = status
        return self._enqueue(frames, status or "", "", self._store.max_stream_bytes)

    def appended(self, reply: tuple[int, int]) -> int:
        """The last seq of a settled :meth:`append_soon` (raises as :meth:`append`)."""
        code, last = reply
        if code == 1:
            return int(last)
        if code == -5:
            raise StreamTooLarge(f"stream {self.stream_id} would exceed max_stream_bytes"
                                 f" ({self._store.max_stream_bytes})")
        reason = {-1: "expired", -2: "already ended", -3: "held by another producer",
                  -4: "further along than this producer"}.get(code, f"code {code}")
        raise LeaseLost(f"stream {self.stream_id} is no longer this producer's ({reason})")

    async def _write(self, frames: Sequence[bytes], live: str, final: str, cap: int) -> int:
        return self.appended(await self._enqueue(frames, live, final, cap))

    def _applied(self, reply: Any, nframes: int) -> tuple[int, int]:
        """Apply an append's reply to this producer (even if its caller was cancelled)."""
        store = self._store
        code = reply_code(reply, store)
        if code == 1:
            last = int(reply[1])
            if last != self.next_seq + nframes - 1:
                raise store._bad("append reply")
            self.next_seq = last + 1
        elif code == -1 and not self.closed:
            raise RecordGone(f"stream {self.stream_id}'s record is gone from Redis (restarted"
                             " without persistence, or evicted)")
        elif code != -5:
            self._on_lost()
            self.closed = True
            store._producers.pop(self.stream_id, None)
        return code, int(reply[1])

    async def append(self, frames: Sequence[bytes], *, status: LiveStatus | None = None) -> int:
        if status is not None:
            if status not in LIVE_STATUSES:
                raise ValueError(f"not a live status: {status!r}")
            self._live = status
        return await self._write(frames, status or "", "", self._store.max_stream_bytes)

    async def finish(self, status: FinalStatus, frames: Sequence[bytes]) -> int:
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status!r}")
        if not frames:
            raise ValueError("finish needs at least one frame: the last one marks the end")
        last = await self._write(frames, "", status, 0)
        self.closed = True
        self._store._producers.pop(self.stream_id, None)
        return last

    # -- holding frames while Redis is away ---------------------------------------------

    def _start_holding(self) -> None:
        """Appends go to memory from now on, until :meth:`_reclaimed` has written them all.

        The holding ``_enqueue`` is set on the instance, so that while Redis is up an
        append pays no check for it.
        """
        if self._held is None and not self.closed:
            self._held = []
            self._held_first = self.next_seq
            self._enqueue = self._enqueue_held  # type: ignore[method-assign]
            self._store._holding[self.stream_id] = self

    def _enqueue_held(self, frames: Sequence[bytes], live: str, final: str,
                      cap: int) -> asyncio.Future[Any]:
        if self.closed:
            self._on_lost()
            raise LeaseLost(f"stream {self.stream_id} is no longer this producer's")
        self._hold(frames, self.next_seq, final, repr(time.time()), cap)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result((1, self.next_seq - 1))
        return fut

    def _hold(self, frames: Sequence[bytes], first: int, final: str, finished_at: str,
              cap: int) -> None:
        """Keep ``frames`` (numbered from ``first``) in memory for Redis; raises
        :class:`StreamTooLarge` when they would take more than ``max_stream_bytes``
        (``cap``, 0 for the final frames: a stream can always end)."""
        store = self._store
        self._start_holding()
        held = self._held
        if held is None:  # (closed)
            raise LeaseLost(f"stream {self.stream_id} is no longer this producer's")
        if not held:
            self._held_first = first
        elif first != self._held_first + len(held):
            raise StreamLogUnavailable(f"stream {self.stream_id}: held frames out of order")
        size = store._check_frames(frames)
        if cap and self._held_bytes + size > cap:
            raise StreamTooLarge(
                f"the stream log is unavailable, and stream {self.stream_id} would hold more"
                f" than max_stream_bytes ({cap}) in memory until it is back")
        if size and store._held_total + size > store.max_held_bytes and not final:
            raise StreamLogUnavailable(
                f"the stream log is unavailable, and this process holds max_held_bytes"
                f" ({store.max_held_bytes}) of frames for it already")
        held.extend(frames)
        self._held_bytes += size
        store._held_total += size
        self.next_seq = first + len(frames)
        if final:
            self._held_final, self._held_finished_at = final, finished_at
            self.closed = True
            store._producers.pop(self.stream_id, None)

    def _held_from_append(self, pending: PendingAppend) -> tuple[int, int]:
        """An append Redis could not take (``pending``): held instead; its reply."""
        args = pending.keys_args
        first, final, finished_at, cap = int(args[5]), args[7], args[8], int(args[11])
        self._hold(args[12:], first, final, finished_at, cap)
        return 1, self.next_seq - 1

    def _reclaim_call(self) -> tuple[list[Any], int, int]:
        """The RECLAIM script's keys and args for the next held frames (about
        ``HELD_CHUNK_BYTES``); how many frames and bytes it carries."""
        held = self._held or []
        count = size = 0
        for data in held:
            if count and size + len(data) > HELD_CHUNK_BYTES:
                break
            count += 1
            size += len(data)
        final = self._held_final if count == len(held) else ""
        first = self._held_first if held else self.next_seq
        info = self.info
        meta = dict(info.meta)
        if first > 0:
            meta["kept_from"] = str(first)
        store = self._store
        return [5, *self._keys, self.holder, first, self._live, final,
                self._held_finished_at or repr(time.time()), store._ttl_ms, LEASE_MS,
                info.owner, info.endpoint, repr(info.created_at),
                json.dumps(meta, separators=(",", ":")), *held[:count]], count, size

    def _reclaimed(self, reply: Any, count: int, size: int) -> int:
        """Apply a RECLAIM reply: 1 done (the frames are in Redis; holding may end),
        0 try again later, -1 the stream is not this producer's any more."""
        store = self._store
        if (not isinstance(reply, list) or len(reply) != 4
                or not all(isinstance(v, int) for v in reply)):
            raise store._bad("reclaim reply")
        code, _last, cancel, readers = reply
        if code == -6:
            return 0  # an append sent before the outage is still on its way
        if code != 1:
            why = {-2: "another process ended it meanwhile",
                   -3: "another process took it over meanwhile",
                   -4: "Redis lost some of its frames meanwhile"}.get(code, f"code {code}")
            store._drop_held(self, why)
            if not self.closed:
                self._on_lost()
                self.closed = True
                store._producers.pop(self.stream_id, None)
            return -1
        held = self._held or []
        del held[:count]
        self._held_first += count
        self._held_bytes -= size
        store._held_total -= size
        self._readers = readers
        if readers > 0:
            self._readers_seen_at = time.monotonic()
        if cancel == 1:
            self._on_cancel()
        if held:
            return 1  # (more came meanwhile: the next call writes them)
        self._held = None
        store._holding.pop(self.stream_id, None)
        self.__dict__.pop("_enqueue", None)  # the class's again: straight to Redis
        return 1

    def _refreshed(self, reply: Any) -> bool:
        if (isinstance(reply, list) and len(reply) == 3
                and all(isinstance(v, int) for v in reply)):
            alive, cancel, readers = reply
            if cancel == 1:
                self._on_cancel()
            self._readers = readers
            if readers > 0:
                self._readers_seen_at = time.monotonic()
            if alive == -1 and not self.closed:
                self._store._lost(RecordGone(
                    f"stream {self.stream_id}'s record is gone from Redis (restarted without"
                    " persistence, or evicted)"))
                return False
            if alive == 0 and not self.closed:
                self._on_lost()
                self.closed = True
                self._store._producers.pop(self.stream_id, None)
            return alive == 1
        return not self.lease_lost  # an error reply: try again at the next tick

    async def refresh(self) -> bool:
        if self.closed:
            return False
        store = self._store
        return self._refreshed(await store._call(
            store._refresh, self._keys, [self.holder, LEASE_MS, store._ttl_ms]))

    async def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        store = self._store
        store._producers.pop(self.stream_id, None)
        if self._held is not None:
            # Given up unfinished while Redis was away: its held frames are dropped, and
            # readers learn of the loss once Redis is back (no lease: ProducerLost).
            store._drop_held(self, "its producer stopped before Redis was back")
            return
        await store._call(store._release, [self._keys[2]], [self.holder])


class RedisReader(StreamReader):
    """A cursor on one stream in Redis (see :class:`~.base.StreamReader`)."""

    def __init__(self, store: RedisStreamLog, info: StreamInfo, after: int,
                 token: str) -> None:
        super().__init__(info, after)
        self._store = store
        self._keys = store._keys(info.id)
        self.token = token
        self._attached = True
        if info.ended and after >= info.last_seq:
            self.ended = True
            self.status = cast(FinalStatus, info.status)

    async def aclose(self) -> None:
        if self._attached:
            self._attached = False
            store = self._store
            store._readers.pop(self.token, None)
            await store._call(store._detach, [self._keys[4]], [self.token])

    async def _xread(self, block_ms: int | None) -> FrameBatch:
        store = self._store
        key = self._keys[1]
        first = self.cursor + 1
        if block_ms is None:
            args: tuple[Any, ...] = ("XREAD", "COUNT", store.read_count, "STREAMS", key,
                                     f"0-{first}")
        else:
            args = ("XREAD", "COUNT", store.read_count, "BLOCK", block_ms, "STREAMS", key,
                    f"0-{first}")
        reply = await store._read(args, (block_ms or 0) / 1000 + store._command_timeout)
        if reply is None or reply == []:
            return FrameBatch(first, _EMPTY)
        return self._parse(reply, key.encode(), first)

    def _parse(self, reply: Any, key: bytes, first: int) -> FrameBatch:
        """Entries of an XREAD reply, checked: ids consecutive from ``first``, sizes bounded."""
        store = self._store
        if (not isinstance(reply, list) or len(reply) != 1 or not isinstance(reply[0], list)
                or len(reply[0]) != 2 or reply[0][0] != key or not isinstance(reply[0][1], list)):
            raise store._bad("XREAD reply")
        entries = reply[0][1]
        if len(entries) > store.read_count:
            raise store._bad("XREAD reply (too many entries)")
        frames: list[bytes] = []
        seq = first
        end: str | None = None
        limit = store.max_frame_bytes
        for entry in entries:
            if end is not None:
                raise store._bad("stream (frames after the final one)")
            if (not isinstance(entry, list) or len(entry) != 2
                    or entry[0] != b"0-%d" % (seq + 1) or not isinstance(entry[1], list)):
                raise store._bad(f"stream entry (expected frame {seq})")
            fields = entry[1]
            data = None
            if len(fields) not in (2, 4):
                raise store._bad("stream entry")
            for i in range(0, len(fields), 2):
                name, value = fields[i], fields[i + 1]
                if name == b"d" and isinstance(value, bytes) and len(value) <= limit:
                    data = value
                elif name == b"end" and value in (b"completed", b"failed", b"cancelled",
                                                  b"incomplete"):
                    end = value.decode()
                else:
                    raise store._bad("stream entry field")
            if data is None:
                raise store._bad("stream entry (no frame)")
            frames.append(data)
            seq += 1
        self.cursor = seq - 1
        if end is not None:
            self.ended = True
            self.status = cast(FinalStatus, end)
        return FrameBatch(first, frames)

    async def read(self, timeout: float | None = None) -> FrameBatch:
        if self.ended:
            return FrameBatch(self.cursor + 1, _EMPTY)
        store = self._store
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(timeout, 0.0)
        block = store.block_ms
        while True:
            if deadline is not None:
                remaining_ms = int((deadline - loop.time()) * 1000)
                if remaining_ms <= 0:
                    return await self._xread(None)
                block = min(block, remaining_ms)
            batch = await self._xread(max(block, 1))
            if batch.frames:
                return batch
            # Nothing came: is the stream still there, and its producer?
            m, _, lease, _, _ = self._keys
            probe = await store._call(store._probe, [m, lease], [])
            if probe is None:
                raise StreamNotFound(self.stream_id)
            if (not isinstance(probe, list) or len(probe) != 3
                    or not isinstance(probe[0], bytes) or not isinstance(probe[2], int)):
                raise store._bad("stream state")
            try:
                last = parse_seq(probe[1])
            except (ValueError, TypeError) as exc:
                raise store._bad("stream state") from exc
            pttl = probe[2]
            if last > self.cursor:
                block = 1  # the frames are there: read them now
                continue
            status = probe[0].decode("ascii", "replace")
            if status in FINAL_STATUSES:
                self.ended = True  # (its final frame was read: it carried the end)
                self.status = cast(FinalStatus, status)
                return FrameBatch(self.cursor + 1, _EMPTY)
            if pttl == -2 and self.stream_id in store._holding:
                # Its producer is here, holding frames Redis could not take: it takes the
                # lease again with them (not a loss, nothing to take over).
                block = store.block_ms
                continue
            if pttl == -2:
                # No producer and no final frame. Frames are written atomically, so
                # everything it wrote is already readable: take it, then report the loss.
                batch = await self._xread(None)
                if batch.frames:
                    return batch
                raise ProducerLost(self.stream_id, last)
            # Wake just after the lease would expire if nobody renews it.
            block = store.block_ms if pttl < 0 else min(store.block_ms, pttl + 20)
