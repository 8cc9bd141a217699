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
* one sender, in order: admissions, releases (slot + settlement) and renewals queue for
  it, and each batch takes all that queued while the previous one was in flight, in one
  round trip (group commit); a release that fails is resent with the next renewal, for
  as long as it still matters (a minute).

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
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.commands.core import AsyncScript

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
        clock: seconds, for the warning's pace and the age of releases to resend.
    """

    def __init__(self, link: RedisLink, *, prefix: str = "tokenrelay:",
                 on_redis_error: Literal["closed", "open"] = "closed",
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self._clock = clock
        self.prefix = prefix
        self.on_redis_error = on_redis_error
        self._admit = link.script(_limits_lua.ADMIT)
        self._release_script = link.script(_limits_lua.RELEASE)
        self._renew = link.script(_limits_lua.RENEW)
        #: This process's admitted requests per key id (all of them, shared or not).
        self._active: dict[str, int] = defaultdict(int)
        #: Running streams holding a concurrency slot: key id → lease id → lease.
        self._slots: dict[str, dict[str, SharedLease]] = defaultdict(dict)
        #: Calls waiting for the sender, in order (admissions, releases, renewals).
        self._queue: list[_Call] = []
        #: Releases Redis did not take (down): resent with every renewal while they matter.
        self._pending: list[_Release] = []
        self._sender: asyncio.Task[None] | None = None
        self._kick: asyncio.Future[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
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
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._send(_Call(self._admit, list(self.keys(key.id)), [
            lease_id, conc, rpm, tpm, reserve_tokens if tpm else 0, LEASE_MS], fut=fut))
        try:
            reply = await fut
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
        now = self._clock()
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
        if lease.key.max_concurrent or delta:  # else nothing to undo: a request stays
            self._send(self._release_call(  # counted for its minute
                _Release(lease.key, lease.id, delta, self._clock())))

    def _release_call(self, release: _Release) -> _Call:
        slots, _requests, tokens, total = self.keys(release.key.id)
        return _Call(self._release_script, [slots, tokens, total],
                     [release.lease_id, 1 if release.key.max_concurrent else 0, release.delta],
                     release=release)

    # -- background: one sender, renewals ------------------------------------------------

    def _send(self, call: _Call) -> None:
        """Queue a call for the sender. Everything goes through one queue, in order: a
        release always lands before an admission queued after it (a client that ends a
        stream and starts the next finds its slot free, as with one process), and a
        renewal can never re-add a slot whose release was queued after it."""
        self._queue.append(call)
        kick = self._kick
        if kick is not None:
            self._kick = None
            if not kick.done():
                kick.set_result(None)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(
                self._send_loop(), name="limits-sender")

    async def _send_loop(self) -> None:
        """Group commit: every call queued while a batch was in flight goes in the next
        one, one round trip (at 8 requests at once, most admissions share one)."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._queue:
                self._kick = kick = loop.create_future()
                await kick
                continue
            await self._send_batch()

    async def _send_batch(self) -> None:
        # An admission whose caller gave up before it was sent is dropped.
        batch = [c for c in self._queue if c.fut is None or not c.fut.done()]
        self._queue = []
        if not batch:
            return
        try:
            replies = await self.link.run([(c.script, c.keys, c.args) for c in batch])
        except RedisUnavailable as exc:
            for call in batch:
                if call.fut is not None and not call.fut.done():
                    call.fut.set_exception(exc)
                if call.release is not None:
                    self._pending.append(call.release)  # the keeper resends it
            if self._pending:
                self._start_keeper()
            return
        except BaseException as exc:
            for call in batch:
                if call.fut is not None and not call.fut.done():
                    call.fut.set_exception(RedisUnavailable(f"cancelled: {exc!r}"))
            raise
        for call, reply in zip(batch, replies, strict=True):
            if call.fut is None:
                continue
            if not call.fut.done():
                call.fut.set_result(reply)
            elif reply == [0, 0] and call.args[1]:
                # Admitted, but its caller is gone (cancelled): free the slot at once.
                slots, _r, tokens, total = call.keys
                self._send(_Call(self._release_script, [slots, tokens, total],
                                 [call.args[0], 1, 0]))

    def _start_keeper(self) -> None:
        if not self._closed and (self._keeper is None or self._keeper.done()):
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep(), name="limits-renewal")

    async def _keep(self) -> None:
        """Every ``RENEW_S``: renew the slots of this process's running streams (one
        script call per key) and resend releases Redis missed, in the same batch."""
        while self._slots or self._pending:
            await asyncio.sleep(RENEW_S)
            now = self._clock()
            retry = [r for r in self._pending if now - r.released < _RELEASE_RETRY_S]
            self._pending = []
            for release in retry:
                self._send(self._release_call(release))
            for key_id, slots in self._slots.items():
                self._send(_Call(self._renew, [self.keys(key_id)[0]], [LEASE_MS, *slots]))

    def on_health(self, up: bool) -> None:
        self.redis_up.set(1 if up else 0)

    async def aclose(self) -> None:
        """Send what is queued (within ``timeout_s``), stop renewing."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._sender is not None and not self._sender.done() and self.link.up:
            try:
                async with asyncio.timeout(self.link.timeout_s):
                    while self._queue:
                        await asyncio.sleep(0.005)
            except TimeoutError:
                pass
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        for call in self._queue:
            if call.fut is not None and not call.fut.done():
                call.fut.set_exception(RedisUnavailable("the gateway is closing"))
        self._queue = []


class _Release(NamedTuple):
    key: KeyConfig
    lease_id: str
    delta: int
    released: float


class _Call(NamedTuple):
    script: AsyncScript
    keys: list[str]
    args: list[Any]
    #: An admission's reply goes here.
    fut: asyncio.Future[Any] | None = None
    #: A release (kept for a retry when Redis does not take it).
    release: _Release | None = None
