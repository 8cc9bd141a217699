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
own ``maxmemory`` (use ``maxmemory-policy volatile-lru``: finished streams nobody reads
go first, while a live stream's keys are touched every 0.5 s; ``volatile-ttl`` would evict
the short-lived leases first); ``max_stream_bytes`` caps each stream.

Redis lost mid-run: a running stream goes on. Its producer *holds* the frames Redis
could not take in memory (up to ``max_stream_bytes`` a stream, ``max_held_bytes`` in all;
beyond, the stream ends with a typed error), and this store writes them, in order, once
Redis answers again (retried with the gateway's backoff: 0.1 s doubling to 2 s), taking
the stream's lease again; its final frame and status too. When Redis came back empty
(restarted without persistence) the stream's record is made again under the same id
from the first held frame on (``meta["kept_from"]``; a resume from before it is not
found). When another process ended or took over the stream meanwhile, the held frames are
dropped (a warning says so) and the producer learns it lost its lease. While frames are
held, readers (any process) see only what Redis has. With ``hold_new_streams`` (the
gateway's ``on_redis_error = "open"``), a stream created while Redis is away is held the
same way from its first frame.

Replies are checked as hostile: types, entry ids (consecutive from the cursor), frame
sizes (``max_frame_bytes``), at most ``read_count`` entries per read. Anything else is
:class:`StreamLogUnavailable`, as is every Redis or socket error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

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
    LeaseLost,
    LiveStatus,
    Producer,
    StreamInfo,
    StreamLog,
    StreamLogUnavailable,
    StreamNotFound,
    StreamStatus,
    StreamTooLarge,
    check_after,
    new_stream_id,
    valid_stream_id,
)
from .redis_handles import (
    LEASE_MS,
    RETRY_CAP_S,
    RETRY_FIRST_S,
    PendingAppend,
    RecordGone,
    RedisProducer,
    RedisReader,
    pack,
    parse_seq,
    reply_code,
)

__all__ = ["RedisProducer", "RedisReader", "RedisStreamLog"]

log = logging.getLogger("tokenrelay.streamlog")



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
        max_held_bytes: most bytes of frames all streams of this process hold in memory
            while Redis is unreachable.
        hold_new_streams: while Redis is unreachable, :meth:`create` makes streams held
            in memory (written to Redis when it is back) instead of failing.
    """

    shared = True

    def __init__(self, client: aioredis.Redis, *, read_client: aioredis.Redis | None = None,
                 prefix: str = "tokenrelay:",
                 retention_s: float = 600.0, max_stream_bytes: int = 64 << 20,
                 max_frame_bytes: int = 1 << 20, block_ms: int = 1000,
                 read_count: int = 512, where: str = "redis",
                 owns_client: bool = True, max_held_bytes: int = 256 << 20,
                 hold_new_streams: bool = False) -> None:
        if retention_s <= 0 or max_stream_bytes <= 0 or max_frame_bytes <= 0:
            raise ValueError("retention and sizes must be positive")
        if not 1 <= block_ms <= 60_000 or not 1 <= read_count <= 100_000:
            raise ValueError("block_ms must be 1-60000 and read_count 1-100000")
        self.retention_s = retention_s
        self.max_stream_bytes = max_stream_bytes
        self.max_frame_bytes = max_frame_bytes
        self.block_ms = block_ms
        self.read_count = read_count
        self.max_held_bytes = max_held_bytes
        self.hold_new_streams = hold_new_streams
        self.prefix = prefix
        self.channel = f"{prefix}cancel"
        # (at least a lease's life: live keys are renewed with the lease)
        self._ttl_ms = max(int(retention_s * 1000), LEASE_MS)
        self._command_timeout = block_ms / 1000 + 1.0
        self._where = where
        #: False: ``client`` is shared (the gateway's Redis), its pool is not ours to close.
        self._owns_client = owns_client
        self._redis = client
        self._reads = read_client or client
        self._create = client.register_script(_lua.CREATE)
        self._append = client.register_script(_lua.APPEND)
        self._refresh = client.register_script(_lua.REFRESH)
        self._release = client.register_script(_lua.RELEASE)
        self._info = client.register_script(_lua.INFO)
        self._cancel = client.register_script(_lua.CANCEL)
        self._acquire = client.register_script(_lua.ACQUIRE)
        self._probe = client.register_script(_lua.PROBE)
        self._touch = client.register_script(_lua.TOUCH)
        self._detach = client.register_script(_lua.DETACH)
        self._attach = client.register_script(_lua.ATTACH)
        self._reclaim = client.register_script(_lua.RECLAIM)
        #: This process's live producers (weak: a dropped producer stops being refreshed).
        self._producers: weakref.WeakValueDictionary[str, RedisProducer] = (
            weakref.WeakValueDictionary())
        #: This process's attached readers, by token (weak, likewise).
        self._readers: weakref.WeakValueDictionary[str, RedisReader] = (
            weakref.WeakValueDictionary())
        self._keeper: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        #: Appends waiting for the writer: one pipeline carries all that arrived while
        #: the previous one was in flight (group commit; no added wait when idle).
        self._queue: list[PendingAppend] = []
        self._writer: asyncio.Task[None] | None = None
        self._kick: asyncio.Future[None] | None = None
        self._closed = False
        #: Producers holding frames in memory while Redis is away (strong references: a
        #: finished stream's held end must still reach Redis).
        self._holding: dict[str, RedisProducer] = {}
        self._held_total = 0
        #: Why Redis is unreachable (None: it is not known to be).
        self._outage: str | None = None
        self._outage_since = 0.0
        self._recovery: asyncio.Task[None] | None = None
        #: When the keeper last renewed every lease (or started).
        self._refreshed_at = 0.0

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 256, max_readers: int = 4096,
                 block_ms: int = 1000, client: aioredis.Redis | None = None,
                 **kwargs: Any) -> RedisStreamLog:
        """A store on the Redis at ``url`` (``redis://``, ``rediss://``, ``unix://``).

        Two pools: ``max_connections`` for writes and lookups, ``max_readers`` for readers
        waiting in ``XREAD BLOCK`` (one connection each while they wait). Each command has
        ``block_ms`` + 1 s to answer and is tried twice at most, so a stopped server is an
        error within a few seconds, never a hang. ``client``: writes and lookups on this
        client's pool instead (the gateway's one Redis client, shared with its limits; left
        open by :meth:`aclose`).
        """
        def pool(size: int) -> aioredis.BlockingConnectionPool:
            return aioredis.BlockingConnectionPool.from_url(
                url, max_connections=size, timeout=5.0, protocol=2,
                socket_timeout=block_ms / 1000 + 1.0, socket_connect_timeout=2.0,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1))

        owns = client is None
        if client is None:
            client = aioredis.Redis(connection_pool=pool(max_connections))
        kw = client.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        return cls(client, read_client=aioredis.Redis(connection_pool=pool(max_readers)),
                   block_ms=block_ms, where=f"redis at {where}", owns_client=owns, **kwargs)

    # -- plumbing ------------------------------------------------------------------------

    def _keys(self, stream_id: str) -> tuple[str, str, str, str, str]:
        base = f"{self.prefix}{{{stream_id}}}:"
        return base + "m", base + "x", base + "l", base + "c", base + "r"

    def _unavailable(self, exc: BaseException) -> StreamLogUnavailable:
        # Never the URL: it may carry a password.
        return StreamLogUnavailable(f"the stream log ({self._where}) failed:"
                                    f" {type(exc).__name__}: {str(exc)[:200]}")

    async def _call(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        reply = (await self._pipeline([(script, [len(keys), *keys, *args])]))[0]
        if isinstance(reply, Exception):
            raise self._unavailable(reply)
        return reply

    async def _read(self, args: tuple[Any, ...], timeout: float) -> Any:
        """One command on the readers' pool (an ``XREAD``), raw reply, one retry."""
        pool = self._reads.connection_pool
        packed = pack(args)
        for attempt in (0, 1):
            try:
                conn = await pool.get_connection()
            except (RedisError, OSError) as exc:
                if attempt:
                    raise self._unavailable(exc) from exc
                continue
            try:
                async with asyncio.timeout(timeout):
                    await conn.send_packed_command(packed, check_health=False)
                    return await conn.read_response(timeout=math.inf)
            except (RedisError, OSError, TimeoutError) as exc:
                await conn.disconnect(nowait=True)
                if attempt or isinstance(exc, ResponseError):
                    raise self._unavailable(exc) from exc
            except BaseException:
                await conn.disconnect(nowait=True)  # cancelled mid-reply: out of step
                raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    async def _pipeline(self, calls: Sequence[tuple[Any, Sequence[Any]]]) -> list[Any]:
        """Scripts ``(script, keys + args)`` in one round trip; replies or exceptions.

        The batch is packed by hiredis and sent on one pooled connection, its replies read
        under one deadline: redis-py's pipeline packs each argument in Python and arms a
        timer per reply: 27 µs of CPU per append at 64 streams that way, 7 µs this way
        (bench/bench_streamlog.py; bench/README.md). After a NOSCRIPT (Redis restarted or
        flushed) the scripts are loaded and the batch sent again, and after a connection
        error it is sent once more: every script here may run twice.
        """
        pool = self._redis.connection_pool
        for attempt in (0, 1):
            packed = b"".join([pack(("EVALSHA", script.sha, *keys_args))
                               for script, keys_args in calls])
            replies: list[Any] = []
            try:
                conn = await pool.get_connection()
            except (RedisError, OSError) as exc:
                if attempt:
                    raise self._unavailable(exc) from exc
                continue
            try:
                async with asyncio.timeout(self._command_timeout):
                    await conn.send_packed_command(packed, check_health=False)
                    for _ in calls:
                        try:
                            replies.append(await conn.read_response(timeout=math.inf))
                        except ResponseError as exc:  # read whole: the connection stays in step
                            replies.append(exc)
            except (RedisError, OSError, TimeoutError) as exc:
                await conn.disconnect(nowait=True)
                if attempt:
                    raise self._unavailable(exc) from exc
                continue
            except BaseException:
                await conn.disconnect(nowait=True)  # cancelled mid-reply: out of step
                raise
            finally:
                await pool.release(conn)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                try:
                    for script in {id(c[0]): c[0] for c in calls}.values():
                        script.sha = await self._redis.script_load(script.script)
                except (RedisError, OSError) as exc:
                    raise self._unavailable(exc) from exc
                continue
            return replies
        raise AssertionError("unreachable")

    async def _submit(self, producer: RedisProducer, nframes: int, keys_args: list[Any]) -> Any:
        """Queue an append for the writer task and wait for its reply."""
        return await self._enqueue(producer, nframes, keys_args)

    def _enqueue(self, producer: RedisProducer, nframes: int,
                 keys_args: list[Any]) -> asyncio.Future[Any]:
        """Queue an append for the writer task; the future of its reply."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(PendingAppend(producer, nframes, keys_args, fut))
        kick = self._kick
        if kick is not None:
            self._kick = None
            if not kick.done():
                kick.set_result(None)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name="streamlog-writer")
        return fut

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
            # Redis is away: the frames are held in memory (the producers go on).
            self._lost(exc)
            for p in batch:
                self._settle_held(p)
            return
        except BaseException as exc:
            # Never leave a producer waiting: the writer stops only when the store closes.
            error = self._unavailable(exc)
            for p in batch:
                if not p.fut.done():
                    p.fut.set_exception(error)
            raise
        if self._outage is not None:
            self._apply_in_outage(batch, replies)
            return
        for p, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):  # (OOM, READONLY: Redis cannot take it now)
                self._lost(self._unavailable(reply))
                self._settle_held(p)
                continue
            try:
                result: Any = p.producer._applied(reply, p.nframes)
            except RecordGone as exc:
                self._lost(exc)
                self._settle_held(p)
                continue
            except StreamLogUnavailable as exc:
                result = exc
            if not p.fut.done():
                if isinstance(result, BaseException):
                    p.fut.set_exception(result)
                else:
                    p.fut.set_result(result)

    # -- Redis away: frames held in memory, written when it is back -----------------------

    def _settle_held(self, p: PendingAppend) -> None:
        """Hold an append Redis could not take; settle its future as if it was written."""
        try:
            result: Any = p.producer._held_from_append(p)
        except (StreamLogUnavailable, StreamTooLarge, LeaseLost) as exc:
            result = exc
        if not p.fut.done():
            if isinstance(result, BaseException):
                p.fut.set_exception(result)
            else:
                p.fut.set_result(result)

    def _apply_in_outage(self, batch: list[PendingAppend], replies: list[Any]) -> None:
        """Replies of appends sent while producers hold frames: an error reply, or a lease
        that expired during the outage (the producer takes it again), means: hold."""
        for p, reply in zip(batch, replies, strict=True):
            producer = p.producer
            held = isinstance(reply, Exception) or (
                producer._held is not None and isinstance(reply, list) and len(reply) == 2
                and reply[0] in (-1, -3))
            if held:
                if isinstance(reply, Exception):
                    self._lost(self._unavailable(reply))
                self._settle_held(p)
                continue
            try:
                result: Any = producer._applied(reply, p.nframes)
            except RecordGone as exc:
                self._lost(exc)
                self._settle_held(p)
                continue
            except StreamLogUnavailable as exc:
                result = exc
            if not p.fut.done():
                if isinstance(result, BaseException):
                    p.fut.set_exception(result)
                else:
                    p.fut.set_result(result)

    def _lost(self, exc: BaseException) -> None:
        """Redis failed: every live producer of this process holds its frames from now on,
        and a task writes them back when Redis answers (one warning line per outage)."""
        if self._closed:
            return
        if self._outage is None:
            self._outage = str(exc)
            self._outage_since = time.monotonic()
            log.warning("stream log: %s; running streams go on, their frames held in memory"
                        " until it is back", exc)
        for producer in list(self._producers.values()):
            producer._start_holding()
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(), name="streamlog-recovery")

    def _drop_held(self, producer: RedisProducer, why: str) -> None:
        held = producer._held or []
        log.warning("stream log: stream %s: %s; its %d frames held in memory since Redis"
                    " became unreachable are not written", producer.stream_id, why, len(held))
        self._held_total -= producer._held_bytes
        producer._held, producer._held_bytes = None, 0
        producer.__dict__.pop("_enqueue", None)
        self._holding.pop(producer.stream_id, None)

    async def _recover(self) -> None:
        """Write the held frames back once Redis answers: with backoff while it does not,
        at once while there is more to write."""
        delay = RETRY_FIRST_S
        while self._holding and not self._closed:
            await asyncio.sleep(delay * random.uniform(0.8, 1.0))
            try:
                again = await self._write_held()
            except StreamLogUnavailable as exc:
                self._outage = str(exc)
                delay = min(RETRY_CAP_S, max(delay, RETRY_FIRST_S) * 2)
                continue
            delay = 0.0 if again else RETRY_FIRST_S
        if self._outage is not None and not self._closed:
            log.warning("stream log: Redis is reachable again after %.1fs; the frames"
                        " held in memory are written",
                        time.monotonic() - self._outage_since)
            self._outage = None

    async def _write_held(self) -> bool:
        """One round trip: the next held frames of every holding producer (and their
        leases taken again). True when more is ready to write at once."""
        producers = list(self._holding.values())
        calls = [p._reclaim_call() for p in producers]
        replies = await self._pipeline([(self._reclaim, c[0]) for c in calls])
        again = False
        for producer, (_, count, size), reply in zip(producers, calls, replies, strict=True):
            if isinstance(reply, Exception):
                raise self._unavailable(reply)
            if producer._held is None:
                continue  # (dropped meanwhile)
            if producer._reclaimed(reply, count, size) == 1 and producer._held:
                again = True
        return again

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
            if not math.isfinite(float(created)) or (finished and not math.isfinite(
                    float(finished))):
                raise ValueError
            meta_d = json.loads(meta) if meta else {}
            if not isinstance(meta_d, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in meta_d.items()):
                raise ValueError
            return StreamInfo(
                id=stream_id, owner=owner.decode(), endpoint=endpoint.decode(),
                created_at=float(created), status=cast(StreamStatus, status_s),
                last_seq=parse_seq(last), finished_at=float(finished) if finished else None,
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
        m, _, lease, _, _ = self._keys(stream_id)
        meta_json = json.dumps(dict(meta or {}), separators=(",", ":"))
        info = StreamInfo(id=stream_id, owner=owner, endpoint=endpoint, created_at=created,
                          status=status, last_seq=-1, producer_alive=True, meta=dict(meta or {}))
        if self._outage is not None and self.hold_new_streams:
            return self._held_producer(info, holder)
        try:
            ok = await self._call(self._create, [m, lease], [
                holder, owner, endpoint, repr(created), status, meta_json, LEASE_MS,
                self._ttl_ms])
        except StreamLogUnavailable as exc:
            if not self.hold_new_streams:
                raise
            self._lost(exc)
            return self._held_producer(info, holder)
        if ok != 1:
            raise StreamLogUnavailable(f"stream id {stream_id} already exists")
        return self._register(RedisProducer(self, info, holder))

    def _held_producer(self, info: StreamInfo, holder: str) -> RedisProducer:
        """A new stream while Redis is away: held in memory, made in Redis when it is back."""
        producer = self._register(RedisProducer(self, info, holder))
        producer._start_holding()
        self._lost(StreamLogUnavailable(self._outage or "the stream log is unavailable"))
        return producer

    def _register(self, producer: RedisProducer) -> RedisProducer:
        self._producers[producer.stream_id] = producer
        self._start_keeper()
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="streamlog-cancels")
        return producer

    def _start_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._refreshed_at = time.monotonic()
            self._keeper = asyncio.create_task(self._keep(), name="streamlog-keeper")

    async def info(self, stream_id: str, *, owner: str | None) -> StreamInfo | None:
        if not valid_stream_id(stream_id):
            return None
        m, _, lease, c, _ = self._keys(stream_id)
        info = self._parse_info(stream_id, await self._call(self._info, [m, lease, c], []))
        if info is None or (owner is not None and info.owner != owner):
            return None
        return info

    async def reader(self, stream_id: str, *, after: int = -1,
                     owner: str | None) -> RedisReader:
        if not valid_stream_id(stream_id):
            raise StreamNotFound(stream_id)
        token = new_stream_id()
        m, _, lease, c, r = self._keys(stream_id)
        # The record, and the reader attached, in one round trip.
        info = self._parse_info(stream_id, await self._call(
            self._attach, [m, lease, c, r], [token, LEASE_MS, self._ttl_ms]))
        if info is None or (owner is not None and info.owner != owner):
            if info is not None:
                await self._call(self._detach, [r], [token])
            raise StreamNotFound(stream_id)
        try:
            check_after(after, info)
            kept = info.meta.get("kept_from")
            if kept is not None and kept.isdigit() and after + 1 < int(kept):
                # Made again after Redis lost it: the frames before ``kept`` are gone.
                raise StreamNotFound(stream_id)
        except (ValueError, StreamNotFound):
            await self._call(self._detach, [r], [token])
            raise
        reader = RedisReader(self, info, after, token)
        self._readers[token] = reader
        self._start_keeper()
        return reader

    async def cancel(self, stream_id: str, *, owner: str | None) -> StreamInfo | None:
        info = await self.info(stream_id, owner=owner)  # the owner check comes first
        if info is None or info.ended:
            return info
        m, _, lease, c, _ = self._keys(stream_id)
        reply = await self._call(self._cancel, [m, lease, c],
                                 [self._ttl_ms, self.channel, stream_id])
        return self._parse_info(stream_id, reply)

    async def acquire(self, stream_id: str) -> RedisProducer | None:
        if not valid_stream_id(stream_id):
            raise StreamNotFound(stream_id)
        holder = new_stream_id()
        m, _, lease, c, _ = self._keys(stream_id)
        reply = await self._call(self._acquire, [m, lease, c], [holder, LEASE_MS])
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
        m, x, lease, _, _ = self._keys(stream_id)
        reply = await self._call(self._append, [m, x, lease], [
            "", last_seq + 1, "", status, repr(time.time()), self._ttl_ms, LEASE_MS, 0,
            *frames])
        return reply_code(reply, self) == 1

    # -- hand-off at shutdown -----------------------------------------------------------


    @property
    def _handoff_key(self) -> str:
        return f"{self.prefix}handoff"

    async def hand_off(self, producer: Producer) -> bool:
        if (not isinstance(producer, RedisProducer) or producer._store is not self
                or producer.closed or producer._held is not None):
            return False  # (held frames exist only here: the stream ends here)
        # The lease first: a reader anywhere may take the stream over from then on; the
        # list entry is for streams nobody reads (their sweeper, gateway's handoff.py).
        await producer.release()
        try:
            await self._redis.zadd(self._handoff_key, {producer.stream_id: time.time()})
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        return True

    async def handed_off(self, limit: int = 64) -> list[str]:
        key = self._handoff_key
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                # Entries older than the retention name streams Redis dropped already.
                pipe.zremrangebyscore(key, "-inf", time.time() - self.retention_s)
                pipe.zrange(key, 0, max(0, limit - 1))
                _, ids = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        if not isinstance(ids, list) or len(ids) > limit:
            raise self._bad("hand-off list")
        out: list[str] = []
        bad: list[Any] = []
        for raw in ids:
            name = raw.decode("ascii", "replace") if isinstance(raw, bytes) else ""
            (out if valid_stream_id(name) else bad).append(name or raw)
        if bad:  # (not ours: never used as a key)
            try:
                await self._redis.zrem(key, *bad)
            except (RedisError, OSError):
                pass
        return out

    async def forget_handed_off(self, stream_id: str) -> None:
        try:
            await self._redis.zrem(self._handoff_key, stream_id)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def aclose(self) -> None:
        if self._holding and not self._closed:
            try:  # one last try; else their streams are lost (ProducerLost to readers)
                async with asyncio.timeout(self._command_timeout):
                    while await self._write_held():
                        pass
            except (StreamLogUnavailable, TimeoutError):
                pass
            if self._holding:
                log.warning("stream log: closed with %d streams' frames held in memory"
                            " (Redis unreachable): those streams are lost",
                            len(self._holding))
        self._closed = True
        tasks = [t for t in (self._keeper, self._listener, self._writer, self._recovery)
                 if t is not None]
        for task in tasks:
            task.cancel()
        for pending in self._queue:
            if not pending.fut.done():
                pending.fut.set_exception(StreamLogUnavailable("the stream log is closed"))
        self._queue = []
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_client:
            await self._redis.aclose(close_connection_pool=True)
        if self._reads is not self._redis:
            await self._reads.aclose(close_connection_pool=True)

    # -- background: leases and cancels ----------------------------------------------------

    async def _keep(self) -> None:
        """Every 0.5 s, in one round trip: renew this process's leases (and learn of
        cancels and readers) and its readers' presence."""
        while not self._closed and await self._refresh_all():
            pass

    async def _refresh_all(self) -> bool:
        # A function of its own so that no strong reference to a producer or reader
        # outlives the pass: one dropped by its task must stop being renewed.
        await asyncio.sleep(LEASE_REFRESH_S)
        producers = list(self._producers.values())
        readers = list(self._readers.values())
        if not producers and not readers:
            return False
        # (holding producers: their lease is taken again with their held frames)
        producers = [p for p in producers if p._held is None]
        if not producers and not readers:
            return True
        try:
            replies = await self._pipeline([
                (self._refresh, [5, *p._keys, p.holder, LEASE_MS, self._ttl_ms])
                for p in producers] + [
                (self._touch, [1, r._keys[4], r.token, LEASE_MS, self._ttl_ms])
                for r in readers])
        except StreamLogUnavailable as exc:
            stale = time.monotonic() - self._refreshed_at
            if producers and (self._outage is not None
                              or stale >= LEASE_TTL_S - LEASE_REFRESH_S):
                # The leases lapse before the next pass could renew them: the producers
                # hold from now on and take their leases again when Redis is back. (A
                # quick failure alone leaves the next pass its chance.)
                self._lost(exc)
            elif self._outage is None:
                log.warning("stream log: lease refresh failed: %s", exc)
            return True
        self._refreshed_at = time.monotonic()
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
                if self._outage is None:
                    log.warning("stream log: cancel subscription failed: %s",
                                self._unavailable(exc))
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass
