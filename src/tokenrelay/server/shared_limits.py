"""Per-key limits shared by every process of a gateway (workers, replicas) in Redis.

:class:`SharedLimiter` is the in-memory ``security.Limiter`` with its state in Redis
(``[redis] url``), behind the same interface (``acquire`` is a coroutine here, ``aacquire``):

* **concurrency** as slots with leases: an admitted stream's slot lapses ``LEASE_MS``
  (3 s) after its last renewal, and this process renews all its running streams' slots
  every ``RENEW_S`` (1 s) in one round trip (one script call per key, pipelined) — never
  per chunk. A process that dies stops renewing: its slots are free again within 3 s.
* **requests/min and tokens/min**: one atomic Lua script admits a request against all
  three limits at once (``_limits_lua.ADMIT``: the same sliding 60 s windows as the
  in-memory limiter, on Redis's clock), so N processes admit exactly what one would, and
  a refusal never leaves a partial reservation to undo. Tokens are reserved at admission
  (``security.reservation``) and settled with the real usage at the end (``RELEASE``).
* releases (slot + settlement) go out at once, batched with whatever else is waiting
  (one round trip for all the streams that ended meanwhile); one that fails is retried
  with the next renewal, for as long as it still matters (a minute).

Keys with no limit (and ``anonymous``) never touch Redis. When Redis cannot be reached
(down at start, lost, slower than ``[redis] timeout_s``), ``on_redis_error`` decides:
``"closed"`` (default) answers the requests of keys with limits 503 with Retry-After;
``"open"`` admits them without the shared limits, counted in
``tokenrelay_limits_bypassed_total`` with a warning line at most once a minute. Streams
already running go on either way; their slots are added back when Redis returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from . import _limits_lua
from .config import KeyConfig
from .redis_link import RedisLink, RedisUnavailable
from .security import GatewayHTTPError, Lease, clamp_max_tokens, limit_refusal

__all__ = ["LEASE_MS", "RENEW_S", "SharedLease", "SharedLimiter"]

log = logging.getLogger("tokenrelay.server")

#: A slot lapses this long after its last renewal (a dead process's slots: ≤ 3 s).
LEASE_MS = 3000
#: Running streams' slots are renewed this often (one round trip for all of them).
RENEW_S = 1.0
#: A release that could not be sent is retried this long (then its slot has lapsed and
#: its settlement is out of the 60 s window: nothing left to correct).
_RELEASE_RETRY_S = 61.0
#: Most admissions without shared limits between two warning lines ("open" mode).
_WARN_EVERY_S = 60.0
_REFUSALS = {1: "concurrency", 2: "requests", 3: "tokens"}


class SharedLease(Lease):
    """An admitted request's hold on its key's shared limits (``shared``: recorded in
    Redis; ``False`` for a key without limits, or one admitted without Redis)."""

    def __init__(self, limiter: SharedLimiter, key: KeyConfig, reserved: int, *,
                 lease_id: str, shared: bool) -> None:
        super().__init__(limiter, key, reserved)
        self.id = lease_id
        self.shared = shared


class SharedLimiter:
    """Per-key concurrency, request-rate and token-rate limits in Redis (module docstring).

    Args:
        link: the gateway's Redis (``redis_link.RedisLink``).
        prefix: prepended to every key (``[redis] prefix``).
        on_redis_error: ``"closed"`` or ``"open"`` (see the module docstring).
        registry: where its metrics go (the gateway's).
    """

    def __init__(self, link: RedisLink, *, prefix: str = "tokenrelay:",
                 on_redis_error: Literal["closed", "open"] = "closed",
                 registry: CollectorRegistry | None = None) -> None:
        self.link = link
        self.prefix = prefix
        self.on_redis_error = on_redis_error
        self._admit = link.script(_limits_lua.ADMIT)
        self._release_script = link.script(_limits_lua.RELEASE)
        self._renew = link.script(_limits_lua.RENEW)
        #: This process's admitted requests per key id (all of them, shared or not).
        self._active: dict[str, int] = defaultdict(int)
        #: Running streams holding a concurrency slot: key id → lease id → lease.
        self._slots: dict[str, dict[str, SharedLease]] = defaultdict(dict)
        #: Releases not yet applied in Redis: (lease, delta, when released).
        self._pending: list[tuple[SharedLease, int, float]] = []
        self._keeper: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._last_warning = -_WARN_EVERY_S
        self._bypassed_since_warning = 0
        self.bypassed = Counter(
            "tokenrelay_limits_bypassed",
            "Requests admitted without the shared limits (Redis unreachable,"
            ' on_redis_error = "open")', registry=registry)
        self.refused = Counter(
            "tokenrelay_limits_unavailable",
            'Requests refused 503 because Redis was unreachable (on_redis_error = "closed")',
            registry=registry)
        self.redis_up = Gauge(
            "tokenrelay_redis_up", "1 while the shared state's Redis answers, else 0",
            registry=registry, multiprocess_mode="livemin")
        self.redis_up.set(1 if link.up else 0)
        link.listeners.append(self.on_health)

    # -- the Limiter interface ---------------------------------------------------------

    def active(self, key_id: str) -> int:
        """This process's admitted requests of ``key_id``."""
        return self._active.get(key_id, 0)

    def total_active(self) -> int:
        return sum(self._active.values())

    def clamp_max_tokens(self, key: KeyConfig, requested: int | None,
                         default: int | None) -> int | None:
        return clamp_max_tokens(key, requested, default)

    def keys(self, key_id: str) -> tuple[str, str, str, str]:
        """The Redis keys of ``key_id``'s limits: slots, requests, tokens, token sum."""
        base = f"{self.prefix}{{lim:{key_id}}}:"
        return base + "c", base + "r", base + "t", base + "n"

    async def aacquire(self, key: KeyConfig, reserve_tokens: int) -> SharedLease:
        """Admit a request or raise a 429 (over a limit) or a 503 (Redis unreachable,
        ``on_redis_error = "closed"``)."""
        conc = key.max_concurrent or 0
        rpm = key.requests_per_minute or 0
        tpm = key.tokens_per_minute or 0
        lease_id = uuid.uuid4().hex
        if not (conc or rpm or tpm):
            return self._admitted(key, reserve_tokens, lease_id, shared=False)
        if not self.link.up:
            return self._without_redis(key, reserve_tokens, lease_id, None)
        try:
            reply = (await self.link.run([(self._admit, self.keys(key.id), [
                lease_id, conc, rpm, tpm, reserve_tokens if tpm else 0, LEASE_MS])]))[0]
            if (not isinstance(reply, list) or len(reply) != 2
                    or not all(isinstance(v, int) for v in reply)
                    or reply[0] not in (0, 1, 2, 3)):
                raise self.link.failed(RedisUnavailable(
                    f"{self.link.where} sent an invalid admission reply"))
        except RedisUnavailable as exc:
            return self._without_redis(key, reserve_tokens, lease_id, exc)
        code, retry_ms = reply
        if code:
            raise limit_refusal(key, _REFUSALS[code], max(1, int(retry_ms / 1000) + 1)
                                if code != 1 else 1)
        lease = self._admitted(key, reserve_tokens, lease_id, shared=True)
        if conc:
            self._slots[key.id][lease_id] = lease
            self._start_keeper()
        return lease

    def _start_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep(), name="limits-renewal")

    def _admitted(self, key: KeyConfig, reserved: int, lease_id: str, *,
                  shared: bool) -> SharedLease:
        self._active[key.id] += 1
        return SharedLease(self, key, reserved, lease_id=lease_id, shared=shared)

    def _without_redis(self, key: KeyConfig, reserved: int, lease_id: str,
                       exc: RedisUnavailable | None) -> SharedLease:
        reason = str(exc) if exc is not None else (self.link.reason or "unreachable")
        if self.on_redis_error == "closed":
            self.refused.inc()
            raise GatewayHTTPError(
                503, "the gateway's shared limits are unavailable (its Redis cannot be"
                " reached); try again shortly", type="server_error",
                code="limits_unavailable",
                headers={"retry-after": str(self.link.retry_after())})
        self.bypassed.inc()
        self._bypassed_since_warning += 1
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            log.warning("%d request(s) admitted without the shared limits"
                        ' (on_redis_error = "open"): %s', self._bypassed_since_warning, reason)
            self._last_warning = now
            self._bypassed_since_warning = 0
        return self._admitted(key, reserved, lease_id, shared=False)

    def _release(self, lease: Lease, used_tokens: int | None) -> None:
        assert isinstance(lease, SharedLease)
        key_id = lease.key.id
        self._active[key_id] -= 1
        if not self._active[key_id]:
            del self._active[key_id]
        slots = self._slots.get(key_id)
        if slots is not None:
            slots.pop(lease.id, None)
            if not slots:
                del self._slots[key_id]
        if not lease.shared:
            return
        delta = 0
        if lease.key.tokens_per_minute and used_tokens is not None:
            delta = used_tokens - lease.reserved
        if not lease.key.max_concurrent and not delta:
            return  # nothing to undo: a request stays counted for its minute
        self._pending.append((lease, delta, time.monotonic()))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write(), name="limits-release")

    # -- background: releases and renewals ---------------------------------------------

    async def _write(self) -> None:
        """Send the waiting releases, one round trip per batch, until none wait (or
        Redis fails: the renewal retries them every second)."""
        while self._pending and self.link.up:
            if not await self._flush():
                break
        if self._pending:
            self._start_keeper()  # it retries them every RENEW_S

    async def _flush(self, renewals: bool = False) -> bool:
        # One flush at a time: a renewal in flight on one connection must never land
        # after the release of the same slot sent on another (it would add it back).
        async with self._flushing:
            now = time.monotonic()
            batch = [p for p in self._pending if now - p[2] < _RELEASE_RETRY_S]
            self._pending = []
            calls = []
            for lease, delta, _ in batch:
                slots, _r, tokens, total = self.keys(lease.key.id)
                calls.append((self._release_script, [slots, tokens, total],
                              [lease.id, 1 if lease.key.max_concurrent else 0, delta]))
            if renewals:
                calls += [(self._renew, [self.keys(key_id)[0]], [LEASE_MS, *slots])
                          for key_id, slots in self._slots.items()]
            if not calls:
                return True
            try:
                await self.link.run(calls)
            except RedisUnavailable:
                self._pending[:0] = batch  # retried with the next renewal
                return False
            except BaseException:
                self._pending[:0] = batch
                raise
            return True

    async def _keep(self) -> None:
        """Every ``RENEW_S``: renew the slots of this process's running streams and send
        any release still waiting, in one round trip."""
        while self._slots or self._pending:
            await asyncio.sleep(RENEW_S)
            await self._flush(renewals=True)

    def on_health(self, up: bool) -> None:
        self.redis_up.set(1 if up else 0)

    async def aclose(self) -> None:
        """Send what releases are waiting (briefly), stop renewing."""
        for task in (self._keeper, self._writer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._pending and self.link.up:
            try:
                await asyncio.wait_for(self._flush(), self.link.timeout_s)
            except (TimeoutError, RedisUnavailable):
                pass
