"""The Redis stream log: streams that outlive their process, shared by gateway replicas.

One Redis Stream per stream (frame ``seq`` = entry ``0-(seq+1)``, so a reader resumes
by seq with ``XREAD … STREAMS key 0-(after+1)``), written with one script call per
tick (:mod:`._lua` has the key layout). Readers follow with ``XREAD BLOCK``; when
nothing comes they check the producer's lease, so a dead producer is noticed within
~0.1 s of its lease expiring (≤ 1.5 s after its last refresh). Cancels set a flag key
and are published; a producer hears them at once through one pub/sub connection per
process, or at its next lease refresh (≤ 0.5 s) if that connection missed it.

Retention: every key has a TTL of ``retention_s``, renewed while the producer is alive
and set again by the final frame; Redis drops the stream then. Total size is Redis's
own ``maxmemory`` (use ``maxmemory-policy volatile-ttl``: the keys closest to expiry,
i.e. the oldest finished streams, go first); ``max_stream_bytes`` caps each stream.

Replies are checked as hostile: types, entry ids (consecutive from the cursor), frame
sizes (``max_frame_bytes``), at most ``read_count`` entries per read. Anything else is
:class:`StreamLogUnavailable`, as is every Redis or socket error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisError

from . import _lua
from .base import (
    FINAL_STATUSES,
    LEASE_REFRESH_S,
    LEASE_TTL_S,
    LIVE_STATUSES,
    MAX_ENDPOINT_LEN,
    MAX_META_BYTES,
    MAX_OWNER_LEN,
    FinalStatus,
    FrameBatch,
    LeaseLost,
    LiveStatus,
    Producer,
    ProducerLost,
    StreamInfo,
    StreamLog,
    StreamLogUnavailable,
    StreamNotFound,
    StreamReader,
    StreamStatus,
    StreamTooLarge,
    check_after,
    new_stream_id,
    valid_stream_id,
)

__all__ = ["RedisProducer", "RedisReader", "RedisStreamLog"]

log = logging.getLogger("tokenrelay.streamlog")

_EMPTY: tuple[bytes, ...] = ()
_LEASE_MS = int(LEASE_TTL_S * 1000)


def _raw(response: Any, **options: Any) -> Any:
    return response


class RedisStreamLog(StreamLog):
    """Stream logs in Redis (see the module docstring).

    Args:
        client: a ``redis.asyncio.Redis`` with ``protocol=2`` (:meth:`from_url` makes one).
        read_client: the same for readers' blocking ``XREAD``s (default ``client``): a pool
            of its own, so that many waiting readers never hold up producers' appends.
        prefix: prepended to every key and channel.
        retention_s: TTL of every key; renewed while live, set again at the end.
        max_stream_bytes / max_frame_bytes: caps on a stream / one frame.
        block_ms: longest single ``XREAD BLOCK`` (a reader's lease check interval when idle).
        read_count: most entries one read returns.
    """

    def __init__(self, client: aioredis.Redis, *, read_client: aioredis.Redis | None = None,
                 prefix: str = "tokenrelay:",
                 retention_s: float = 600.0, max_stream_bytes: int = 64 << 20,
                 max_frame_bytes: int = 1 << 20, block_ms: int = 1000,
                 read_count: int = 512, where: str = "redis") -> None:
        if retention_s <= 0 or max_stream_bytes <= 0 or max_frame_bytes <= 0:
            raise ValueError("retention and sizes must be positive")
        if not 1 <= block_ms <= 60_000 or not 1 <= read_count <= 100_000:
            raise ValueError("block_ms must be 1-60000 and read_count 1-100000")
        self.retention_s = retention_s
        self.max_stream_bytes = max_stream_bytes
        self.max_frame_bytes = max_frame_bytes
        self.block_ms = block_ms
        self.read_count = read_count
        self.prefix = prefix
        self.channel = f"{prefix}cancel"
        self._ttl_ms = max(int(retention_s * 1000), _LEASE_MS * 2)
        self._where = where
        self._redis = client
        self._reads = read_client or client
        # Entries are parsed here, strictly, from the raw RESP2 reply.
        self._reads.set_response_callback("XREAD", _raw)
        self._create = client.register_script(_lua.CREATE)
        self._append = client.register_script(_lua.APPEND)
        self._refresh = client.register_script(_lua.REFRESH)
        self._release = client.register_script(_lua.RELEASE)
        self._info = client.register_script(_lua.INFO)
        self._cancel = client.register_script(_lua.CANCEL)
        self._acquire = client.register_script(_lua.ACQUIRE)
        self._probe = client.register_script(_lua.PROBE)
        #: This process's live producers (weak: a dropped producer stops being refreshed).
        self._producers: weakref.WeakValueDictionary[str, RedisProducer] = (
            weakref.WeakValueDictionary())
        self._keeper: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        #: Appends waiting for the writer: one pipeline carries all that arrived while
        #: the previous one was in flight (group commit; no added wait when idle).
        self._queue: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None
        self._kick: asyncio.Future[None] | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 256, max_readers: int = 4096,
                 block_ms: int = 1000, **kwargs: Any) -> RedisStreamLog:
        """A store on the Redis at ``url`` (``redis://``, ``rediss://``, ``unix://``).

        Two pools: ``max_connections`` for writes and lookups, ``max_readers`` for readers
        waiting in ``XREAD BLOCK`` (one connection each while they wait). Each command has
        ``block_ms`` + 1 s to answer and is tried twice at most, so a stopped server is an
        error within a few seconds, never a hang.
        """
        def pool(size: int) -> aioredis.BlockingConnectionPool:
            return aioredis.BlockingConnectionPool.from_url(
                url, max_connections=size, timeout=5.0, protocol=2,
                socket_timeout=block_ms / 1000 + 1.0, socket_connect_timeout=2.0,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1))

        commands = pool(max_connections)
        kw = commands.connection_kwargs
        where = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        return cls(aioredis.Redis(connection_pool=commands),
                   read_client=aioredis.Redis(connection_pool=pool(max_readers)),
                   block_ms=block_ms, where=f"redis at {where}", **kwargs)

    # -- plumbing ------------------------------------------------------------------------

    def _keys(self, stream_id: str) -> tuple[str, str, str, str]:
        base = f"{self.prefix}{{{stream_id}}}:"
        return base + "m", base + "x", base + "l", base + "c"

    def _unavailable(self, exc: BaseException) -> StreamLogUnavailable:
        # Never the URL: it may carry a password.
        return StreamLogUnavailable(f"the stream log ({self._where}) failed:"
                                    f" {type(exc).__name__}: {str(exc)[:200]}")

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def _pipeline(self, calls: Sequence[tuple[Any, Sequence[Any]]]) -> list[Any]:
        """Scripts ``(script, keys + args)`` in one round trip; replies or exceptions.

        EVALSHA straight into the pipeline (redis-py's pipelined scripts cost a SCRIPT
        EXISTS round trip per execute); after a NOSCRIPT (Redis restarted or flushed) the
        scripts are loaded and the batch sent again, which every script here allows.
        """
        for attempt in (0, 1):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for script, keys_args in calls:
                        pipe.execute_command("EVALSHA", script.sha, *keys_args)
                    replies = await pipe.execute(raise_on_error=False)
                if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                    for script in {id(c[0]): c[0] for c in calls}.values():
                        script.sha = await self._redis.script_load(script.script)
                    continue
            except (RedisError, OSError) as exc:
                raise self._unavailable(exc) from exc
            return list(replies)
        raise AssertionError("unreachable")

    async def _submit(self, producer: RedisProducer, nframes: int, keys_args: list[Any]) -> Any:
        """Queue an append for the writer task and wait for its reply."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(producer, nframes, keys_args, fut))
        kick = self._kick
        if kick is not None:
            self._kick = None
            if not kick.done():
                kick.set_result(None)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name="streamlog-writer")
        return await fut

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._queue:
                self._kick = kick = loop.create_future()
                await kick
                continue
            await self._write_batch()

    async def _write_batch(self) -> None:
        # A function of its own: no reference to a producer outlives the batch.
        # An append whose caller was cancelled before it was sent is dropped; one already
        # sent is applied to its producer all the same.
        batch = [p for p in self._queue if not p.fut.cancelled()]
        self._queue = []
        if not batch:
            return
        try:
            replies = await self._pipeline([(self._append, p.keys_args) for p in batch])
        except StreamLogUnavailable as exc:
            for p in batch:
                if not p.fut.done():
                    p.fut.set_exception(exc)
            return
        for p, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                result: Any = self._unavailable(reply)
            else:
                try:
                    result = p.producer._applied(reply, p.nframes)
                except StreamLogUnavailable as exc:
                    result = exc
            if not p.fut.done():
                if isinstance(result, BaseException):
                    p.fut.set_exception(result)
                else:
                    p.fut.set_result(result)

    def _bad(self, what: str) -> StreamLogUnavailable:
        return StreamLogUnavailable(f"the stream log ({self._where}) sent an invalid {what}")

    def _parse_info(self, stream_id: str, reply: Any) -> StreamInfo | None:
        if reply is None:
            return None
        if not isinstance(reply, list) or len(reply) != 9:
            raise self._bad("stream record")
        owner, endpoint, created, status, last, finished, meta, pttl, cancel = reply
        try:
            if not (isinstance(owner, bytes) and 0 < len(owner) <= MAX_OWNER_LEN
                    and isinstance(endpoint, bytes) and 0 < len(endpoint) <= MAX_ENDPOINT_LEN
                    and isinstance(meta, bytes) and len(meta) <= MAX_META_BYTES + 1024
                    and isinstance(pttl, int) and isinstance(cancel, int)):
                raise ValueError
            status_s = status.decode()
            if status_s not in FINAL_STATUSES and status_s not in LIVE_STATUSES:
                raise ValueError
            meta_d = json.loads(meta) if meta else {}
            if not isinstance(meta_d, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in meta_d.items()):
                raise ValueError
            return StreamInfo(
                id=stream_id, owner=owner.decode(), endpoint=endpoint.decode(),
                created_at=float(created), status=cast(StreamStatus, status_s),
                last_seq=_seq(last), finished_at=float(finished) if finished else None,
                cancel_requested=cancel == 1, producer_alive=pttl > 0 or pttl == -1,
                meta=meta_d)
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise self._bad("stream record") from exc

    # -- the contract --------------------------------------------------------------------

    async def create(self, *, owner: str, endpoint: str, meta: Mapping[str, str] | None = None,
                     id_prefix: str = "", status: LiveStatus = "queued") -> RedisProducer:
        self._check_create(owner, endpoint, meta, id_prefix)
        stream_id = new_stream_id(id_prefix)
        holder = new_stream_id()
        created = time.time()
        m, _, lease, _ = self._keys(stream_id)
        meta_json = json.dumps(dict(meta or {}), separators=(",", ":"))
        ok = await self._call(self._create, [m, lease], [
            holder, owner, endpoint, repr(created), status, meta_json, _LEASE_MS, self._ttl_ms])
        if ok != 1:
            raise StreamLogUnavailable(f"stream id {stream_id} already exists")
        info = StreamInfo(id=stream_id, owner=owner, endpoint=endpoint, created_at=created,
                          status=status, last_seq=-1, producer_alive=True, meta=dict(meta or {}))
        return self._register(RedisProducer(self, info, holder))

    def _register(self, producer: RedisProducer) -> RedisProducer:
        self._producers[producer.stream_id] = producer
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(), name="streamlog-lease-keeper")
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="streamlog-cancels")
        return producer

    async def info(self, stream_id: str, *, owner: str | None) -> StreamInfo | None:
        if not valid_stream_id(stream_id):
            return None
        m, _, lease, c = self._keys(stream_id)
        info = self._parse_info(stream_id, await self._call(self._info, [m, lease, c], []))
        if info is None or (owner is not None and info.owner != owner):
            return None
        return info

    async def reader(self, stream_id: str, *, after: int = -1,
                     owner: str | None) -> RedisReader:
        info = await self.info(stream_id, owner=owner)
        if info is None:
            raise StreamNotFound(stream_id)
        check_after(after, info)
        return RedisReader(self, info, after)

    async def cancel(self, stream_id: str, *, owner: str | None) -> StreamInfo | None:
        info = await self.info(stream_id, owner=owner)  # the owner check comes first
        if info is None or info.ended:
            return info
        m, _, lease, c = self._keys(stream_id)
        reply = await self._call(self._cancel, [m, lease, c],
                                 [self._ttl_ms, self.channel, stream_id])
        return self._parse_info(stream_id, reply)

    async def acquire(self, stream_id: str) -> RedisProducer | None:
        if not valid_stream_id(stream_id):
            raise StreamNotFound(stream_id)
        holder = new_stream_id()
        m, _, lease, c = self._keys(stream_id)
        reply = await self._call(self._acquire, [m, lease, c], [holder, _LEASE_MS])
        info = self._parse_info(stream_id, reply)
        if info is None:
            raise StreamNotFound(stream_id)
        if reply[7] == -3:
            return None
        return self._register(RedisProducer(self, info, holder))

    async def end_lost(self, stream_id: str, *, last_seq: int, frames: Sequence[bytes],
                       status: FinalStatus = "failed") -> bool:
        if not frames:
            raise ValueError("end_lost needs at least one frame")
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status!r}")
        if not valid_stream_id(stream_id):
            return False
        self._check_frames(frames)
        m, x, lease, _ = self._keys(stream_id)
        reply = await self._call(self._append, [m, x, lease], [
            "", last_seq + 1, "", status, repr(time.time()), self._ttl_ms, _LEASE_MS, 0,
            *frames])
        return _code(reply, self) == 1

    async def aclose(self) -> None:
        self._closed = True
        tasks = [t for t in (self._keeper, self._listener, self._writer) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._redis.aclose(close_connection_pool=True)
        if self._reads is not self._redis:
            await self._reads.aclose(close_connection_pool=True)

    # -- background: leases and cancels ----------------------------------------------------

    async def _keep(self) -> None:
        """Refresh every local lease every 0.5 s, in one pipelined round trip."""
        while not self._closed and await self._refresh_all():
            pass

    async def _refresh_all(self) -> bool:
        # A function of its own so that no strong reference to a producer outlives the
        # pass: a producer dropped by its task must stop being refreshed.
        await asyncio.sleep(LEASE_REFRESH_S)
        producers = list(self._producers.values())
        if not producers:
            return False
        try:
            replies = await self._pipeline([
                (self._refresh, [4, *p._keys, p.holder, _LEASE_MS, self._ttl_ms])
                for p in producers])
        except StreamLogUnavailable as exc:
            log.warning("stream log: lease refresh failed: %s", exc)
            return True
        for producer, reply in zip(producers, replies, strict=False):
            producer._refreshed(reply)
        return True

    async def _listen(self) -> None:
        """Hear cancels published by any process (one connection for all producers)."""
        while not self._closed and len(self._producers):
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                while not self._closed and len(self._producers):
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    if isinstance(data, bytes) and len(data) <= 160:
                        producer = self._producers.get(data.decode("ascii", "replace"))
                        if producer is not None:
                            producer._on_cancel()
            except (RedisError, OSError) as exc:
                # The lease refresh still reads the flag every 0.5 s meanwhile.
                log.warning("stream log: cancel subscription failed: %s",
                            self._unavailable(exc))
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass


def _seq(value: Any) -> int:
    seq = int(value)
    if seq < -1:
        raise ValueError("negative sequence number")
    return seq


def _code(reply: Any, store: RedisStreamLog) -> int:
    if (not isinstance(reply, list) or len(reply) != 2
            or not all(isinstance(v, int) for v in reply)):
        raise store._bad("append reply")
    return int(reply[0])


class _Pending(NamedTuple):
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

    async def _write(self, frames: Sequence[bytes], live: str, final: str, cap: int) -> int:
        if self.closed:
            self._on_lost()
            raise LeaseLost(f"stream {self.stream_id} is no longer this producer's")
        store = self._store
        store._check_frames(frames)
        m, x, lease, _ = self._keys
        code, last = await store._submit(self, len(frames), [
            3, m, x, lease, self.holder, self.next_seq, live, final, repr(time.time()),
            store._ttl_ms, _LEASE_MS, cap, *frames])
        if code == 1:
            return int(last)
        if code == -5:
            raise StreamTooLarge(f"stream {self.stream_id} would exceed max_stream_bytes"
                                 f" ({store.max_stream_bytes})")
        reason = {-1: "expired", -2: "already ended", -3: "held by another producer",
                  -4: "further along than this producer"}.get(code, f"code {code}")
        raise LeaseLost(f"stream {self.stream_id} is no longer this producer's ({reason})")

    def _applied(self, reply: Any, nframes: int) -> tuple[int, int]:
        """Apply an append's reply to this producer (even if its caller was cancelled)."""
        store = self._store
        code = _code(reply, store)
        if code == 1:
            last = int(reply[1])
            if last != self.next_seq + nframes - 1:
                raise store._bad("append reply")
            self.next_seq = last + 1
        elif code != -5:
            self._on_lost()
            self.closed = True
            store._producers.pop(self.stream_id, None)
        return code, int(reply[1])

    async def append(self, frames: Sequence[bytes], *, status: LiveStatus | None = None) -> int:
        if status is not None and status not in LIVE_STATUSES:
            raise ValueError(f"not a live status: {status!r}")
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

    def _refreshed(self, reply: Any) -> bool:
        if isinstance(reply, list) and len(reply) == 2:
            alive, cancel = reply
            if cancel == 1:
                self._on_cancel()
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
        m, x, lease, c = self._keys
        return self._refreshed(await store._call(
            store._refresh, [m, x, lease, c], [self.holder, _LEASE_MS, store._ttl_ms]))

    async def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        store = self._store
        store._producers.pop(self.stream_id, None)
        await store._call(store._release, [self._keys[2]], [self.holder])


class RedisReader(StreamReader):
    """A cursor on one stream in Redis (see :class:`~.base.StreamReader`)."""

    def __init__(self, store: RedisStreamLog, info: StreamInfo, after: int) -> None:
        super().__init__(info, after)
        self._store = store
        self._keys = store._keys(info.id)
        if info.ended and after >= info.last_seq:
            self.ended = True
            self.status = cast(FinalStatus, info.status)

    async def _xread(self, block_ms: int | None) -> FrameBatch:
        store = self._store
        key = self._keys[1]
        first = self.cursor + 1
        args: list[Any] = ["XREAD", "COUNT", store.read_count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", key, f"0-{first}"]
        try:
            reply = await store._reads.execute_command(*args)
        except (RedisError, OSError) as exc:
            raise store._unavailable(exc) from exc
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
            m, _, lease, _ = self._keys
            probe = await store._call(store._probe, [m, lease], [])
            if probe is None:
                raise StreamNotFound(self.stream_id)
            if (not isinstance(probe, list) or len(probe) != 3
                    or not isinstance(probe[0], bytes) or not isinstance(probe[2], int)):
                raise store._bad("stream state")
            try:
                last = _seq(probe[1])
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
            if pttl == -2:
                # No producer and no final frame. Frames are written atomically, so
                # everything it wrote is already readable: take it, then report the loss.
                batch = await self._xread(None)
                if batch.frames:
                    return batch
                raise ProducerLost(self.stream_id, last)
            # Wake just after the lease would expire if nobody renews it.
            block = store.block_ms if pttl < 0 else min(store.block_ms, pttl + 20)
