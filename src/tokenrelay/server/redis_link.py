"""The gateway's one Redis client (``[redis] url``) and its health.

Everything the gateway keeps in Redis besides the stream log's reads (per-key limits:
``shared_limits.py``) runs Lua scripts through :meth:`RedisLink.run`: a batch of scripts
packed by hiredis and sent on one pooled connection, replies read under one deadline
(``timeout_s``), the way the stream log's ``_pipeline`` does it (and for the same
measured reason: redis-py's pipeline packs in Python and arms a timer per reply).

Health: any failure (refused connection, timeout, an error reply other than NOSCRIPT)
marks the link *down* with its reason, which ``/healthz`` reports as ``degraded``; a
probe then PINGs with exponential backoff (0.1 s doubling to 2 s, jittered) until Redis
answers, and any call that succeeds meanwhile marks it up again. While it is down the
limiter does not call Redis for admissions (each would wait out a timeout): it answers
from ``on_redis_error`` at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .streamlog.redis_handles import pack

__all__ = ["RedisLink", "RedisUnavailable"]

log = logging.getLogger("tokenrelay.server")

#: The probe's backoff: first delay, cap (seconds).
PROBE_FIRST_S = 0.1
PROBE_CAP_S = 2.0


class RedisUnavailable(Exception):
    """Redis could not answer (down, failing or too slow); the message says why."""


class RedisLink:
    """One connection pool to the Redis at ``url``, the scripts run on it, its health.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` (validated by the config).
        timeout_s: a batch of calls must be answered within this (connecting included).
        max_connections: the pool's size (shared with the stream log's writes); callers
            beyond it wait (within ``timeout_s``).
    """

    def __init__(self, url: str, *, timeout_s: float = 1.0, max_connections: int = 256,
                 ) -> None:
        self.timeout_s = timeout_s
        self.pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, protocol=2,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0))
        self.client = aioredis.Redis(connection_pool=self.pool)
        kw = self.pool.connection_kwargs
        #: Where Redis is, for messages (never the URL: it may carry a password).
        self.where = "redis at " + (kw.get("path")
                                    or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}")
        self.up = True
        #: Why it is down (``None`` while up).
        self.reason: str | None = None
        self.down_since: float | None = None
        #: Called with ``True`` / ``False`` whenever the health flips.
        self.listeners: list[Callable[[bool], None]] = []
        self._probe: asyncio.Task[None] | None = None
        self._next_probe = 0.0
        self._closed = False

    def script(self, text: str) -> AsyncScript:
        return self.client.register_script(text)

    # -- health ------------------------------------------------------------------------

    def failed(self, exc: BaseException) -> RedisUnavailable:
        """Mark the link down (once per outage: one warning line) and start the probe."""
        error = exc if isinstance(exc, RedisUnavailable) else self._unavailable(exc)
        if self.up and not self._closed:
            self.up = False
            self.reason = str(error)
            self.down_since = time.monotonic()
            log.warning("%s; retrying with backoff", error)
            for listener in self.listeners:
                listener(False)
        if not self.up and (self._probe is None or self._probe.done()) and not self._closed:
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_loop(), name="redis-probe")
        return error

    def _recovered(self) -> None:
        if not self.up:
            down = time.monotonic() - (self.down_since or time.monotonic())
            self.up, self.reason, self.down_since = True, None, None
            log.warning("%s: reachable again after %.1fs", self.where, down)
            for listener in self.listeners:
                listener(True)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: until the probe's next try, at least 1."""
        return max(1, math.ceil(self._next_probe - time.monotonic()))

    async def _probe_loop(self) -> None:
        delay = PROBE_FIRST_S
        while not self.up and not self._closed:
            self._next_probe = time.monotonic() + delay
            await asyncio.sleep(delay * random.uniform(0.8, 1.0))
            if self.up:
                return
            try:
                await self.ping()
            except RedisUnavailable as exc:
                self.reason = str(exc)
                delay = min(PROBE_CAP_S, delay * 2)

    async def ping(self) -> None:
        """PING; raise :class:`RedisUnavailable` (and mark the link down) on failure."""
        reply = await self.run_raw([("PING",)])
        if reply[0] not in (b"PONG", "PONG", True):
            raise self.failed(RedisUnavailable(f"{self.where} answered PING with {reply[0]!r}"))

    async def start(self) -> None:
        """Check Redis at startup: when it cannot be reached the gateway starts all the
        same, reports ``degraded`` and follows ``on_redis_error`` until it can."""
        try:
            await self.ping()
        except RedisUnavailable:
            pass

    async def aclose(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self.client.aclose(close_connection_pool=True)

    # -- calls -------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> RedisUnavailable:
        detail = str(exc)[:200] or "no answer"
        if isinstance(exc, TimeoutError):
            detail = f"no answer within {self.timeout_s:g}s"
        return RedisUnavailable(f"{self.where} is unreachable: {type(exc).__name__}: {detail}")

    async def run(self, calls: Sequence[tuple[AsyncScript, Sequence[Any], Sequence[Any]]],
                  ) -> list[Any]:
        """Scripts ``(script, keys, args)`` in one round trip; their replies in order.

        After a NOSCRIPT (Redis restarted or flushed) the scripts are loaded and the batch
        sent again; after a connection error (a pooled connection Redis closed) it is sent
        once more: every script run through here must be safe to run twice. Any other
        failure raises :class:`RedisUnavailable` and marks the link down.
        """
        replies = await self.run_raw(
            [("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in calls])
        if any(isinstance(r, NoScriptError) for r in replies):
            try:
                async with asyncio.timeout(self.timeout_s):
                    for script in {id(c[0]): c[0] for c in calls}.values():
                        script.sha = await self.client.script_load(script.script)
            except (RedisError, OSError, TimeoutError) as exc:
                raise self.failed(exc) from exc
            replies = await self.run_raw(
                [("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in calls])
        for reply in replies:
            if isinstance(reply, ResponseError):
                # OOM, READONLY (a replica), a script error: Redis cannot do its part.
                raise self.failed(reply)
        return replies

    async def run_raw(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Commands in one round trip, replies in order (error replies as exceptions)."""
        packed = b"".join([pack(c) for c in commands])
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        for attempt in (0, 1):
            replies: list[Any] = []
            try:
                async with asyncio.timeout_at(deadline):
                    conn = await self.pool.get_connection()
            except (RedisError, OSError, TimeoutError) as exc:
                raise self.failed(exc) from exc
            try:
                async with asyncio.timeout_at(deadline):
                    await conn.send_packed_command(packed, check_health=False)
                    for _ in commands:
                        try:
                            replies.append(await conn.read_response(timeout=math.inf))
                        except ResponseError as exc:  # read all: the connection stays in step
                            replies.append(exc)
            except (RedisError, OSError, TimeoutError) as exc:
                await conn.disconnect(nowait=True)
                if attempt or isinstance(exc, TimeoutError):
                    raise self.failed(exc) from exc
                continue
            except BaseException:
                await conn.disconnect(nowait=True)  # cancelled mid-reply: out of step
                raise
            finally:
                await self.pool.release(conn)
            self._recovered()
            return replies
        raise AssertionError("unreachable")
